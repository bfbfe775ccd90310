"""The fake BAR regions: region info, tails (spec §5.2-§5.3), backing files, readiness gate."""

from __future__ import annotations

import errno
import math
import os
from pathlib import Path

import pytest

from backends.device import (
    BAR2_REGION_INDEX,
    BAR4_REGION_INDEX,
    DeviceError,
    IrqAction,
    RegionFlags,
    SparseArea,
    VfioDevice,
)
from backends.synthetic import SyntheticGpu, get_profile
from backends.synthetic.capabilities import (
    PCI_EXP_DEVCTL,
    PCI_EXP_DEVCTL_BCR_FLR,
    PCIE_OFFSET,
    PM_CTRL,
    PM_OFFSET,
)
from backends.synthetic.profiles import GIB, MIB
from tests.backends.helpers import FakeClock, cfg_read, cfg_write, open_fds
from tests.variant.conftest import MakeVariant
from vgpud.variant import NvgraceVariant, make_device

USE_LEN, USE_BAR = 94 * GIB + 512 * MIB, 128 * GIB
RES_LEN, RES_BAR = GIB + 256 * MIB, 2 * GIB


def test_region_info(hopper: NvgraceVariant) -> None:
    flags = RegionFlags.READ | RegionFlags.WRITE | RegionFlags.MMAP | RegionFlags.CAPS
    for index, size, length in ((4, USE_BAR, USE_LEN), (2, RES_BAR, RES_LEN)):
        info = hopper.region_info(index)
        assert (info.size, info.flags) == (size, flags)
        assert info.sparse_areas == (SparseArea(0, length),)
        assert info.mmap is not None and info.mmap.offset == 0
        assert os.fstat(info.mmap.fd).st_size == length
    assert hopper.region_info(3).size == 0
    assert hopper.region_info(5).size == 0
    assert hopper.region_info(0).size == 16 << 20  # the backend's


def test_is_a_vfio_device(hopper: NvgraceVariant) -> None:
    assert isinstance(hopper, VfioDevice)


@pytest.mark.parametrize(("index", "length", "bar"), [(4, USE_LEN, USE_BAR), (2, RES_LEN, RES_BAR)])
def test_tail_reads_and_writes(hopper: NvgraceVariant, index: int, length: int, bar: int) -> None:
    hopper.region_write(index, length - 4, b"\x01\x02\x03\x04\x05\x06\x07\x08")
    assert hopper.region_read(index, length - 4, 8) == b"\x01\x02\x03\x04" + b"\xff" * 4
    assert hopper.region_read(index, length, 8) == b"\xff" * 8
    assert hopper.region_read(index, bar - 1, 1) == b"\xff"
    hopper.region_write(index, length + 8, b"dropped!")  # silently dropped
    assert hopper.region_read(index, length + 8, 8) == b"\xff" * 8


@pytest.mark.parametrize(
    ("offset", "count"),
    # (USE_BAR - 4, 5): one byte past bar_size is refused, not 0xFF-filled; (USE_BAR, 0):
    # the kernel's `offset >= bar_size` refuses bar_size itself, even for an empty access.
    [(USE_BAR, 1), (USE_BAR + 4096, 4), (USE_BAR - 4, 8), (-1, 1), (USE_BAR - 4, 5), (USE_BAR, 0)],
)
def test_out_of_bar_is_einval(hopper: NvgraceVariant, offset: int, count: int) -> None:
    with pytest.raises(DeviceError) as err:
        hopper.region_read(BAR4_REGION_INDEX, offset, count)
    assert err.value.errno == errno.EINVAL
    with pytest.raises(DeviceError) as err:
        hopper.region_write(BAR4_REGION_INDEX, offset, bytes(count))
    assert err.value.errno == errno.EINVAL


