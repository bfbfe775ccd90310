"""Getting the daemon out of a write to an interrupt eventfd that a hostile VMM made block.

The VMM shares the open file description of every eventfd it hands over, so the O_NONBLOCK
flag the daemon sets (backends/irq.py ``adopt_eventfds``) is the VMM's to clear again, and
with the counter at its maximum a write then blocks. ``signal_eventfd`` checks the flag right
before each write, but a VMM clearing it in a loop wins the moment between that check and
the write often enough; the blocked write would stop the event loop, and with it every
device of the daemon, for as long as the VMM liked. (There is no write that cannot block:
``pwritev2(RWF_NOWAIT)`` is EOPNOTSUPP on an eventfd, and an eventfd cannot be opened
afresh through /proc to get a description of our own: ENXIO.)

So each write is *guarded*: the writing thread notes the fd and a serial number (two
dictionary operations, no syscall), and a watchdog thread that finds the same write still
under way one period later, its thread asleep in write(2) on that fd, drains the counter
through a duplicate of the fd. A read makes
room, the kernel wakes the writer, and its write completes: the daemon stops for at most two
periods instead of for good. The read swallows the interrupts the counter held; the VMM that
blocked the write has only itself to blame, and the write just made leaves one pending.

The duplicate is safe to make: the fd cannot have been closed and its number reused while
the write is still noted, because the writing thread is the one that closes it and it
clears the note as soon as the write returns; so the note is checked again once the
duplicate is made, and a changed note drops the duplicate unused. The drain runs on a thread
of its own and never blocks the watchdog: the VMM can make the duplicate's read block too
(it clears the flag again and empties the counter first).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import threading

PERIOD = 0.25  # seconds between the watchdog's looks: a blocked write lasts at most two


class StallBreaker:
    """Drains the eventfd of a guarded write that has not returned within a period."""

    def __init__(self, period: float = PERIOD) -> None:
        self.period = period
        self.drained = 0  # drains started (for tests)
        self.looks = 0  # the watchdog's looks so far (for tests)
        self.serials = itertools.count(1)
        self.writing: dict[int, tuple[int, int]] = {}  # native thread id -> (serial, fd)
        self._draining: set[int] = set()  # fds a drain thread is reading
        self._lock = threading.Lock()  # guards the watchdog's start and _draining
        self._thread: threading.Thread | None = None

    def forget_thread(self) -> None:
        """In a forked child, which has no watchdog thread: the next write starts one."""
        self._lock = threading.Lock()
        self._thread = None
        self._draining.clear()
        self.writing.clear()

    @property
    def watching(self) -> bool:
        return self._thread is not None

    def start(self) -> None:
        """Start the watchdog (once): before the first guarded write."""
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._watch, name="vgpud-eventfd-watchdog", daemon=True
                )
                self._thread.start()

    def begin(self, fd: int) -> int:
        """A write to the VMM's eventfd ``fd`` is about to start on this thread; pass what
        this returns to :meth:`end` once it has returned. (``backends.irq.signal_eventfd``
        does the same inline: a method call each side cost more than the write.)"""
        thread = threading.get_native_id()
        self.writing[thread] = (next(self.serials), fd)
        return thread

    def end(self, thread: int) -> None:
        del self.writing[thread]

    def _watch(self) -> None:
        seen: dict[int, tuple[int, int]] = {}
        stop = threading.Event()  # never set: the thread lives as long as the process
        while not stop.wait(self.period):
            self.looks += 1
            now = dict(self.writing)
            for thread, note in now.items():
                if seen.get(thread) == note and _blocked_in_write(thread, note[1]):
                    self._drain(thread, note)
            seen = now

    def _drain(self, thread: int, note: tuple[int, int]) -> None:
        fd = note[1]
        with self._lock:
            if fd in self._draining:
                return  # a drain of it is under way (blocked by the VMM, perhaps)
            try:
                copy = os.dup(fd)
            except OSError:
                return
            if self.writing.get(thread) != note:
                os.close(copy)  # the write returned meanwhile: ``fd`` may be another file
                return
            self._draining.add(fd)
        threading.Thread(
            target=self._read, args=(fd, copy), name="vgpud-eventfd-drain", daemon=True
        ).start()

    def _read(self, fd: int, copy: int) -> None:
        try:
            os.set_blocking(copy, False)
            self.drained += 1  # before the read: the write it frees may be looked at at once
            with contextlib.suppress(OSError):
                os.eventfd_read(copy)
        finally:
            os.close(copy)
            with self._lock:
                self._draining.discard(fd)


# write(2)'s number per machine, to see a thread asleep in it (/proc/<tid>/syscall).
_WRITE_SYSCALL = {"x86_64": "1", "aarch64": "64"}.get(os.uname().machine)


def _blocked_in_write(thread: int, fd: int) -> bool:
    """Whether thread ``thread`` (native id) sleeps in write(2) on ``fd``. A write that is
    merely slow (its thread preempted on a loaded host) must not be drained: that would eat
    interrupts of a VMM that did nothing wrong. /proc shows a thread's system call only
    while it is blocked in one ("running" otherwise); where write(2)'s number is not known
    here, the note alone decides."""
    if _WRITE_SYSCALL is None:
        return True
    try:
        with open(f"/proc/self/task/{thread}/syscall", encoding="ascii") as status:
            fields = status.read().split()
    except OSError:
        return False
    return len(fields) > 1 and fields[0] == _WRITE_SYSCALL and int(fields[1], 16) == fd


BREAKER = StallBreaker()  # one for the process: each writing thread has its own note
# A fork (the upgrade's stand-in, vgpud/stand_in.py) serves on, so it must be watched too.
os.register_at_fork(after_in_child=BREAKER.forget_thread)
