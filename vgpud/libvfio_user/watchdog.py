"""Cutting off a client that has libvfio-user blocked in the middle of a message.

Inside ``vfu_run_ctx`` libvfio-user reads a message body and sends the reply with blocking
calls (lib/tran_sock.c: ``recv`` of the body, ``sendmsg`` of the reply; only the header is
read with MSG_DONTWAIT). A client that sends a header and then nothing, or stops reading its
replies once the socket buffer is full, therefore blocks its device's thread
(:mod:`vgpud.libvfio_user.thread`) for good, and the device can take no other client. The
library cannot be told otherwise (a receive timeout on the socket would make it answer the
half-read message with EAGAIN and then parse the late body as a header).

So a thread that never touches the (not thread-safe) library watches the calls: the trio
thread numbers each ``vfu_run_ctx`` call (:meth:`StallWatchdog.enter`/:meth:`leave`, two
attribute stores, no syscall), and when the same call is still running after ``limit``
seconds the watchdog shuts the connection down through its own duplicate of the socket.
The blocked ``recv``/``sendmsg`` then returns, libvfio-user fails the message and resets the
context (ENOTCONN), and the engine attaches the next client as after any disconnect: the
device is held up for at most ``limit`` seconds instead of forever. When the daemon stops,
:meth:`StallWatchdog.cut_all` does the same at once.

No legitimate message needs that long. QEMU writes a message with one ``sendmsg``, so once a
header is in, the body is there or on its way within the same system call; it reads replies
in its "VFIO user" iothread, so a reply too large for the socket buffer (a 1 MiB
REGION_READ) waits only as long as that thread is busy; and it gives up on a reply itself
after ``x-msg-timeout``, 5 s by default (spec vfio-user.md §1 "Timeouts", §5.1, §5.2).
Hence the same 5 s: a connection blocked that long has already failed for QEMU, and a
shorter limit would risk cutting a VM off a busy host for nothing.
"""

from __future__ import annotations

import os
import socket
import threading
from typing import Any

STALL_LIMIT = 5.0  # seconds one vfu_run_ctx call may block on its client
_CHECKS_PER_LIMIT = 4  # how finely the watchdog looks (its delay is at most limit / this)


class StallWatchdog:
    """Shuts a connection down when one ``vfu_run_ctx`` call blocks on it for too long."""

    def __init__(self, name: str, log: Any, limit: float = STALL_LIMIT) -> None:
        self.limit = limit
        self.stalls = 0  # connections cut (for tests and the log)
        self._log = log
        self._call = 0  # number of the vfu_run_ctx call in progress; 0 between calls
        self._calls = 0
        self._lock = threading.Lock()  # guards _conn against the watchdog's shutdown
        self._conn: socket.socket | None = None
        self._conn_log = log
        self._stop = threading.Event()
        self._cutting_all = False  # the daemon stops: no call may block any more (cut_all)
        self._thread = threading.Thread(
            target=self._watch, name=f"vgpud-watchdog-{name}", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        self.forget()

    def guard(self, conn_fd: int, log: Any) -> None:
        """A client attached on ``conn_fd`` (libvfio-user's): keep a duplicate to cut it.

        ``log`` carries the connection's context for the line a cut logs."""
        try:
            conn = socket.socket(fileno=os.dup(conn_fd))
        except OSError as exc:
            self._log.warning("cannot watch the connection for stalls", error=exc.strerror)
            return
        with self._lock:
            old, self._conn, self._conn_log = self._conn, conn, log
        if old is not None:
            old.close()

    def forget(self) -> None:
        """The client is gone: drop the duplicate (the peer sees EOF only once it closes)."""
        with self._lock:
            conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    def enter(self) -> None:
        """The trio thread is about to call ``vfu_run_ctx``."""
        self._calls += 1
        self._call = self._calls
        if self._cutting_all:
            self._cut(self._call, stalled=False)

    def leave(self) -> None:
        """... and it returned."""
        self._call = 0

    @property
    def busy(self) -> bool:
        """Whether a ``vfu_run_ctx`` call is in progress (blocked, perhaps)."""
        return self._call != 0

    def cut_all(self) -> None:
        """The daemon stops, and the device's loop can only see that between calls: cut the
        client off now if a ``vfu_run_ctx`` call is in progress, and at :meth:`enter` for any
        later one. Any thread. (Setting the flag before looking at the call, while
        :meth:`enter` publishes the call before looking at the flag, leaves no gap: a call
        that had just begun when the stop came was let block until the stall limit.)"""
        self._cutting_all = True
        call = self._call
        if call != 0:
            self._cut(call, stalled=False)

    def _watch(self) -> None:
        period = self.limit / _CHECKS_PER_LIMIT
        seen, since = 0, 0
        while not self._stop.wait(period):
            call = self._call
            if call == 0 or call != seen:
                seen, since = call, 0
                continue
            since += 1
            if since < _CHECKS_PER_LIMIT:
                continue
            self._cut(call)
            seen, since = 0, 0

    def _cut(self, call: int, *, stalled: bool = True) -> None:
        with self._lock:
            if self._call != call or self._conn is None:
                return  # it returned meanwhile
            try:
                self._conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                return
            log = self._conn_log
        if not stalled:
            return
        self.stalls += 1
        log.warning(
            "client stalled in the middle of a message, cutting it off",
            limit_seconds=self.limit,
        )
