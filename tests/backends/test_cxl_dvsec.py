"""The optional CXL Device DVSEC (spec nvgrace-gpu.md §2.3) and its readiness bits (§7.3)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from backends.device import BAR0_REGION_INDEX, CONFIG_REGION_INDEX
from backends.synthetic import SyntheticGpu, get_profile
from backends.synthetic.bar0 import C2C_LINK_BAR0_OFFSET, DEFAULT_VALID_DELAY
from backends.synthetic.capabilities import (
    CXL_DVSEC_LENGTH,
    CXL_DVSEC_OFFSET,
    DSN_OFFSET,
    DVSEC_OFFSET,
    PCI_EXT_CAP_ID_DVSEC,
)
from backends.synthetic.profiles import GIB, MIB, Profile
from tests.backends.helpers import FakeClock, cfg_read, cfg_write, u32

READY = CXL_DVSEC_OFFSET + 0x1C  # Range 1 Size Low
VALID, ACTIVE = 1 << 0, 1 << 1


def cxl_profile(**changes: object) -> Profile:
    return get_profile("gb200").with_overrides(cxl_dvsec=True, **changes)


def ext_caps(gpu: SyntheticGpu) -> list[tuple[int, int]]:
    """(offset, capability ID) of every extended capability, in list order."""
    found: list[tuple[int, int]] = []
    offset = 0x100
    while offset:
        header = cfg_read(gpu, offset, 4)
        found.append((offset, header & 0xFFFF))
        assert header >> 16 & 0xF == 1  # capability version
        offset = header >> 20
    return found


def test_absent_by_default(tmp_path: Path) -> None:
    for name in ("gh200", "gh200-480g", "gh200-sku", "gb200", "gb300"):
        gpu = SyntheticGpu(get_profile(name), tmp_path / name)
        assert not gpu.profile.cxl_dvsec
        assert ext_caps(gpu) == [(DSN_OFFSET, 0x0003), (DVSEC_OFFSET, PCI_EXT_CAP_ID_DVSEC)]


@pytest.mark.parametrize("bitmap", [1, None])
def test_present_and_well_formed(tmp_path: Path, bitmap: int | None) -> None:
    profile = cxl_profile(dvsec_bitmap=bitmap, memory_size=186 * GIB + 256 * MIB)
    gpu = SyntheticGpu(profile, tmp_path)
    caps = ext_caps(gpu)
    # Chained after the NVIDIA DVSEC, or straight after the DSN when that one is absent.
    expected = [(DSN_OFFSET, 0x0003)]
    if bitmap is not None:
        expected.append((DVSEC_OFFSET, PCI_EXT_CAP_ID_DVSEC))
    assert caps == [*expected, (CXL_DVSEC_OFFSET, PCI_EXT_CAP_ID_DVSEC)]
    header1 = cfg_read(gpu, CXL_DVSEC_OFFSET + 4, 4)
    assert header1 & 0xFFFF == 0x1E98  # PCI_VENDOR_ID_CXL
    assert header1 >> 16 & 0xF == 1  # DVSEC revision
    assert header1 >> 20 == CXL_DVSEC_LENGTH
    assert cfg_read(gpu, CXL_DVSEC_OFFSET + 8, 2) == 0  # PCI_DVSEC_CXL_DEVICE
    assert CXL_DVSEC_OFFSET + CXL_DVSEC_LENGTH <= 0x1000
    assert cfg_read(gpu, CXL_DVSEC_OFFSET + 0xA, 2) & 1 << 2  # Mem_Capable
    # Range 1 describes the device memory: size high/low (bits 31:28), base high/low.
    size = profile.memory_size
    assert cfg_read(gpu, CXL_DVSEC_OFFSET + 0x18, 4) == size >> 32
    assert cfg_read(gpu, READY, 4) & 0xF000_0000 == size & 0xF000_0000
    assert cfg_read(gpu, CXL_DVSEC_OFFSET + 0x20, 4) == profile.memphys >> 32
    assert cfg_read(gpu, CXL_DVSEC_OFFSET + 0x24, 4) == profile.memphys & 0xF000_0000


def test_default_timeout_code_and_ready_at_once(tmp_path: Path) -> None:
    gpu = SyntheticGpu(cxl_profile(), tmp_path)
    status = cfg_read(gpu, READY, 4)
    assert status >> 13 & 7 == 3  # 64 s: covers the legacy 30 s budget
    assert status & (VALID | ACTIVE) == VALID | ACTIVE
    # The BAR0 registers keep working (the v7.2 driver just does not read them).
    assert u32(gpu.region_read(BAR0_REGION_INDEX, C2C_LINK_BAR0_OFFSET, 4)) == 0xFF


@pytest.mark.parametrize("code", range(8))
def test_every_timeout_code(tmp_path: Path, code: int) -> None:
    gpu = SyntheticGpu(cxl_profile(cxl_mem_active_timeout=code), tmp_path)
    assert cfg_read(gpu, READY, 4) >> 13 & 7 == code


@pytest.mark.parametrize("code", [-1, 8])
def test_timeout_code_is_three_bits(code: int) -> None:
    with pytest.raises(ValueError, match="cxl_mem_active_timeout"):
        cxl_profile(cxl_mem_active_timeout=code)


def test_read_only(tmp_path: Path) -> None:
    clock = FakeClock()
    gpu = SyntheticGpu(cxl_profile(), tmp_path, ready_delay=math.inf, clock=clock)
    clock.advance(DEFAULT_VALID_DELAY)
    before = bytes(gpu.region_read(CONFIG_REGION_INDEX, CXL_DVSEC_OFFSET, CXL_DVSEC_LENGTH))
    # A guest cannot fake readiness, change the timeout or move the capability.
    cfg_write(gpu, READY, 4, 0xFFFFFFFF)
    cfg_write(gpu, READY, 1, ACTIVE)
    for at in range(0, CXL_DVSEC_LENGTH, 4):
        cfg_write(gpu, CXL_DVSEC_OFFSET + at, 4, 0x5A5A5A5A)
    assert gpu.region_read(CONFIG_REGION_INDEX, CXL_DVSEC_OFFSET, CXL_DVSEC_LENGTH) == before
    assert cfg_read(gpu, READY, 4) & (VALID | ACTIVE) == VALID


def test_valid_then_active_and_again_after_reset(tmp_path: Path) -> None:
    clock = FakeClock()
    gpu = SyntheticGpu(cxl_profile(), tmp_path, ready_delay=5.0, clock=clock)

    def bits() -> int:
        return cfg_read(gpu, READY, 4) & (VALID | ACTIVE)

    assert bits() == 0
    clock.advance(DEFAULT_VALID_DELAY - 0.01)
    assert bits() == 0
    clock.advance(0.01)
    assert bits() == VALID
    clock.advance(5.0 - DEFAULT_VALID_DELAY - 0.01)
    assert bits() == VALID
    clock.advance(0.01)
    assert bits() == VALID | ACTIVE
    # Any read that touches the register sees the live bits, e.g. a byte read.
    assert cfg_read(gpu, READY, 1) & 3 == VALID | ACTIVE
    gpu.reset()
    assert bits() == 0
    clock.advance(DEFAULT_VALID_DELAY)
    assert bits() == VALID
    clock.advance(5.0)
    assert bits() == VALID | ACTIVE


def test_flr_rearms_too(tmp_path: Path) -> None:
    clock = FakeClock()
    gpu = SyntheticGpu(cxl_profile(), tmp_path, ready_delay=2.0, clock=clock)
    clock.advance(2.0)
    assert cfg_read(gpu, READY, 4) & 3 == VALID | ACTIVE
    cfg_write(gpu, 0x60 + 8, 2, 1 << 15)  # DEVCTL.BCR_FLR
    assert cfg_read(gpu, READY, 4) & 3 == 0


def test_valid_delay_is_configurable(tmp_path: Path) -> None:
    clock = FakeClock()
    gpu = SyntheticGpu(cxl_profile(), tmp_path, ready_delay=3.0, valid_delay=2.0, clock=clock)
    clock.advance(1.99)
    assert cfg_read(gpu, READY, 4) & 3 == 0
    clock.advance(0.01)
    assert cfg_read(gpu, READY, 4) & 3 == VALID
    # Never valid: the driver's 1 s VALID budget runs out (tested in tests/variant).
    never = SyntheticGpu(cxl_profile(), tmp_path / "never", valid_delay=math.inf, clock=clock)
    clock.advance(1000)
    assert cfg_read(never, READY, 4) & 3 == ACTIVE


def test_short_ready_delay_bounds_valid(tmp_path: Path) -> None:
    # VALID never comes after ACTIVE by default: ready_delay 0.1 -> both at 0.1 s.
    clock = FakeClock()
    gpu = SyntheticGpu(cxl_profile(), tmp_path, ready_delay=0.1, clock=clock)
    assert cfg_read(gpu, READY, 4) & 3 == 0
    clock.advance(0.1)
    assert cfg_read(gpu, READY, 4) & 3 == VALID | ACTIVE


@pytest.mark.parametrize("delay", [-1.0, math.nan])
def test_bad_valid_delay(tmp_path: Path, delay: float) -> None:
    with pytest.raises(ValueError, match="valid_delay"):
        SyntheticGpu(cxl_profile(), tmp_path, valid_delay=delay)


def test_range_size_low_reserved_bits_are_zero(tmp_path: Path) -> None:
    # 4 GiB + 64 KiB (a size the config accepts): only bits 31:28 of the size may show.
    gpu = SyntheticGpu(cxl_profile(memory_size=4 * GIB + (64 << 10)), tmp_path)
    assert cfg_read(gpu, READY, 4) & 0x0FFF_0000 == 0
    gpu.shutdown()
