"""An fd-aware byte stream over a UNIX socket, for trio.

``trio.SocketStream`` carries no ancillary data, and vfio-user passes file descriptors
(SCM_RIGHTS) with the first bytes of a message (spec vfio-user.md §1 "FD passing"). This is
the small stream class the design calls for: ``receive`` reads at most what the protocol
connection asks for (so a read never spans two messages and fds land on the right one) and
``send`` puts the fds on the first ``sendmsg`` of a message.

Every fd this module hands out is a new descriptor owned by the caller. Received fds are
opened with MSG_CMSG_CLOEXEC so they never leak into children (STYLE.md "Habits").
"""

from __future__ import annotations

import array
import os
import socket
from collections.abc import Sequence

import trio

_FD_SIZE = array.array("i").itemsize
# Plain ints: socket's constants are IntFlag members, and ``int & IntFlag`` runs enum code in
# Python (two flag constructions, ~1 µs per receive).
_CLOEXEC = int(socket.MSG_CMSG_CLOEXEC)
_CTRUNC = int(socket.MSG_CTRUNC)


class TransportError(ConnectionError):
    """The socket can no longer be used for this connection."""


# Socket operations that complete at once do not pass through trio's scheduler (see
# FdStream); after this many of them in a row the stream yields anyway, so a client that
# never pauses cannot starve the other devices' sessions.
FAIRNESS_BUDGET = 64


class FdStream:
    """One connected AF_UNIX SOCK_STREAM socket, with fd passing.

    Trapped guest accesses are on the VM's critical path, and going through trio's socket
    wrappers costs a scheduler pass (an epoll round) per operation: three per message. Here
    the non-blocking syscall is tried first and the task only parks on
    ``wait_readable``/``wait_writable`` when it would block, with a forced checkpoint every
    :data:`FAIRNESS_BUDGET` operations (measured in benchmarks/roundtrip.py).

    Two tasks must never interleave one socket's writes (STYLE.md "trio"): a send in progress
    makes a concurrent ``send`` raise ``trio.BusyResourceError``.
    """

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.socket = sock
        self._sending = False
        self._budget = FAIRNESS_BUDGET
        # CMSG_SPACE per fd limit (the connection's max_fds does not change).
        self._ancillary: dict[int, int] = {}

    @classmethod
    def from_trio(cls, sock: trio.socket.SocketType) -> FdStream:
        """Take over a trio socket (e.g. one returned by ``accept``)."""
        return cls(socket.socket(fileno=sock.detach()))

    def _ancillary_space(self, max_fds: int) -> int:
        space = self._ancillary.get(max_fds)
        if space is None:
            space = self._ancillary[max_fds] = socket.CMSG_SPACE(max(max_fds, 1) * _FD_SIZE)
        return space

    def receive_nowait(self, max_bytes: int, max_fds: int) -> tuple[bytes, list[int]] | None:
        """:meth:`receive` when it can complete without the scheduler, else None: the read
        would block or the fairness budget is spent, so await :meth:`receive` instead.

        A coroutine per read costs about as much as the read itself; the session's
        per-message path tries this first."""
        if self._budget <= 1:
            return None
        got = self._try_recvmsg(max_bytes, max_fds)
        if got is not None:
            self._budget -= 1
        return got

    async def wait_readable(self) -> None:
        """Until the socket has something to read (bytes, or the peer's EOF); reads nothing,
        so a task parked here holds no part of a message (a live upgrade relies on it)."""
        await trio.lowlevel.wait_readable(self.socket)
        self._budget = FAIRNESS_BUDGET

    async def receive(self, max_bytes: int, max_fds: int) -> tuple[bytes, list[int]]:
        """Read up to ``max_bytes`` and any fds sent with them; ``b""`` means EOF.

        Raises TransportError when the kernel had to drop descriptors (MSG_CTRUNC): the peer
        sent more fds than it was allowed to, and which message they belonged to is lost.
        """
        while (got := self._try_recvmsg(max_bytes, max_fds)) is None:
            await trio.lowlevel.wait_readable(self.socket)
            self._budget = FAIRNESS_BUDGET
        self._budget -= 1
        if self._budget <= 0:
            self._budget = FAIRNESS_BUDGET
            await trio.lowlevel.checkpoint()
        return got

    def _try_recvmsg(self, max_bytes: int, max_fds: int) -> tuple[bytes, list[int]] | None:
        """One non-blocking recvmsg: the bytes and fds, or None when it would block."""
        try:
            data, ancdata, msg_flags, _ = self.socket.recvmsg(
                max_bytes, self._ancillary_space(max_fds), _CLOEXEC
            )
        except BlockingIOError:
            return None
        except OSError as exc:
            raise TransportError(f"recvmsg failed: {exc.strerror}") from exc
        return data, _received_fds(ancdata, msg_flags, max_fds)

    def send_nowait(self, data: bytes) -> int:
        """Send what the socket takes now of an fd-less message, without the scheduler; the
        number of bytes sent (0 when it would block or the fairness budget is spent). Await
        :meth:`send` for the rest."""
        if self._sending or self._budget <= 1:
            return 0
        try:
            sent = self.socket.send(data)
        except BlockingIOError:
            return 0
        except OSError as exc:
            raise TransportError(f"send failed: {exc.strerror}") from exc
        self._budget -= 1
        return sent

    async def send(self, data: bytes, fds: Sequence[int] = ()) -> None:
        """Send all of ``data``; ``fds`` travel with its first byte."""
        if self._sending:
            raise trio.BusyResourceError("another task is already sending on this socket")
        self._sending = True
        try:
            sock = self.socket
            ancdata = []
            if fds:
                ancdata = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
            view: bytes | memoryview = data
            while view:
                try:
                    # send() when there are no fds: a third cheaper than sendmsg().
                    sent = sock.sendmsg([view], ancdata) if ancdata else sock.send(view)
                except BlockingIOError:
                    await trio.lowlevel.wait_writable(sock)
                    self._budget = FAIRNESS_BUDGET
                    continue
                except OSError as exc:
                    raise TransportError(f"sendmsg failed: {exc.strerror}") from exc
                if sent == len(view):
                    break
                view = memoryview(view)[sent:]
                # The kernel attached the fds to the bytes of the first sendmsg; the rest of a
                # partially sent message goes without them (spec vfio-user.md §1 "Server TX").
                ancdata = []
        finally:
            self._sending = False
        self._budget -= 1
        if self._budget <= 0:
            self._budget = FAIRNESS_BUDGET
            await trio.lowlevel.checkpoint()

    def close(self) -> None:
        """Close the socket (idempotent)."""
        self.socket.close()


def _received_fds(ancdata: list[tuple[int, int, bytes]], msg_flags: int, max_fds: int) -> list[int]:
    fds = _fds_from_ancillary(ancdata) if ancdata else []
    if msg_flags & _CTRUNC:
        close_fds(fds)
        # The kernel drops what it cannot install: more than the control buffer holds, or
        # any once the process is out of descriptors (EMFILE), so name both.
        raise TransportError(
            f"fds sent with a message were dropped (more than {max_fds}, "
            "or the daemon is out of file descriptors)"
        )
    return fds


def _fds_from_ancillary(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(payload) - len(payload) % _FD_SIZE
            fds.extend(array.array("i", payload[:usable]))
    return fds


def close_fds(fds: Sequence[int]) -> None:
    """Close every fd, ignoring ones already closed."""
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass
