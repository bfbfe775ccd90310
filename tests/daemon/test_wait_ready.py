"""``wait_ready``: the probe-time wait comes from the variant (spec nvgrace-gpu.md §7.1, §7.3)."""

from __future__ import annotations

import errno
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import pytest
import trio
import trio.testing

from backends.device import CONFIG_REGION_INDEX, DeviceError
from backends.synthetic import SyntheticGpu, get_profile
from backends.synthetic.capabilities import CXL_DVSEC_OFFSET
from backends.synthetic.profiles import GIB
from vgpud.config import DeviceConfig
from vgpud.daemon import StartupError, wait_ready
from vgpud.devices import BuiltDevice


class Log:
    """Records ``log.info`` events."""

    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []

    def info(self, event: str, **fields: Any) -> None:
        self.events.append((event, fields))


class Build(Protocol):
    def __call__(self, *, cxl: bool, code: int = 3, ready_delay: float = 0.0) -> BuiltDevice: ...


@pytest.fixture
def build(tmp_path: Path) -> Iterator[Build]:
    made: list[BuiltDevice] = []

    def make(*, cxl: bool, code: int = 3, ready_delay: float = 0.0) -> BuiltDevice:
        profile = get_profile("gb200").with_overrides(
            memory_size=8 * GIB, cxl_dvsec=cxl, cxl_mem_active_timeout=code
        )
        # The device's clock is trio's, so the autojump clock moves its readiness too.
        gpu = SyntheticGpu(
            profile, tmp_path / str(len(made)), ready_delay=ready_delay, clock=trio.current_time
        )
        built = BuiltDevice("gpu0", gpu, gpu, DeviceConfig("gpu0", None))
        made.append(built)
        return built

    yield make
    for built in made:
        built.release()


async def test_legacy_timeout_is_30_s(build: Build, autojump_clock: trio.testing.MockClock) -> None:
    built = build(cxl=False, ready_delay=math.inf)
    start = trio.current_time()
    with pytest.raises(StartupError, match=r"not ready after 30 s \(readiness registers"):
        await wait_ready(built, Log())
    assert trio.current_time() - start == 30.0


async def test_legacy_ready(build: Build, autojump_clock: trio.testing.MockClock) -> None:
    log = Log()
    await wait_ready(build(cxl=False, ready_delay=7.5), log)
    assert log.events == [
        ("waiting for the device to become ready", {}),
        ("device ready", {"polls": 9}),
    ]


async def test_cxl_waits_past_30_s(build: Build, autojump_clock: trio.testing.MockClock) -> None:
    log = Log()
    built = build(cxl=True, code=4, ready_delay=100.0)
    assert not built.ready_now()  # BuiltDevice.ready_now takes the CXL path too
    start = trio.current_time()
    await wait_ready(built, log)
    assert trio.current_time() - start == 100.0
    assert log.events[-1] == ("device ready", {"polls": 101})
    assert built.ready_now()


async def test_cxl_timeout_from_the_register(
    build: Build, autojump_clock: trio.testing.MockClock
) -> None:
    built = build(cxl=True, code=3, ready_delay=math.inf)
    start = trio.current_time()
    with pytest.raises(StartupError, match=r"after 65 s \(CXL DVSEC: memory never became active"):
        await wait_ready(built, Log())
    assert trio.current_time() - start == 65.0  # VALID seen at 1 s, then 64 s


async def test_cxl_gone_is_enodev(
    build: Build, autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    built = build(cxl=True)
    real_read = built.backend.region_read

    def gone_after_probe(index: int, offset: int, count: int) -> bytes:
        if index == CONFIG_REGION_INDEX and offset == CXL_DVSEC_OFFSET + 0x1C:
            return b"\xff" * count  # found by the lookup, then reads all-ones
        return real_read(index, offset, count)

    monkeypatch.setattr(built.backend, "region_read", gone_after_probe)
    with pytest.raises(DeviceError) as err:
        await wait_ready(built, Log())
    assert err.value.errno == errno.ENODEV
