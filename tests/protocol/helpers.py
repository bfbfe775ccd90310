"""Shared test helpers: raw frames, an in-memory wire, a negotiated client/server pair."""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence

from protocol import (
    HEADER_SIZE,
    HEADER_STRUCT,
    NEED_DATA,
    Capabilities,
    ClientConnection,
    ConnectionClosed,
    DmaLayout,
    Event,
    Outgoing,
    Reply,
    Request,
    ServerConnection,
)

Connection = ServerConnection | ClientConnection

# Placeholder fds: the protocol never touches them, so any distinct ints do.
_fd_numbers = itertools.count(1000)

#: What QEMU 11.1.3 offers in its VERSION request (captures README).
QEMU_CAPS = Capabilities(max_msg_fds=16, max_data_xfer_size=1 << 20, write_multiple=True)
SERVER_CAPS = Capabilities(max_msg_fds=8, max_data_xfer_size=1 << 20)


def new_fds(n: int) -> tuple[int, ...]:
    """``n`` fresh placeholder fd numbers."""
    return tuple(next(_fd_numbers) for _ in range(n))


def frame(
    msg_id: int,
    command: int,
    payload: bytes = b"",
    *,
    flags: int = 0,
    error: int = 0,
    size: int | None = None,
) -> bytes:
    """A raw message (``size`` defaults to the true length)."""
    if size is None:
        size = HEADER_SIZE + len(payload)
    return HEADER_STRUCT.pack(msg_id, command, size, flags, error) + payload


def drain(conn: Connection) -> list[Event]:
    """Every event available now (stops at NEED_DATA or ConnectionClosed)."""
    events: list[Event] = []
    while True:
        event = conn.next_event()
        if event is NEED_DATA:
            return events
        events.append(event)
        if isinstance(event, ConnectionClosed):
            return events


def chunks(conn: Connection, data: bytes) -> Iterator[bytes]:
    """Cut ``data`` the way a transport reading ``bytes_wanted`` at a time would."""
    pos = 0
    while pos < len(data):
        want = conn.bytes_wanted
        assert want > 0
        yield data[pos : pos + want]
        pos += want


def deliver(out: Outgoing, conn: Connection) -> list[Event]:
    """Feed one Outgoing as a transport would: reads of ``bytes_wanted``, the fds with the
    first read; collect the events."""
    events: list[Event] = []
    fds: Sequence[int] = out.fds
    for piece in chunks(conn, out.data):
        conn.receive_data(piece, fds)
        fds = ()
        events += drain(conn)
    return events


def deliver_one(out: Outgoing, conn: Connection) -> Event:
    """Feed one message and return its single event."""
    events = deliver(out, conn)
    assert len(events) == 1, events
    return events[0]


def negotiated_pair(
    client_caps: Capabilities = QEMU_CAPS,
    server_caps: Capabilities = SERVER_CAPS,
    dma_layout: DmaLayout = DmaLayout.SPEC,
) -> tuple[ClientConnection, ServerConnection]:
    """A client and a server that have completed VERSION."""
    client = ClientConnection(client_caps, dma_layout=dma_layout)
    server = ServerConnection(server_caps)
    _, out = client.version_request()
    request = deliver_one(out, server)
    assert isinstance(request, Request)
    reply = deliver_one(server.version_reply(request), client)
    assert isinstance(reply, Reply)
    return client, server


def negotiated_server(caps: Capabilities = SERVER_CAPS) -> ServerConnection:
    """A server that has answered QEMU's VERSION."""
    return negotiated_pair(QEMU_CAPS, caps)[1]
