"""Rate limits for the log lines a client can cause as often as it likes.

Some lines are written once per request of a kind: "device reset" for every DEVICE_RESET,
a device refusing a DMA unmap, libvfio-user's own complaint about every request that
failed. The VMM is not trusted (docs/security.md: a guest may have compromised it), and it
can send such requests as fast as the socket takes them: unlimited, one VMM made the daemon
write a line per request into the journal every other device shares (measured: 200
DEVICE_RESETs, 200 info lines of ours and 200 of libvfio-user's). A guest on its own
reaches DEVICE_RESET only through a system or bus reset, far below the limit; its FLRs are
config writes the device handles without a line.

So each kind of line keeps a token bucket, as the kernel's ``printk_ratelimit`` does:
``burst`` lines at once, then ``per_second``; what is dropped is counted and reported on the
next line of that kind that passes (``suppressed=N``). Ordinary use stays far below the
limit (a guest reboot resets the device once or twice).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

BURST = 20
PER_SECOND = 2.0


@dataclass(slots=True)
class _Bucket:
    tokens: float
    last: float  # when tokens was last refilled
    suppressed: int = 0  # lines dropped since the last one logged


class LogLimiter:
    """Token buckets, one per kind of line; one limiter per device, shared by its clients
    (a VMM reconnecting does not get a fresh burst)."""

    def __init__(
        self,
        *,
        clock: Callable[[], float] = time.monotonic,
        burst: int = BURST,
        per_second: float = PER_SECOND,
    ) -> None:
        self._clock = clock
        self._burst = burst
        self._per_second = per_second
        self._buckets: dict[str, _Bucket] = {}

    def log(self, log: Any, method: str, event: str, /, **fields: Any) -> bool:
        """``log.<method>(event, **fields)`` unless the bucket of ``event`` is empty;
        whether the line was written."""
        return self.log_in(event, log, method, event, **fields)

    def log_in(self, key: str, log: Any, method: str, event: str, /, **fields: Any) -> bool:
        """:meth:`log`, counting against the bucket ``key`` (lines of one event that come
        in kinds of their own)."""
        now = self._clock()
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = _Bucket(float(self._burst), now)
        bucket.tokens = min(
            float(self._burst), bucket.tokens + (now - bucket.last) * self._per_second
        )
        bucket.last = now
        if bucket.tokens < 1:
            bucket.suppressed += 1
            return False
        bucket.tokens -= 1
        if bucket.suppressed:
            fields["suppressed"], bucket.suppressed = bucket.suppressed, 0
        getattr(log, method)(event, **fields)
        return True