def test_data_lands_in_the_backing_files(hopper: NvgraceVariant, tmp_path: Path) -> None:
    files = tmp_path / "gh200"
    hopper.region_write(BAR4_REGION_INDEX, 0x1234_5678, b"usemem!!")
    hopper.region_write(BAR2_REGION_INDEX, 0x1000, b"resmem!!")
    with open(files / "usemem", "rb") as f:
        assert os.pread(f.fileno(), 8, 0x1234_5678) == b"usemem!!"
    with open(files / "resmem", "rb") as f:
        assert os.pread(f.fileno(), 8, 0x1000) == b"resmem!!"
    # ...and the other way round, through the fd QEMU would mmap.
    info = hopper.region_info(BAR4_REGION_INDEX)
    assert info.mmap is not None
    os.pwrite(info.mmap.fd, b"from-vm!", 0x10_0000_0000)
    assert hopper.region_read(BAR4_REGION_INDEX, 0x10_0000_0000, 8) == b"from-vm!"


def test_memory_survives_a_new_daemon(make_variant: MakeVariant) -> None:
    first = make_variant()
    first.region_write(BAR4_REGION_INDEX, 0, b"persist")
    first.shutdown()
    second = make_variant()
    assert second.region_read(BAR4_REGION_INDEX, 0, 7) == b"persist"


def test_blackwell_has_no_resmem(blackwell: NvgraceVariant) -> None:
    assert blackwell.layout.resmem is None
    info = blackwell.region_info(BAR2_REGION_INDEX)  # the backend's real BAR1
    assert info.size == 64 << 20 and info.sparse_areas == ()
    blackwell.region_write(BAR2_REGION_INDEX, 0, b"bar1")
    assert blackwell.backend.region_read(BAR2_REGION_INDEX, 0, 4) == b"bar1"
    assert blackwell.region_info(BAR4_REGION_INDEX).size == 256 * GIB


def test_ioeventfds_refused(hopper: NvgraceVariant) -> None:
    for index in range(9):
        with pytest.raises(DeviceError) as err:
            hopper.region_io_fds(index)
        assert err.value.errno == errno.ENOTTY


def armed(variant: NvgraceVariant) -> bool:
    return variant.gate_armed


def test_gate_after_reset(make_variant: MakeVariant, clock: FakeClock) -> None:
    variant = make_variant(ready_delay=3.0)
    clock.advance(3)
    variant.region_read(BAR4_REGION_INDEX, 0, 4)  # ready: clears the gate from open()
    assert not armed(variant)
    cfg_write(variant, 0x04, 2, 0x0000)  # as QEMU's vfio_pci_pre_reset does
    variant.reset()  # config is kept across it (vfio-pci-core's save/restore)
    assert armed(variant)
    with pytest.raises(DeviceError) as err:
        variant.region_read(BAR4_REGION_INDEX, 0, 4)
    assert err.value.errno == errno.EIO  # COMMAND.MEM clear (§7.4 step 2)
    cfg_write(variant, 0x04, 2, 0x0002)
    with pytest.raises(DeviceError) as err:
        variant.region_write(BAR2_REGION_INDEX, 0, b"x")
    assert err.value.errno == errno.EAGAIN  # not ready: no blocking
    clock.advance(3)
    variant.region_write(BAR2_REGION_INDEX, 0, b"x")
    assert not armed(variant)
    assert variant.region_read(BAR2_REGION_INDEX, 0, 1) == b"x"


def test_gate_times_out(make_variant: MakeVariant, clock: FakeClock) -> None:
    variant = make_variant(ready_delay=math.inf)
    clock.advance(29.9)
    with pytest.raises(DeviceError) as err:
        variant.region_read(BAR4_REGION_INDEX, 0, 4)
    # The kernel's 30 s poll starts with the access (check_device_ready), not at the reset.
    assert err.value.errno == errno.EAGAIN
    clock.advance(29.9)
    with pytest.raises(DeviceError) as err:
        variant.region_read(BAR4_REGION_INDEX, 0, 4)
    assert err.value.errno == errno.EAGAIN
    clock.advance(0.1)
    with pytest.raises(DeviceError) as err:
        variant.region_read(BAR4_REGION_INDEX, 0, 4)
    assert err.value.errno == errno.ETIME
    # That wait is over; the next access starts a new one, as the kernel's next read would.
    with pytest.raises(DeviceError) as err:
        variant.region_read(BAR4_REGION_INDEX, 0, 4)
    assert err.value.errno == errno.EAGAIN
    with pytest.raises(DeviceError) as err:  # range errors come first, as in the kernel
        variant.region_read(BAR4_REGION_INDEX, USE_BAR, 4)
    assert err.value.errno == errno.EINVAL
    assert not variant.ready_now()


