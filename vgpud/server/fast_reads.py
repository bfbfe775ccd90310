"""Config-space REGION_READs answered in C, for the Python engine's sessions.

Through the Python path a config read costs about 2.5x what libvfio-user's C server takes
for it (README "Performance"), and most of that is Python's own work per message, which no
amount of tuning removed. Config space, though, needs no Python to read: the device keeps
it in memory as reads return it (:class:`backends.device.ExposesConfig`). So at each
message boundary the session lets ``fast_reads.c`` answer the plain config REGION_READs
waiting on the socket straight from that memory; it stops, having consumed nothing, at the
first message that is anything else (another command, flags, fds, a computed or emulated
register, a split or malformed message), which the Python path then reads and answers or
refuses exactly as before. Same checks, same reply bytes (tests/server/test_fast_reads.py).
After a message it declined, the session does not call it again until the Python path has
served a config read: a run of BAR0 accesses would otherwise pay for its look at each.

The other half is the wait. A same-CPU client sends its next access only once the server
sleeps, and parking a trio task costs a scheduler pass in Python. So when trio has nothing
else to do before its next timer, the C loop waits for the socket in ``poll()`` instead,
together with trio's own epoll fd: anything the loop waits for (another device's socket, a
signal, a thread's wake-up) makes that fd readable and ends the wait at once, and the next
timer bounds it. That fd is not in trio's public API; :class:`LoopWait` finds it and the
next deadline, and when it cannot (another trio, a test's mock clock) the loop never waits
and the session parks in trio as before. ``tests/server/test_fast_reads.py`` fails on a
trio that hides them, rather than letting vgpud quietly slow down.

Optional: without a C compiler at install (setup.py) there is no ``_fast_reads`` module
and every access takes the Python path; the "serving" log line says which.
"""

from __future__ import annotations

import enum
import select
from dataclasses import dataclass
from typing import Any

from backends.device import ConfigView, ExposesConfig

try:
    from vgpud.server._fast_reads import (  # type: ignore[import-not-found,unused-ignore]
        ffi,
        lib,
    )
except ImportError as exc:  # built without a C compiler (setup.py)
    ffi = lib = None
    MISSING: str | None = f"not built ({exc})"
else:
    MISSING = None

# Holes (computed ranges) the C side takes: struct vgpud_fast_reads (fast_reads.h).
MAX_HOLES = 8
# A wait in C ends at the loop's next timer or after this, whichever is first: a backstop
# should something wake trio by a path this module does not know of.
WAIT_CAP_SECONDS = 0.1
# Most reads answered per call before trio gets a checkpoint, while anything else in the
# loop is ready or its next timer due: as many messages as the transport's fairness budget
# (64 socket operations, three per message) lets through. With nothing else to run the
# call goes on: a checkpoint then costs a scheduler pass for nobody (session 26: it made
# the p99 of same-CPU config reads several times the p50).
BUDGET = 21


def view_of(device: object) -> ConfigView | None:
    """``device``'s config view (:class:`backends.device.ExposesConfig`), if it has one now."""
    return device.config_view() if isinstance(device, ExposesConfig) else None


def describe(device: object) -> str:
    """For the "serving" log line: whether ``device``'s config reads can go through C."""
    if MISSING is not None:
        return f"off: the C loop is {MISSING}"
    if view_of(device) is None:
        return "off: the device's config space is not in memory"
    return "on"


class Outcome(enum.IntEnum):
    """Why a call returned (``enum`` in fast_reads.c)."""

    WOULD_BLOCK = 0  # nothing to read, any wait over: park in trio
    NOT_OURS = 1  # a message for the Python path waits, untouched
    BUDGET = 2  # answered BUDGET reads and the loop has other work: give trio a checkpoint
    UNSENT = 3  # the last reply went out only in part: send :meth:`FastReads.unsent`
    BROKEN = 4  # the socket gave back other than it showed: close the connection


