"""libvfio-user's own log lines, forwarded to structlog with a rate limit.

The library logs at LOG_ERR (a warning here) whatever a client makes fail: "msg...: cmd 9
failed", "out of bounds region access", "no fd for interrupt N". A guest reaches those
with ordinary accesses (a BAR read while its GPU is in D3hot or still training after a
reset, a doorbell to a vector its driver has not wired), so without a limit one guest could
make the daemon write a line per trapped access, tens of thousands a second, into the
journal every other device shares (found by a device fuzz: 47-55k warning lines per 40k
operations). The Python engine logs such refusals at debug.

So each level has a bucket of the device's :class:`~vgpud.log_limit.LogLimiter`. Library
debug lines are not limited: they only appear when asked for (``library_log_level``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from vgpud.libvfio_user.ffi import LOG_DEBUG
from vgpud.log_limit import LogLimiter

# The library's info line each time it resets the context: when a client leaves ("...: No
# message of desired type", its strerror(ENOMSG)) and at every stop. The daemon's own
# "client disconnected" and "stopped" lines say what happened, so it is a debug line.
_CONTEXT_RESET = "vfu_reset_ctx:"
# syslog levels libvfio-user uses (LOG_EMERG 0 .. LOG_DEBUG 7) -> structlog method.
_METHODS = {0: "error", 1: "error", 2: "error", 3: "warning", 4: "warning", 5: "info", 6: "info"}


class LibraryLog:
    """Where the engine's ``vfu_log_fn_t`` callback sends each line."""

    def __init__(self, log: Any, limiter: LogLimiter) -> None:
        self._log = log
        self._limiter = limiter
        self._routine = False

    @contextlib.contextmanager
    def routine(self) -> Iterator[None]:
        """Within: the library's info lines are debug lines. For ``vfu_destroy_ctx``, which
        says at every stop that it reset the context because of the shutdown, in words that
        read like a failure ("vfu_reset_ctx: Cannot send after transport endpoint shutdown",
        its strerror(ESHUTDOWN)); the daemon's own "stopped" line says what happened.
        Warnings and errors keep their level."""
        self._routine = True
        try:
            yield
        finally:
            self._routine = False

    def emit(self, level: int, text: str) -> None:
        """Log one library line at the structlog level matching ``level``, within limits."""
        method = _METHODS.get(level, "info" if level < LOG_DEBUG else "debug")
        if method == "info" and (self._routine or text.startswith(_CONTEXT_RESET)):
            method = "debug"
        if method == "debug":
            self._log.debug("libvfio-user", message=text)
            return
        self._limiter.log_in(
            f"libvfio-user {method}", self._log, method, "libvfio-user", message=text
        )