def test_guest_flr_arms_the_gate(make_variant: MakeVariant, clock: FakeClock) -> None:
    # A guest FLR through DEVCTL is a function reset too: the kernel's err_handler.reset_done
    # arms the gate (vfio_exp_config_write -> pci_try_reset_function), and bar_val stays.
    variant = make_variant(ready_delay=3.0)
    clock.advance(3)
    variant.region_read(BAR4_REGION_INDEX, 0, 4)
    assert not armed(variant)
    cfg_write(variant, 0x20, 4, 0xFFFFFFFF)  # BAR4 sizing: bar_val is now set
    sized = cfg_read(variant, 0x20, 4)
    cfg_write(variant, PCIE_OFFSET + PCI_EXP_DEVCTL, 2, PCI_EXP_DEVCTL_BCR_FLR)
    assert armed(variant)
    assert cfg_read(variant, 0x20, 4) == sized
    cfg_write(variant, 0x04, 2, 0x0002)  # the FLR reset COMMAND; the guest restores it
    with pytest.raises(DeviceError) as err:
        variant.region_read(BAR4_REGION_INDEX, 0, 4)
    assert err.value.errno == errno.EAGAIN
    clock.advance(3)
    variant.region_read(BAR4_REGION_INDEX, 0, 4)
    assert not armed(variant)


def test_tail_write_is_not_gated(make_variant: MakeVariant) -> None:
    # nvgrace_gpu_write_mem drops a write wholly past memlength before the readiness gate;
    # a read of the tail is gated (nvgrace_gpu_read_mem has no such exit).
    variant = make_variant(ready_delay=math.inf)
    cfg_write(variant, 0x04, 2, 0x0000)  # memory disabled too: still dropped silently
    variant.region_write(BAR4_REGION_INDEX, USE_LEN + 16, b"abcd")
    assert armed(variant)
    with pytest.raises(DeviceError) as err:
        variant.region_read(BAR4_REGION_INDEX, USE_LEN + 16, 4)
    assert err.value.errno == errno.EIO
    with pytest.raises(DeviceError) as err:  # a write reaching real memory is gated
        variant.region_write(BAR4_REGION_INDEX, USE_LEN - 2, b"abcd")
    assert err.value.errno == errno.EIO


def test_d3hot_disables_memory(make_variant: MakeVariant, clock: FakeClock) -> None:
    # __vfio_pci_memory_enabled is false in D3hot whatever COMMAND says: EIO from the gate.
    variant = make_variant(ready_delay=1.0)
    clock.advance(1)
    cfg_write(variant, PM_OFFSET + PM_CTRL, 2, 3)  # D3hot
    with pytest.raises(DeviceError) as err:
        variant.region_read(BAR4_REGION_INDEX, 0, 4)
    assert err.value.errno == errno.EIO
    cfg_write(variant, PM_OFFSET + PM_CTRL, 2, 0)  # back to D0
    variant.region_read(BAR4_REGION_INDEX, 0, 4)
    assert not armed(variant)


def test_passthrough_of_everything_else(hopper: NvgraceVariant) -> None:
    assert hopper.device_info() == hopper.backend.device_info()
    assert hopper.irq_info(2) == hopper.backend.irq_info(2)
    before = open_fds()
    hopper.set_irqs(3, IrqAction.TRIGGER, 0, 1, eventfds=[os.eventfd(0)])
    hopper.close()
    assert open_fds() == before


def test_fallback_without_device_memory(tmp_path: Path) -> None:
    gpu = SyntheticGpu(get_profile("gh200").with_overrides(memory_size=0), tmp_path)
    assert make_device(gpu) is gpu
    assert gpu.region_info(BAR4_REGION_INDEX).size == 0
    with pytest.raises(ValueError, match="make_device"):
        NvgraceVariant(gpu)
    gpu.shutdown()


def test_make_device_builds_the_variant(tmp_path: Path) -> None:
    gpu = SyntheticGpu(get_profile("gb300"), tmp_path)
    device = make_device(gpu)
    assert isinstance(device, NvgraceVariant)
    assert device.region_info(BAR4_REGION_INDEX).size == 512 * GIB
    device.shutdown()
