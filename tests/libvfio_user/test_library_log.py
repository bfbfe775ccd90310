"""libvfio-user's log lines are rate limited (vgpud/libvfio_user/library_log.py); no library
needed: the limiter only sees levels and text."""

from __future__ import annotations

import structlog.testing

from tests.backends.helpers import FakeClock
from vgpud.libvfio_user.library_log import LibraryLog
from vgpud.log_limit import LogLimiter

LOG_ERR, LOG_INFO, LOG_DEBUG = 3, 6, 7


def test_a_flood_is_cut_to_the_burst_then_the_rate_and_the_drops_are_counted() -> None:
    clock = FakeClock()
    limited = LibraryLog(structlog.get_logger(), LogLimiter(clock=clock, burst=5, per_second=2.0))
    with structlog.testing.capture_logs() as logs:
        for i in range(1000):
            limited.emit(LOG_ERR, f"cmd 9 failed {i}")
        clock.now += 1.0  # two more lines' worth
        limited.emit(LOG_ERR, "after a second")
        limited.emit(LOG_ERR, "and one more")
        limited.emit(LOG_ERR, "dropped")
    assert [e["message"] for e in logs] == [
        *(f"cmd 9 failed {i}" for i in range(5)),
        "after a second",
        "and one more",
    ]
    assert all(e["log_level"] == "warning" for e in logs)
    assert logs[5]["suppressed"] == 995
    assert "suppressed" not in logs[6]


def test_levels_have_buckets_of_their_own_and_debug_is_not_limited() -> None:
    limited = LibraryLog(
        structlog.get_logger(), LogLimiter(clock=FakeClock(), burst=1, per_second=0.0)
    )
    with structlog.testing.capture_logs() as logs:
        limited.emit(LOG_ERR, "error")
        limited.emit(LOG_ERR, "error again")
        limited.emit(LOG_INFO, "info")
        for _ in range(50):
            limited.emit(LOG_DEBUG, "debug")
    assert [(e["log_level"], e["message"]) for e in logs] == [
        ("warning", "error"),
        ("info", "info"),
        *[("debug", "debug")] * 50,
    ]


def test_routine_info_lines_are_debug_lines_and_warnings_stay() -> None:
    """vfu_destroy_ctx's "vfu_reset_ctx: Cannot send after transport endpoint shutdown" at
    every stop is the library's info line, not a failure."""
    library = LibraryLog(structlog.get_logger(), LogLimiter(clock=FakeClock()))
    with structlog.testing.capture_logs() as logs:
        with library.routine():
            library.emit(LOG_INFO, "vfu_reset_ctx: Cannot send after transport endpoint shutdown")
            library.emit(LOG_ERR, "a real failure")
        library.emit(LOG_INFO, "after")
    assert [(e["log_level"], e["message"]) for e in logs] == [
        ("debug", "vfu_reset_ctx: Cannot send after transport endpoint shutdown"),
        ("warning", "a real failure"),
        ("info", "after"),
    ]


def test_the_context_reset_at_each_disconnect_is_a_debug_line() -> None:
    """Every client that leaves made the library log "vfu_reset_ctx: No message of desired
    type" at info, next to the daemon's own "client disconnected"."""
    library = LibraryLog(structlog.get_logger(), LogLimiter(clock=FakeClock()))
    with structlog.testing.capture_logs() as logs:
        library.emit(LOG_INFO, "vfu_reset_ctx: No message of desired type")
        library.emit(LOG_INFO, "something else")
    assert [(e["log_level"], e["message"]) for e in logs] == [
        ("debug", "vfu_reset_ctx: No message of desired type"),
        ("info", "something else"),
    ]
