"""Probe-time facts: DVSEC -> has_mig_hw_bug (spec §2.2) and the readiness poll (§7.1)."""

from __future__ import annotations

import errno
import math
from pathlib import Path

import pytest

from backends.device import DeviceError, RegionFlags, RegionInfo
from backends.synthetic import SyntheticGpu, get_profile
from backends.synthetic.capabilities import DVSEC_OFFSET, MSIX_OFFSET, PCIE_OFFSET, PM_OFFSET
from tests.backends.helpers import FakeClock, cfg_write
from vgpud.variant import POLL_QUANTUM, POLL_TIMEOUT, ReadinessWait, device_ready, has_mig_hw_bug
from vgpud.variant.probe import find_capability, find_dvsec


@pytest.mark.parametrize(
    ("profile", "bitmap", "bug"),
    [
        ("gh200", 0x0000, True),
        ("gh200", 0x0002, True),  # other bits do not matter
        ("gh200", None, True),  # no DVSEC at all
        ("gb200", 0x0001, False),
        ("gb300", 0xFFFF, False),
    ],
)
def test_mig_bug_from_dvsec(tmp_path: Path, profile: str, bitmap: int | None, bug: bool) -> None:
    gpu = SyntheticGpu(get_profile(profile).with_overrides(dvsec_bitmap=bitmap), tmp_path)
    assert has_mig_hw_bug(gpu) is bug
    assert find_dvsec(gpu, 0x10DE, 3) == (None if bitmap is None else DVSEC_OFFSET)
    # The DSN (extended cap ID 3) is not mistaken for the DVSEC with DVSEC ID 3.
    assert find_dvsec(gpu, 0x10DE, 4) is None
    assert find_dvsec(gpu, 0x1E98, 0) is None


def test_find_capability(tmp_path: Path) -> None:
    gpu = SyntheticGpu(get_profile("gh200"), tmp_path)
    assert find_capability(gpu, 0x01) == PM_OFFSET
    assert find_capability(gpu, 0x10) == PCIE_OFFSET
    assert find_capability(gpu, 0x11) == MSIX_OFFSET
    assert find_capability(gpu, 0x09) is None  # no vendor-specific capability


class _Looping(SyntheticGpu):
    """Config space whose capability list points back at itself (hostile firmware)."""

    def region_read(self, index: int, offset: int, count: int) -> bytes:
        data = super().region_read(index, offset, count)
        if index == 7 and offset == PM_OFFSET and count == 2:
            return bytes((data[0], PM_OFFSET))  # next -> itself
        return data


def test_find_capability_ends_on_a_looping_list(tmp_path: Path) -> None:
    gpu = _Looping(get_profile("gh200"), tmp_path)
    assert find_capability(gpu, 0x01) == PM_OFFSET
    assert find_capability(gpu, 0x10) is None  # 48 hops, like the kernel's walk


def test_find_capability_without_a_list(tmp_path: Path) -> None:
    gpu = SyntheticGpu(get_profile("gh200"), tmp_path)
    gpu.config.data[0x06] &= ~0x10  # STATUS.CAP_LIST clear (read-only to writes)
    assert find_capability(gpu, 0x01) is None
    cfg_write(gpu, 0x06, 2, 0xFFFF)  # RW1C status bits; CAP_LIST stays as it was
    assert find_capability(gpu, 0x01) is None


def test_poll_counts_and_timeout(tmp_path: Path) -> None:
    clock = FakeClock()
    gpu = SyntheticGpu(get_profile("gb200"), tmp_path, ready_delay=math.inf, clock=clock)
    wait = ReadinessWait(lambda: device_ready(gpu), clock=clock)
    with pytest.raises(DeviceError) as err:
        while (delay := wait.poll()) is not None:
            assert delay == POLL_QUANTUM
            clock.advance(delay)
    assert err.value.errno == errno.ETIME
    assert wait.polls == int(POLL_TIMEOUT / POLL_QUANTUM) + 1  # ~31 checks, as the kernel


def test_poll_succeeds_when_ready(tmp_path: Path) -> None:
    clock = FakeClock()
    gpu = SyntheticGpu(get_profile("gh200"), tmp_path, ready_delay=7.5, clock=clock)
    wait = ReadinessWait(lambda: device_ready(gpu), clock=clock)
    while (delay := wait.poll()) is not None:
        clock.advance(delay)
    assert wait.polls == 9  # t = 0..8


def test_last_poll_delay_is_clipped_to_the_deadline() -> None:
    clock = FakeClock()
    wait = ReadinessWait(lambda: False, clock=clock, timeout=2.5)
    assert wait.poll() == 1.0
    clock.advance(2.0)
    assert wait.poll() == 0.5


class _FakeConfig:
    """Just enough of a VfioDevice for find_dvsec: a config region of ``size`` bytes."""

    def __init__(self, size: int = 4096) -> None:
        self.cfg = bytearray(size)

    def put(self, offset: int, value: int) -> None:
        self.cfg[offset : offset + 4] = value.to_bytes(4, "little")

    def region_info(self, index: int) -> RegionInfo:
        return RegionInfo(index, len(self.cfg), RegionFlags.READ)

    def region_read(self, index: int, offset: int, count: int) -> bytes:
        if offset < 0 or offset + count > len(self.cfg):
            raise DeviceError(errno.EINVAL, "outside config space")
        return bytes(self.cfg[offset : offset + count])


def test_find_dvsec_on_a_256_byte_config_space() -> None:
    assert find_dvsec(_FakeConfig(256), 0x10DE, 3) is None  # type: ignore[arg-type]


def test_find_dvsec_stops_at_an_all_ones_header() -> None:
    device = _FakeConfig()
    device.put(0x100, 0xFFFFFFFF)  # what a vanished device reads
    assert find_dvsec(device, 0x10DE, 3) is None  # type: ignore[arg-type]


def test_find_dvsec_does_not_follow_a_next_pointer_below_0x100() -> None:
    device = _FakeConfig()
    device.put(0x100, 0x0003 | 1 << 16 | 0x80 << 20)  # DSN whose next points into 0x40-0xFF
    device.put(0x80, 0x0023 | 1 << 16)  # a DVSEC-looking header there...
    device.put(0x84, 0x10DE)
    device.put(0x88, 3)  # ...with the NVIDIA vendor and ID 3: must not be found
    assert find_dvsec(device, 0x10DE, 3) is None  # type: ignore[arg-type]
