"""libvfio-user's own log lines, forwarded to structlog with a rate limit.

The library logs at LOG_ERR (a warning here) whatever a client makes fail: "msg...: cmd 9
failed", "out of bounds region access", "no fd for interrupt N". A guest reaches those
with ordinary accesses (a BAR read while its GPU is in D3hot or still training after a
reset, a doorbell to a vector its driver has not wired), so without a limit one guest could
make the daemon write a line per trapped access, tens of thousands a second, into the
journal every other device shares (found by a device fuzz: 47-55k warning lines per 40k
operations). The Python engine logs such refusals at debug.

So each level keeps a token bucket, as the kernel's printk_ratelimit does: ``burst`` lines at
once, then ``per_second``; what is dropped is counted and reported on the next line that
passes (``suppressed=N``). Library debug lines are not limited: they only appear when asked
for (``library_log_level``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from vgpud.libvfio_user.ffi import LOG_DEBUG

# syslog levels libvfio-user uses (LOG_EMERG 0 .. LOG_DEBUG 7) -> structlog method.
_METHODS = {0: "error", 1: "error", 2: "error", 3: "warning", 4: "warning", 5: "info", 6: "info"}
BURST = 20
PER_SECOND = 2.0


@dataclass(slots=True)
class _Bucket:
    tokens: float
    last: float  # when tokens was last refilled
    suppressed: int = 0  # lines dropped since the last one logged


class LibraryLog:
    """Where the engine's ``vfu_log_fn_t`` callback sends each line."""

    def __init__(
        self,
        log: Any,
        *,
        clock: Callable[[], float] = time.monotonic,
        burst: int = BURST,
        per_second: float = PER_SECOND,
    ) -> None:
        self._log = log
        self._clock = clock
        self._burst = burst
        self._per_second = per_second
        self._buckets: dict[str, _Bucket] = {}  # per structlog method

    def emit(self, level: int, text: str) -> None:
        """Log one library line at the structlog level matching ``level``, within limits."""
        method = _METHODS.get(level, "info" if level < LOG_DEBUG else "debug")
        if method == "debug":
            self._log.debug("libvfio-user", message=text)
            return
        now = self._clock()
        bucket = self._buckets.get(method)
        if bucket is None:
            bucket = self._buckets[method] = _Bucket(float(self._burst), now)
        bucket.tokens = min(
            float(self._burst), bucket.tokens + (now - bucket.last) * self._per_second
        )
        bucket.last = now
        if bucket.tokens < 1:
            bucket.suppressed += 1
            return
        bucket.tokens -= 1
        suppressed, bucket.suppressed = bucket.suppressed, 0
        if suppressed:
            getattr(self._log, method)("libvfio-user", message=text, suppressed=suppressed)
        else:
            getattr(self._log, method)("libvfio-user", message=text)
