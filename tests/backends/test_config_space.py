"""Config space of the synthetic GPU, byte by byte (spec vfio-user.md §5.3, R12)."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from backends.device import CONFIG_REGION_INDEX, DeviceError
from backends.synthetic import SyntheticGpu, get_profile
from backends.synthetic.capabilities import (
    DSN_OFFSET,
    DVSEC_OFFSET,
    MSI_OFFSET,
    MSIX_OFFSET,
    PCIE_OFFSET,
)
from backends.synthetic.profiles import GIB
from tests.backends.helpers import cfg_read, cfg_write


def test_header_identity(gpu: SyntheticGpu) -> None:
    assert cfg_read(gpu, 0x00, 2) == 0x10DE
    assert cfg_read(gpu, 0x02, 2) == 0x2342
    assert cfg_read(gpu, 0x09, 3) == 0x030200  # 3D controller
    assert cfg_read(gpu, 0x08, 1) == 0xA1
    assert cfg_read(gpu, 0x0E, 1) == 0x00  # header type 0, single function
    assert cfg_read(gpu, 0x2C, 2) == 0x10DE
    assert cfg_read(gpu, 0x2E, 2) == 0x16C1
    assert cfg_read(gpu, 0x3D, 1) == 1  # INTA
    assert cfg_read(gpu, 0x06, 2) & 0x10  # capability list
    assert cfg_read(gpu, 0x34, 1) == 0x40


def test_bulk_read_is_4k_and_matches_small_reads(gpu: SyntheticGpu) -> None:
    whole = gpu.region_read(CONFIG_REGION_INDEX, 0, 4096)
    assert len(whole) == 4096
    for offset in range(0, 4096, 4):
        assert gpu.region_read(CONFIG_REGION_INDEX, offset, 4) == whole[offset : offset + 4]


@pytest.mark.parametrize(
    ("offset", "size", "flags"),
    [
        (0x10, 16 << 20, 0x4),  # BAR0: 64-bit, non-prefetchable
        (0x18, 64 << 20, 0xC),  # BAR2/3: the GPU's BAR1, 64-bit prefetchable
    ],
)
def test_bar_sizing(gpu: SyntheticGpu, offset: int, size: int, flags: int) -> None:
    assert cfg_read(gpu, offset, 4) == flags
    cfg_write(gpu, offset, 4, 0xFFFFFFFF)
    cfg_write(gpu, offset + 4, 4, 0xFFFFFFFF)
    assert cfg_read(gpu, offset, 4) == (0xFFFFFFFF & ~(size - 1)) | flags
    # Sizes below 4 GiB: the whole upper dword is address (spec vfio-user.md §12 warns
    # against libvfio-user's read-only upper dwords).
    assert cfg_read(gpu, offset + 4, 4) == 0xFFFFFFFF
    cfg_write(gpu, offset, 4, 0xFD000000)
    cfg_write(gpu, offset + 4, 4, 0x12)
    assert cfg_read(gpu, offset, 8) == 0x12_FD000000 & ~(size - 1) | flags


def test_absent_bars_and_rom_stay_zero(gpu: SyntheticGpu) -> None:
    for offset in (0x20, 0x24, 0x30):
        cfg_write(gpu, offset, 4, 0xFFFFFFFF)
        assert cfg_read(gpu, offset, 4) == 0
    cfg_write(gpu, 0x30, 4, 0xFFFFF800)  # QEMU's ROM sizing value
    assert cfg_read(gpu, 0x30, 4) == 0


def test_command_register_masks(gpu: SyntheticGpu) -> None:
    cfg_write(gpu, 0x04, 2, 0xFFFF)
    assert cfg_read(gpu, 0x04, 2) == 0x0546
    cfg_write(gpu, 0x04, 2, 0x0002)
    assert cfg_read(gpu, 0x04, 2) == 0x0002


def test_status_rw1c(gpu: SyntheticGpu) -> None:
    gpu.config.set_bits(0x06, 2, 0x8000 | 0x0100, True)  # the device reports errors
    cfg_write(gpu, 0x06, 2, 0x8000)
    assert cfg_read(gpu, 0x06, 2) == 0x0110  # cap list + the uncleared error bit
    cfg_write(gpu, 0x06, 2, 0xFFFF)
    assert cfg_read(gpu, 0x06, 2) == 0x0010  # CAP_LIST is read-only


def test_writable_header_bytes(gpu: SyntheticGpu) -> None:
    for offset in (0x0C, 0x0D, 0x3C):
        cfg_write(gpu, offset, 1, 0x5A)
        assert cfg_read(gpu, offset, 1) == 0x5A
    for offset in (0x00, 0x02, 0x08, 0x0E, 0x2C, 0x34, 0x3D):
        before = gpu.region_read(CONFIG_REGION_INDEX, offset, 2)
        cfg_write(gpu, offset, 2, 0xA5A5)
        assert gpu.region_read(CONFIG_REGION_INDEX, offset, 2) == before


def test_unimplemented_register_write_is_ignored(gpu: SyntheticGpu) -> None:
    # Linux's HDA quirk on NVIDIA display-class devices (spec vfio-user.md §11).
    cfg_write(gpu, 0x488, 4, 0x02000000)
    assert cfg_read(gpu, 0x488, 4) == 0
    cfg_write(gpu, 0xFFC, 4, 0xFFFFFFFF)
    assert cfg_read(gpu, 0xFFC, 4) == 0


@pytest.mark.parametrize(("offset", "count"), [(4096, 1), (4094, 4), (-1, 2)])
def test_out_of_range_access(gpu: SyntheticGpu, offset: int, count: int) -> None:
    with pytest.raises(DeviceError) as err:
        gpu.region_read(CONFIG_REGION_INDEX, offset, count)
    assert err.value.errno == errno.EINVAL
    with pytest.raises(DeviceError):
        gpu.region_write(CONFIG_REGION_INDEX, offset, bytes(count))


def _walk(gpu: SyntheticGpu) -> list[tuple[int, int]]:
    caps, pos = [], cfg_read(gpu, 0x34, 1)
    while pos:
        caps.append((pos, cfg_read(gpu, pos, 1)))
        pos = cfg_read(gpu, pos + 1, 1)
    return caps


def test_capability_list(gpu: SyntheticGpu) -> None:
    assert _walk(gpu) == [(0x40, 0x01), (0x48, 0x05), (0x60, 0x10), (0xA0, 0x11)]
    assert cfg_read(gpu, PCIE_OFFSET + 2, 2) & 0xF0 == 0  # Endpoint
    assert cfg_read(gpu, PCIE_OFFSET + 4, 4) & 1 << 28  # FLR capable
    assert cfg_read(gpu, MSIX_OFFSET + 2, 2) == 15  # 16 vectors
    assert cfg_read(gpu, MSIX_OFFSET + 4, 4) == 0x2000  # table in BAR0
    assert cfg_read(gpu, MSIX_OFFSET + 8, 4) == 0x3000  # PBA in BAR0


def test_extended_capabilities_and_dvsec(gpu: SyntheticGpu) -> None:
    dsn = cfg_read(gpu, DSN_OFFSET, 4)
    assert dsn & 0xFFFF == 0x0003 and dsn >> 20 == DVSEC_OFFSET
    dvsec = cfg_read(gpu, DVSEC_OFFSET, 4)
    assert dvsec & 0xFFFF == 0x0023 and dvsec >> 20 == 0
    assert cfg_read(gpu, DVSEC_OFFSET + 4, 2) == 0x10DE
    assert cfg_read(gpu, DVSEC_OFFSET + 8, 2) == 3
    assert cfg_read(gpu, DVSEC_OFFSET + 0xA, 2) == 0  # Hopper: MIG bug
    cfg_write(gpu, DVSEC_OFFSET + 0xA, 2, 1)  # read-only
    assert cfg_read(gpu, DVSEC_OFFSET + 0xA, 2) == 0


def test_devctl_and_flr(gpu: SyntheticGpu) -> None:
    devctl = PCIE_OFFSET + 8
    cfg_write(gpu, 0x3C, 1, 0x0B)
    cfg_write(gpu, devctl, 2, 0x0000)
    assert cfg_read(gpu, devctl, 2) == 0
    cfg_write(gpu, 0x04, 2, 0x0006)
    resets = gpu.reset_count
    cfg_write(gpu, devctl, 2, 0x8000)  # initiate FLR
    assert gpu.reset_count == resets + 1
    # vfio-pci-core writes DEVCTL, then resets the function inside a config save/restore
    # (vfio_exp_config_write): what was written stays, BCR_FLR reads 0.
    assert cfg_read(gpu, devctl, 2) == 0
    assert cfg_read(gpu, 0x04, 2) == 0x0006
    assert cfg_read(gpu, 0x3C, 1) == 0x0B


def test_pm_and_msi_control_bits(gpu: SyntheticGpu) -> None:
    cfg_write(gpu, 0x44, 2, 0xFFFF)
    assert cfg_read(gpu, 0x44, 2) == 0x010B  # D3hot + PME_En + NoSoftReset
    cfg_write(gpu, 0x4A, 2, 0xFFFF)
    assert cfg_read(gpu, 0x4A, 2) == 0x0180 | 4 << 1 | 0x71
    cfg_write(gpu, MSIX_OFFSET + 2, 2, 0xFFFF)
    assert cfg_read(gpu, MSIX_OFFSET + 2, 2) == 0xC00F


def test_a_fresh_device_decodes_memory_in_d0(gpu: SyntheticGpu) -> None:
    """What a VFIO user finds after open: pci_enable_device turned memory decoding on."""
    assert cfg_read(gpu, 0x04, 2) == 0x0002
    assert cfg_read(gpu, 0x44, 2) & 0x3 == 0


def test_reset_keeps_config_as_vfio_pci_core_restores_it(gpu: SyntheticGpu) -> None:
    """pci_try_reset_function saves config before the reset and restores it after: the
    client finds it as it left it, except the power state (D0) and status bits."""
    cfg_write(gpu, 0x04, 2, 0x0406)
    cfg_write(gpu, 0x10, 4, 0xFFFFFFFF)
    cfg_write(gpu, MSIX_OFFSET + 2, 2, 0x8000)
    cfg_write(gpu, 0x3C, 1, 0x0B)
    cfg_write(gpu, 0x44, 2, 0x0003)  # D3hot
    before = bytearray(gpu.region_read(CONFIG_REGION_INDEX, 0, 4096))
    gpu.reset()
    after = gpu.region_read(CONFIG_REGION_INDEX, 0, 4096)
    assert after[0x44] & 0x3 == 0  # D0
    before[0x44] &= ~0x3
    assert after == before


def test_flr_by_a_byte_write_to_devctl_upper_byte(gpu: SyntheticGpu) -> None:
    cfg_write(gpu, 0x04, 2, 0x0006)
    resets = gpu.reset_count
    cfg_write(gpu, PCIE_OFFSET + 8 + 1, 1, 0x80)  # BCR_FLR through DEVCTL's upper byte
    assert gpu.reset_count == resets + 1  # the function was reset
    assert cfg_read(gpu, 0x04, 2) == 0x0006  # inside vfio-pci-core's save/restore


def test_open_turns_memory_decoding_on_and_keeps_the_rest(gpu: SyntheticGpu) -> None:
    """The last client left the GPU with COMMAND 0 in D3hot; vfio-pci-core's open enables
    the device and puts it in D0. The rest of its state is kept (vfio-user R19)."""
    cfg_write(gpu, 0x3C, 1, 0x0B)
    cfg_write(gpu, 0x04, 2, 0x0000)
    cfg_write(gpu, 0x44, 2, 0x0003)
    gpu.close()
    gpu.open()
    assert cfg_read(gpu, 0x04, 2) == 0x0002
    assert cfg_read(gpu, 0x44, 2) & 0x3 == 0
    assert cfg_read(gpu, 0x3C, 1) == 0x0B


def test_reserved_msi_and_devsta_bits_stay_zero(gpu: SyntheticGpu) -> None:
    cfg_write(gpu, MSI_OFFSET + 16, 4, 0xFFFFFFFF)
    assert cfg_read(gpu, MSI_OFFSET + 16, 4) == 0xFFFF  # 16 vectors: one mask bit each
    cfg_write(gpu, MSI_OFFSET + 4, 4, 0xFFFFFFFF)
    assert cfg_read(gpu, MSI_OFFSET + 4, 4) == 0xFFFFFFFC  # message address is dword aligned
    cfg_write(gpu, PCIE_OFFSET + 10, 2, 0x000F)  # DEVSTA error bits are RW1C
    assert cfg_read(gpu, PCIE_OFFSET + 10, 2) == 0


def test_bar_sizing_above_4gib(tmp_path: Path) -> None:
    profile = get_profile("gh200").with_overrides(memory_size=4 * GIB, bar1_size=16 * GIB)
    gpu = SyntheticGpu(profile, tmp_path)
    try:
        cfg_write(gpu, 0x18, 4, 0xFFFFFFFF)
        cfg_write(gpu, 0x1C, 4, 0xFFFFFFFF)
        assert cfg_read(gpu, 0x18, 8) == ((1 << 64) - 16 * GIB) | 0xC
    finally:
        gpu.shutdown()


@pytest.mark.parametrize("start", [0, 3])
@pytest.mark.parametrize("requested", [1, 2])
def test_unsupported_power_states_are_refused(
    gpu: SyntheticGpu, start: int, requested: int
) -> None:
    """PMC advertises neither D1 nor D2: a write asking for one leaves the power state as
    it was (PCI PM 1.2, PMCSR PowerState: data discarded, no state change; the kernel's
    pci_set_low_power_state answers EIO for it, EINVAL for D3hot -> D1/D2). In particular
    a function in D3hot stays there and keeps refusing BAR accesses."""
    cfg_write(gpu, 0x44, 2, 0x0008 | start)
    cfg_write(gpu, 0x44, 2, 0x0008 | requested)
    assert cfg_read(gpu, 0x44, 2) & 0x3 == start
    if start == 3:
        with pytest.raises(DeviceError) as err:
            gpu.region_read(0, 0, 4)
        assert err.value.errno == errno.EIO
    else:
        assert len(gpu.region_read(0, 0, 4)) == 4
    cfg_write(gpu, 0x44, 2, 0x0108 | requested)  # the rest of the write still lands
    assert cfg_read(gpu, 0x44, 2) == 0x0108 | start  # PME_En set, the state kept
