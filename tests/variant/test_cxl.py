"""The v7.2 CXL DVSEC readiness path: detection (§2.3), probe wait (§7.3), gate (§7.4)."""

from __future__ import annotations

import errno
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

import pytest

from backends.device import BAR4_REGION_INDEX, CONFIG_REGION_INDEX, DeviceError
from backends.synthetic import SyntheticGpu, get_profile
from backends.synthetic.capabilities import CXL_DVSEC_OFFSET
from backends.synthetic.profiles import GIB
from tests.backends.helpers import FakeClock, cfg_write
from vgpud.variant import (
    POLL_TIMEOUT,
    CxlReadinessWait,
    NvgraceVariant,
    ProbeWait,
    ReadinessWait,
    device_ready,
    find_cxl_dvsec,
    probe_wait,
)
from vgpud.variant.probe import cxl_active_timeout

TIMEOUTS = {0: 1.0, 1: 4.0, 2: 16.0, 3: 64.0, 4: 256.0, 5: 256.0, 6: 256.0, 7: 256.0}


class VanishingGpu(SyntheticGpu):
    """A GPU that can drop off the bus: every config read then returns all-ones."""

    gone = False

    def region_read(self, index: int, offset: int, count: int) -> bytes:
        if self.gone and index == CONFIG_REGION_INDEX:
            return b"\xff" * count
        return super().region_read(index, offset, count)


class CxlGpuFactory(Protocol):
    """Type of the ``make_gpu`` fixture (keyword-only)."""

    def __call__(
        self,
        *,
        code: int = 3,
        ready_delay: float = 0.0,
        valid_delay: float | None = None,
        cxl: bool = True,
    ) -> VanishingGpu: ...


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def make_gpu(tmp_path: Path, clock: FakeClock) -> Iterator[CxlGpuFactory]:
    made: list[SyntheticGpu] = []

    def make(
        *,
        code: int = 3,
        ready_delay: float = 0.0,
        valid_delay: float | None = None,
        cxl: bool = True,
    ) -> VanishingGpu:
        profile = get_profile("gb200").with_overrides(
            memory_size=8 * GIB, cxl_dvsec=cxl, cxl_mem_active_timeout=code
        )
        gpu = VanishingGpu(
            profile,
            tmp_path / f"gpu{len(made)}",
            ready_delay=ready_delay,
            valid_delay=valid_delay,
            clock=clock,
        )
        made.append(gpu)
        return gpu

    yield make
    for gpu in made:
        gpu.shutdown()


def open_variant(gpu: SyntheticGpu, clock: FakeClock) -> NvgraceVariant:
    variant = NvgraceVariant(gpu, clock=clock)
    variant.open()
    cfg_write(variant, 0x04, 2, 0x0002)  # COMMAND.MEM, as a guest driver would
    return variant


def bar4_read(variant: NvgraceVariant) -> int:
    """errno of a fake-BAR read, 0 when it succeeded."""
    try:
        variant.region_read(BAR4_REGION_INDEX, 0, 4)
    except DeviceError as exc:
        return exc.errno
    return 0


def run(wait: ProbeWait, clock: FakeClock) -> None:
    """Drive a wait with the fake clock, as the daemon does with trio.sleep."""
    while (delay := wait.poll()) is not None:
        assert 0 < delay <= 1.0
        clock.advance(delay)


# -- detection (§2.3) --------------------------------------------------------------------------


def test_detection(make_gpu: CxlGpuFactory, clock: FakeClock) -> None:
    cxl = make_gpu()
    plain = make_gpu(cxl=False)
    assert find_cxl_dvsec(cxl) == CXL_DVSEC_OFFSET
    assert find_cxl_dvsec(plain) is None
    assert open_variant(cxl, clock).cxl_dvsec == CXL_DVSEC_OFFSET
    assert open_variant(plain, clock).cxl_dvsec is None
    assert isinstance(probe_wait(cxl, clock=clock), CxlReadinessWait)
    assert isinstance(probe_wait(plain, clock=clock), ReadinessWait)


@pytest.mark.parametrize(("code", "seconds"), TIMEOUTS.items())
def test_timeout_encoding(code: int, seconds: float) -> None:
    # 1 s * 4^min(t, 4); only bits 15:13 count.
    assert cxl_active_timeout(code << 13) == seconds
    assert cxl_active_timeout(code << 13 | 0xFFFF_1FFF) == seconds


# -- the test (§7.3) ---------------------------------------------------------------------------


def test_test_reads_the_dvsec_not_bar0(make_gpu: CxlGpuFactory, clock: FakeClock) -> None:
    # BAR0 registers read 0xFF at once, but MEM_INFO_VALID never comes: not ready.
    gpu = make_gpu(valid_delay=math.inf)
    variant = open_variant(gpu, clock)
    assert not device_ready(gpu)
    assert not variant.ready_now()
    # And the other way round: ACTIVE and VALID set is ready.
    ready = make_gpu()
    assert device_ready(ready)
    assert open_variant(ready, clock).ready_now()


