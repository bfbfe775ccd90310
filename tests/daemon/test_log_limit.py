"""The rate limit on lines a client can cause at will (vgpud/log_limit.py)."""

from __future__ import annotations

import structlog.testing

from tests.backends.helpers import FakeClock
from vgpud.log_limit import LogLimiter


def test_each_kind_of_line_has_its_own_bucket_and_drops_are_reported() -> None:
    clock = FakeClock()
    limiter = LogLimiter(clock=clock, burst=3, per_second=1.0)
    log = structlog.get_logger()
    with structlog.testing.capture_logs() as logs:
        written = [limiter.log(log, "info", "device reset") for _ in range(10)]
        limiter.log(log, "warning", "device refused a DMA unmap", iova=0)  # a bucket of its own
        limiter.log_in("a", log, "info", "same event")
        limiter.log_in("b", log, "info", "same event")
        clock.now += 1.0
        limiter.log(log, "info", "device reset", flr=False)
    assert written == [True] * 3 + [False] * 7
    assert [(e["event"], e["log_level"]) for e in logs] == [
        *[("device reset", "info")] * 3,
        ("device refused a DMA unmap", "warning"),
        ("same event", "info"),
        ("same event", "info"),
        ("device reset", "info"),
    ]
    assert logs[-1] == {
        "event": "device reset",
        "log_level": "info",
        "flr": False,
        "suppressed": 7,
    }
    assert all("suppressed" not in e for e in logs[:-1])