class LoopWait:
    """Trio's epoll fd and how long until its next timer, for the C loop's wait."""

    __slots__ = ("_runner", "fd")

    def __init__(self, runner: Any, fd: int) -> None:
        self._runner = runner
        self.fd = fd

    @classmethod
    def current(cls) -> LoopWait | str:
        """For the running trio loop, or why the C loop must not wait in it."""
        try:
            from trio._core import _run  # noqa: PLC0415 -- private: see the module docstring

            runner: Any = _run.GLOBAL_RUN_CONTEXT.runner
            epoll = runner.io_manager._epoll
            clock = runner.clock
            runner.runq.__len__  # noqa: B018 -- the attributes wait_ms reads
            runner.waiting_for_idle.__len__  # noqa: B018
            runner.deadlines.next_deadline  # noqa: B018
        except (ImportError, AttributeError, RuntimeError) as exc:
            return f"trio's loop is not one this knows ({exc!r})"
        if not isinstance(epoll, select.epoll):
            return f"trio's I/O is {type(epoll).__name__}, not epoll"
        if type(clock) is not _run.SystemClock:
            # A mock clock's time is not the host's: a wait in poll() would not be its.
            return f"trio runs on {type(clock).__name__}"
        return cls(runner, epoll.fileno())

    def wait_ms(self) -> int:
        """How long the C loop may wait: 0 when a task is runnable, else until the next
        timer (rounded down), at most WAIT_CAP_SECONDS."""
        runner = self._runner
        if runner.runq or runner.waiting_for_idle:  # the latter: trio.testing's idle waiters
            return 0
        left: float = runner.deadlines.next_deadline() - runner.clock.current_time()
        return int(min(left, WAIT_CAP_SECONDS) * 1000) if left > 0 else 0


@dataclass(slots=True)
class FastReadStats:
    """What the C loop did for one session (tests, benchmarks)."""

    calls: int  # into C
    served: int
    unsent: int  # replies the socket took only in part
    waits: int
    woken_by_loop: int
    timed_out: int


class FastReads:
    """The C loop's context for one session: its socket and the device's config view."""

    def __init__(self, sock_fd: int, view: ConfigView, loop: LoopWait | None) -> None:
        if lib is None:
            raise RuntimeError(f"the C fast path is {MISSING}")
        if len(view.computed) > MAX_HOLES:
            raise ValueError(f"{len(view.computed)} computed config ranges; at most {MAX_HOLES}")
        self._loop = loop
        self._ctx = ctx = ffi.new("struct vgpud_fast_reads *")
        # Exported while the session lives: the bytearray cannot be resized (moved) under C.
        self._config = ffi.from_buffer(view.data)
        ctx.sock = sock_fd
        ctx.loop_fd = loop.fd if loop is not None else -1
        ctx.config = self._config
        ctx.config_size = len(view.data)
        ctx.holes = len(view.computed)
        for i, (offset, length) in enumerate(view.computed):
            ctx.hole_start[i] = offset
            ctx.hole_end[i] = offset + length
        self.calls = 0
        self.served = 0
        self.unsent_replies = 0
        self._closed = False

    def serve(self, max_size: int, max_data: int) -> tuple[int, Outcome]:
        """Answer what config reads are waiting (see the module docstring); ``max_size``
        and ``max_data``: the connection's limits on a message and on an access. Returns
        how many were answered, and why it stopped."""
        ctx = self._ctx
        ctx.max_size = min(max_size, 0xFFFFFFFF)
        ctx.max_data = min(max_data, 0xFFFFFFFF)
        wait = self._loop.wait_ms() if self._loop is not None else 0
        served: int = lib.vgpud_serve_config_reads(ctx, BUDGET, wait)
        self.calls += 1
        self.served += served
        outcome = Outcome(ctx.why)
        if outcome is Outcome.UNSENT:
            self.unsent_replies += 1
        return served, outcome

    def unsent(self) -> bytes:
        """The rest of a reply the socket took only in part (after :attr:`Outcome.UNSENT`)."""
        return bytes(ffi.buffer(self._ctx.unsent, self._ctx.unsent_len))

    @property
    def stats(self) -> FastReadStats:
        """Counts so far."""
        ctx = self._ctx
        return FastReadStats(
            self.calls,
            self.served,
            self.unsent_replies,
            ctx.waits,
            ctx.woken_by_loop,
            ctx.timed_out,
        )

    def close(self) -> None:
        """Let go of the config memory (idempotent)."""
        if not self._closed:
            self._closed = True
            ffi.release(self._config)
