"""Turning away a client the device cannot take: EBUSY in reply to its VERSION, then close.

One client per device (DESIGN.md "Engines"), so a second connection is refused. Closing it at
once is not enough for QEMU 11.1.3: its vfio-user-pci realize sends VERSION and, when the
socket closes under it, sometimes aborts on an assertion (``util/error.c:62: error_setv:
Assertion `*errp == NULL' failed``) instead of failing the device -- 3 of 20 QEMUs did in a
by-hand run. Answered with an error reply, it fails realize cleanly and says why ("version
reply: Device or resource busy"; 19 of 20, the other one "failed to read header: EOF" with
exit 1). The refused client gets the same answer whatever it sends first (spec vfio-user.md
R3: error replies are header-only, errno positive).

A refused client is given :data:`REFUSAL_TIMEOUT` to send its first message, and at most
:data:`MAX_REFUSALS` refusals wait at once per device; past that a connection is just
closed, so a flood of connections costs nothing but the accepts.

A device a reload has removed (or is replacing), while its attached client is still served,
turns every new client away the same way, with ENODEV ("No such device") instead: the
device is going, not busy.
"""

from __future__ import annotations

import errno
import socket
from typing import Any

import trio

import protocol as p
from vgpud.log_limit import LogLimiter
from vgpud.server.transport import FdStream, TransportError, close_fds

REFUSAL_TIMEOUT = 2.0  # seconds a refused client has to send its first message
MAX_REFUSALS = 4  # refusals waiting for a first message at once, per device


class Refusals:
    """The refusals of one device's listener in progress."""

    def __init__(self, log: Any, log_limit: LogLimiter) -> None:
        self.log = log
        self.log_limit = log_limit  # the device's: a connect loop must not flood the log
        self.waiting = 0

    def start(
        self,
        nursery: trio.Nursery,
        sock: socket.socket,
        *,
        connection: int,
        active_connection: int | None,
        creds: dict[str, int],
        retiring: bool = False,
    ) -> None:
        """Log why ``sock`` is refused, answer its first request with EBUSY (ENODEV when
        ``retiring``), then close it (in ``nursery``); close it at once when
        :data:`MAX_REFUSALS` are already waiting. Takes ``sock`` over. Both engines refuse
        through here, with one log line."""
        # Spec vfio-user.md §1: one connection = one device = one client.
        self.log_limit.log(
            self.log,
            "warning",
            "refusing a client: the device is leaving the configuration"
            if retiring
            else "refusing a second client: the device already has one",
            connection=connection,
            active_connection=active_connection,
            **creds,
        )
        if self.waiting >= MAX_REFUSALS:
            sock.close()
            return
        self.waiting += 1
        nursery.start_soon(self._turn_away, sock, errno.ENODEV if retiring else errno.EBUSY)

    async def _turn_away(self, sock: socket.socket, error: int) -> None:
        stream = FdStream(sock)
        conn = p.ServerConnection(p.Capabilities())
        try:
            with trio.move_on_after(REFUSAL_TIMEOUT):
                event = await _first_event(stream, conn)
                if isinstance(event, p.Request | p.RejectedRequest):
                    close_fds(event.fds)
                    reply = conn.send_error(event, error)
                    if reply is not None:
                        await stream.send(reply.data)
        except (p.RemoteProtocolError, TransportError) as exc:
            close_fds(getattr(exc, "fds", ()))
            self.log.debug("refused client went away", error=str(exc))
        finally:
            self.waiting -= 1
            close_fds(conn.release_fds())
            stream.close()


async def _first_event(stream: FdStream, conn: p.ServerConnection) -> p.Event:
    while (event := conn.next_event()) is p.NEED_DATA:
        data, fds = await stream.receive(conn.bytes_wanted, conn.max_fds)
        conn.receive_data(data, fds)
    assert not isinstance(event, p.NeedDataType)
    return event