def test_valid_alone_is_not_ready(make_gpu: CxlGpuFactory, clock: FakeClock) -> None:
    gpu = make_gpu(ready_delay=5.0)
    clock.advance(1.0)  # VALID, not ACTIVE
    assert not device_ready(gpu)
    clock.advance(4.0)
    assert device_ready(gpu)


def test_all_ones_is_enodev(make_gpu: CxlGpuFactory, clock: FakeClock) -> None:
    gpu = make_gpu()
    variant = open_variant(gpu, clock)
    wait = probe_wait(gpu, clock=clock)
    gpu.gone = True
    for check in (variant.ready_now, wait.poll):
        with pytest.raises(DeviceError) as err:
            check()
        assert err.value.errno == errno.ENODEV
    assert bar4_read(variant) == errno.ENODEV


# -- the probe-time wait (§7.3) ----------------------------------------------------------------


def test_ready_at_once(make_gpu: CxlGpuFactory, clock: FakeClock) -> None:
    wait = probe_wait(make_gpu(), clock=clock)
    assert wait.poll() is None
    assert wait.polls == 1


def test_valid_never_seen_is_etime_after_one_second(
    make_gpu: CxlGpuFactory, clock: FakeClock
) -> None:
    start = clock.now
    wait = probe_wait(make_gpu(ready_delay=math.inf, valid_delay=math.inf), clock=clock)
    assert wait.deadline == start + 1.0
    with pytest.raises(DeviceError) as err:
        run(wait, clock)
    assert err.value.errno == errno.ETIME
    assert "never became valid" in err.value.message
    assert clock.now == start + 1.0
    assert wait.polls == 2  # t = 0, 1


@pytest.mark.parametrize(("code", "seconds"), TIMEOUTS.items())
def test_active_never_seen_is_etime_at_valid_plus_timeout(
    make_gpu: CxlGpuFactory, clock: FakeClock, code: int, seconds: float
) -> None:
    start = clock.now
    wait = probe_wait(make_gpu(code=code, ready_delay=math.inf), clock=clock)
    with pytest.raises(DeviceError) as err:
        run(wait, clock)
    assert err.value.errno == errno.ETIME
    assert "never became active" in err.value.message
    # VALID (0.25 s) is first seen by the poll at t = 1; the budget starts there.
    assert clock.now == start + 1.0 + seconds
    assert wait.polls == 2 + int(seconds)  # t = 0, 1, ..., 1 + seconds


def test_deadline_moves_only_once(make_gpu: CxlGpuFactory, clock: FakeClock) -> None:
    gpu = make_gpu(code=1, ready_delay=math.inf)
    start = clock.now
    wait = probe_wait(gpu, clock=clock)
    clock.advance(0.5)
    assert wait.poll() == 1.0  # VALID seen at 0.5: deadline 4.5
    assert wait.deadline == start + 4.5
    gpu.reset()  # VALID drops and comes back: the budget does not restart
    clock.advance(0.5)
    assert wait.poll() == 1.0
    assert wait.deadline == start + 4.5
    clock.advance(3.49)
    assert wait.poll() == pytest.approx(0.01)
    clock.advance(0.01)
    with pytest.raises(DeviceError) as err:
        wait.poll()
    assert err.value.errno == errno.ETIME


def test_sleep_is_clipped_to_the_deadline(make_gpu: CxlGpuFactory, clock: FakeClock) -> None:
    wait = probe_wait(make_gpu(ready_delay=math.inf, valid_delay=math.inf), clock=clock)
    clock.advance(0.75)
    assert wait.poll() == 0.25


def test_ready_within_the_budget(make_gpu: CxlGpuFactory, clock: FakeClock) -> None:
    # 100 s: far beyond the legacy 30 s, inside the 256 s of code 4.
    wait = probe_wait(make_gpu(code=4, ready_delay=100.0), clock=clock)
    run(wait, clock)
    assert wait.polls == 101  # t = 0..100


def test_legacy_wait_unchanged(make_gpu: CxlGpuFactory, clock: FakeClock) -> None:
    start = clock.now
    wait = probe_wait(make_gpu(cxl=False, ready_delay=math.inf), clock=clock)
    with pytest.raises(DeviceError) as err:
        run(wait, clock)
    assert err.value.errno == errno.ETIME
    assert clock.now == start + POLL_TIMEOUT
    assert wait.polls == 31


# -- the post-reset gate (§7.4) ----------------------------------------------------------------


def test_gate_eagain_then_ready(make_gpu: CxlGpuFactory, clock: FakeClock) -> None:
    variant = open_variant(make_gpu(ready_delay=3.0), clock)
    assert bar4_read(variant) == errno.EAGAIN  # armed by open(); one test, no blocking
    clock.advance(3.0)
    assert bar4_read(variant) == 0
    assert not variant.gate_armed
    cfg_write(variant, 0x04, 2, 0x0000)  # as QEMU's vfio_pci_pre_reset does
    variant.reset()  # config is kept across it (vfio-pci-core's save/restore)
    # nvgrace_gpu_read_mem runs the CXL wait before check_device_ready's memory-enable
    # test, so with COMMAND.MEM clear the GPU's readiness is what answers first.
    assert bar4_read(variant) == errno.EAGAIN
    clock.advance(3.0)
    assert bar4_read(variant) == errno.EIO  # ready now: COMMAND.MEM decides (§7.4 step 2)
    assert variant.gate_armed
    cfg_write(variant, 0x04, 2, 0x0002)
    assert bar4_read(variant) == 0
    assert not variant.gate_armed


@pytest.mark.parametrize(("code", "seconds"), [(0, 1.0), (2, 16.0), (4, 256.0), (7, 256.0)])
def test_gate_etime_after_the_cxl_budget(
    make_gpu: CxlGpuFactory, clock: FakeClock, code: int, seconds: float
) -> None:
    variant = open_variant(make_gpu(code=code, ready_delay=math.inf), clock)
    clock.advance(0.5)
    assert bar4_read(variant) == errno.EAGAIN  # starts the wait, sees VALID: 0.5 + t
    # Not the legacy 30 s: a long budget keeps answering EAGAIN past it.
    clock.advance(seconds - 0.01)
    assert bar4_read(variant) == errno.EAGAIN
    clock.advance(0.01)
    assert bar4_read(variant) == errno.ETIME
    assert variant.gate_armed
    # The ETIME ended that wait; the next access starts another, as the kernel's next read
    # would (nvgrace_gpu_wait_device_ready_cxl sets its deadline on entry).
    assert bar4_read(variant) == errno.EAGAIN
    clock.advance(seconds)
    assert bar4_read(variant) == errno.ETIME


def test_gate_etime_without_valid(make_gpu: CxlGpuFactory, clock: FakeClock) -> None:
    # The BAR0 registers read ready, which the CXL path does not look at.
    variant = open_variant(make_gpu(valid_delay=math.inf), clock)
    clock.advance(0.99)
    assert bar4_read(variant) == errno.EAGAIN  # the 1 s VALID budget starts here
    clock.advance(0.99)
    assert bar4_read(variant) == errno.EAGAIN
    clock.advance(0.01)
    assert bar4_read(variant) == errno.ETIME


def test_gate_budget_counts_from_the_first_access(
    make_gpu: CxlGpuFactory, clock: FakeClock
) -> None:
    # VALID comes 1.5 s after the reset, the first access at 1.2 s: the kernel's wait,
    # entered at 1.2 s, has until 2.2 s to see VALID, so this is not a timeout.
    gpu = make_gpu(code=0, ready_delay=3.0, valid_delay=1.5)
    variant = open_variant(gpu, clock)
    clock.advance(3.0)
    assert bar4_read(variant) == 0
    variant.reset()
    cfg_write(variant, 0x04, 2, 0x0002)
    clock.advance(1.2)
    assert bar4_read(variant) == errno.EAGAIN
    clock.advance(0.3)
    assert bar4_read(variant) == errno.EAGAIN  # VALID seen at 1.5 s: 1 s more for ACTIVE
    clock.advance(1.5)
    assert bar4_read(variant) == 0


def test_gate_budget_restarts_with_each_reset(make_gpu: CxlGpuFactory, clock: FakeClock) -> None:
    gpu = make_gpu(code=0, ready_delay=math.inf)
    variant = open_variant(gpu, clock)
    clock.advance(5.0)
    assert bar4_read(variant) == errno.EAGAIN  # first look at 5 s: VALID, budget to 6 s
    clock.advance(1.0)
    assert bar4_read(variant) == errno.ETIME
    variant.reset()
    cfg_write(variant, 0x04, 2, 0x0002)
    assert bar4_read(variant) == errno.EAGAIN
    gpu.readiness.delay = 0.0  # the GPU finally trains
    clock.advance(0.25)  # and reports VALID (default valid_delay)
    assert bar4_read(variant) == 0
    assert not variant.gate_armed


def test_gate_enodev(make_gpu: CxlGpuFactory, clock: FakeClock) -> None:
    gpu = make_gpu(ready_delay=math.inf)
    variant = open_variant(gpu, clock)
    gpu.gone = True  # COMMAND reads all-ones too, so MEM looks set: the CXL test decides
    assert bar4_read(variant) == errno.ENODEV


def test_gate_legacy_unchanged(make_gpu: CxlGpuFactory, clock: FakeClock) -> None:
    variant = open_variant(make_gpu(cxl=False, ready_delay=math.inf), clock)
    clock.advance(5.0)
    assert bar4_read(variant) == errno.EAGAIN  # the 30 s poll starts with this access
    clock.advance(POLL_TIMEOUT - 0.1)
    assert bar4_read(variant) == errno.EAGAIN
    clock.advance(0.1)
    assert bar4_read(variant) == errno.ETIME
