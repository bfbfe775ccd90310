"""BAR0 registers: identity, readiness with an injected clock, scratch, bounds."""

from __future__ import annotations

import errno
import math
from pathlib import Path

import pytest

from backends.device import BAR0_REGION_INDEX, BAR2_REGION_INDEX, DeviceError, RegionFlags
from backends.synthetic import SyntheticGpu, get_profile
from backends.synthetic.bar0 import (
    C2C_LINK_BAR0_OFFSET,
    HBM_TRAINING_BAR0_OFFSET,
    SCRATCH,
)
from tests.backends.helpers import FakeClock, cfg_write, u32


def read32(gpu: SyntheticGpu, offset: int) -> int:
    return u32(gpu.region_read(BAR0_REGION_INDEX, offset, 4))


def test_region_info(gpu: SyntheticGpu) -> None:
    info = gpu.region_info(BAR0_REGION_INDEX)
    assert info.size == 16 << 20
    assert info.flags == RegionFlags.READ | RegionFlags.WRITE  # trapped, never mmapped
    assert info.mmap is None


@pytest.mark.parametrize(("name", "boot0"), [("gh200", 0x180000A1), ("gb200", 0x1A0000A1)])
def test_boot0_per_profile(tmp_path: Path, name: str, boot0: int) -> None:
    gpu = SyntheticGpu(get_profile(name), tmp_path)
    assert read32(gpu, 0) == boot0
    gpu.region_write(BAR0_REGION_INDEX, 0, b"\0\0\0\0")  # read-only
    assert read32(gpu, 0) == boot0


def test_ready_at_once_by_default(gpu: SyntheticGpu) -> None:
    assert read32(gpu, C2C_LINK_BAR0_OFFSET) == 0xFF
    assert read32(gpu, HBM_TRAINING_BAR0_OFFSET) == 0xFF


def test_ready_delay_after_creation_and_reset(tmp_path: Path) -> None:
    clock = FakeClock()
    gpu = SyntheticGpu(get_profile("gb200"), tmp_path, ready_delay=5.0, clock=clock)
    assert read32(gpu, C2C_LINK_BAR0_OFFSET) == 0
    clock.advance(4.9)
    assert read32(gpu, HBM_TRAINING_BAR0_OFFSET) == 0
    clock.advance(0.1)
    assert read32(gpu, C2C_LINK_BAR0_OFFSET) == 0xFF
    assert read32(gpu, HBM_TRAINING_BAR0_OFFSET) == 0xFF
    gpu.reset()
    assert read32(gpu, C2C_LINK_BAR0_OFFSET) == 0
    clock.advance(5)
    assert read32(gpu, C2C_LINK_BAR0_OFFSET) == 0xFF


def test_never_ready(tmp_path: Path) -> None:
    clock = FakeClock()
    gpu = SyntheticGpu(get_profile("gh200"), tmp_path, ready_delay=math.inf, clock=clock)
    clock.advance(1e9)
    assert read32(gpu, HBM_TRAINING_BAR0_OFFSET) == 0


def test_negative_delay_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="ready_delay"):
        SyntheticGpu(get_profile("gh200"), tmp_path, ready_delay=-1)


def test_scratch_any_width(gpu: SyntheticGpu) -> None:
    gpu.region_write(BAR0_REGION_INDEX, SCRATCH + 1, b"\x11\x22\x33\x44\x55\x66\x77\x88")
    assert (
        gpu.region_read(BAR0_REGION_INDEX, SCRATCH, 10) == b"\0\x11\x22\x33\x44\x55\x66\x77\x88\0"
    )
    assert gpu.region_read(BAR0_REGION_INDEX, SCRATCH + 3, 1) == b"\x33"
    gpu.reset()
    assert gpu.region_read(BAR0_REGION_INDEX, SCRATCH, 10) == bytes(10)


def test_unimplemented_registers_read_zero(gpu: SyntheticGpu) -> None:
    gpu.region_write(BAR0_REGION_INDEX, 0x800000, b"\xff" * 8)
    assert gpu.region_read(BAR0_REGION_INDEX, 0x800000, 8) == bytes(8)


@pytest.mark.parametrize(("offset", "count"), [(16 << 20, 4), ((16 << 20) - 2, 4), (-4, 4)])
def test_bounds(gpu: SyntheticGpu, offset: int, count: int) -> None:
    with pytest.raises(DeviceError) as err:
        gpu.region_read(BAR0_REGION_INDEX, offset, count)
    assert err.value.errno == errno.EINVAL


@pytest.mark.parametrize("index", [1, 3, 4, 5, 6, 8])
def test_absent_regions(gpu: SyntheticGpu, index: int) -> None:
    assert gpu.region_info(index).size == 0
    with pytest.raises(DeviceError):
        gpu.region_read(index, 0, 4)


def test_device_info(gpu: SyntheticGpu) -> None:
    info = gpu.device_info()
    assert (int(info.flags), info.num_regions, info.num_irqs) == (3, 9, 5)
    with pytest.raises(DeviceError):
        gpu.region_info(9)


@pytest.mark.parametrize(
    ("command", "pmcsr"), [(0x0000, 0x0008), (0x0002, 0x000B)], ids=["mem-off", "d3hot"]
)
def test_bar_accesses_need_memory_decoding(gpu: SyntheticGpu, command: int, pmcsr: int) -> None:
    """vfio_pci_bar_rw tests __vfio_pci_memory_enabled for a memory BAR: EIO, not the
    registers, while COMMAND.MEM is clear or the function is in D3hot (BAR0 and the real
    BAR1 alike)."""
    cfg_write(gpu, 0x04, 2, command)
    cfg_write(gpu, 0x44, 2, pmcsr)
    for index in (BAR0_REGION_INDEX, BAR2_REGION_INDEX):
        with pytest.raises(DeviceError) as err:
            gpu.region_read(index, 0, 4)
        assert err.value.errno == errno.EIO
        with pytest.raises(DeviceError) as err:
            gpu.region_write(index, 0, b"\0" * 4)
        assert err.value.errno == errno.EIO
    cfg_write(gpu, 0x44, 2, 0x0008)  # D0
    cfg_write(gpu, 0x04, 2, 0x0002)  # MEM
    assert gpu.region_read(BAR0_REGION_INDEX, 0, 4) == gpu.profile.boot0.to_bytes(4, "little")
