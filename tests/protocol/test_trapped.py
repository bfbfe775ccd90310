"""The trapped-access fast path (protocol.trapped) takes exactly what the general path would
turn into a REGION_READ/REGION_WRITE request, answers it with the same bytes, and leaves
everything else to the general path untouched."""

from __future__ import annotations

import struct
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import (
    HEADER_STRUCT,
    Capabilities,
    LocalProtocolError,
    RegionReadRequest,
    RegionWriteRequest,
    RemoteProtocolError,
    Request,
    ServerConnection,
    TrappedAccess,
)
from protocol.trapped import access_error

from .helpers import QEMU_CAPS, frame, negotiated_server

ACCESS = struct.Struct("<QII")
REGION_READ, REGION_WRITE, GET_INFO = 9, 10, 4
CAPS = Capabilities(max_msg_fds=8, max_data_xfer_size=64)


@st.composite
def messages(draw: st.DrawFn) -> tuple[bytes, bytes]:
    """A header and the body a transport reads for it (exactly ``size - 16`` bytes), mostly
    trapped accesses, with every field sometimes wrong."""
    command = draw(st.sampled_from([REGION_READ, REGION_WRITE, REGION_WRITE, GET_INFO, 15]))
    offset = draw(st.one_of(st.integers(0, 0x1000), st.just((1 << 64) - 4)))
    count = draw(st.sampled_from([0, 1, 2, 4, 8, 64, 65]))
    data_len = count if draw(st.booleans()) else draw(st.integers(0, 70))
    data = b"\xa5" * data_len if command != REGION_READ else b""
    body = ACCESS.pack(offset, draw(st.integers(0, 9)), count) + data
    if draw(st.integers(0, 9)) == 0:
        body = body[: draw(st.integers(0, len(body)))]  # a short head
    flags = draw(st.sampled_from([0, 0, 0, 0x10, 0x1, 0x20, 0x30, 0x40]))
    header = HEADER_STRUCT.pack(
        draw(st.integers(0, 0xFFFF)), command, 16 + len(body), flags, draw(st.sampled_from([0, 5]))
    )
    return header, body


def _connection(negotiated: bool) -> ServerConnection:
    return negotiated_server(CAPS) if negotiated else ServerConnection(CAPS)


def _general(conn: ServerConnection, header: bytes, body: bytes) -> tuple[str, Any]:
    """What the general path (exact reads) makes of the message."""
    try:
        remaining = conn.receive_header(header)
        event = conn.receive_body(body[:remaining], eof=len(body) < remaining)
    except (RemoteProtocolError, LocalProtocolError) as exc:
        return type(exc).__name__, str(exc)
    return "event", event


def _summary(event: Any) -> tuple[Any, ...]:
    if isinstance(event, Request):
        return ("request", event.msg_id, event.command, event.no_reply, event.message)
    return (type(event).__name__, getattr(event, "errno", None))


def _as_message(access: TrappedAccess) -> RegionReadRequest | RegionWriteRequest:
    if access.is_read:
        return RegionReadRequest(access.offset, access.region, access.count)
    return RegionWriteRequest(access.offset, access.region, access.count, access.data)


@settings(max_examples=600, deadline=None)
@given(messages(), st.booleans(), st.integers(1, 1 << 20))
def test_fast_path_agrees_with_the_general_path(
    message: tuple[bytes, bytes], negotiated: bool, errno_: int
) -> None:
    header, body = message
    fast, general = _connection(negotiated), _connection(negotiated)
    outcome = _general(general, header, body)

    wanted = fast.trapped_access_body(header)
    access = None
    if wanted >= 0:
        assert wanted == len(body)  # the header announces what the transport reads
        access = fast.receive_trapped_access(header, body)
    if access is None:
        # Declined: nothing was consumed, and the general path decides as it always did.
        kind, got = _general(fast, header, body)
        assert kind == outcome[0]
        assert (_summary(got) if kind == "event" else got) == (
            _summary(outcome[1]) if kind == "event" else outcome[1]
        )
        return
    kind, request = outcome
    assert kind == "event" and isinstance(request, Request), outcome
    assert (request.msg_id, request.command, request.no_reply, request.fds) == (
        access.msg_id,
        access.command,
        access.no_reply,
        (),
    )
    assert request.message == _as_message(access)
    # Answered with the same bytes, success or error.
    if errno_ % 2:
        data = b"\x5a" * access.count if access.is_read else b""
        mine = fast.answer_access(access, data)
        theirs = general.send_access_reply(request, data)
    else:
        mine = fast.refuse_access(access, errno_)
        theirs = general.send_error(request, errno_)
    assert mine == (None if theirs is None else theirs.data)
    # Both streams are at the same place: the next message, with fds, reads the same.
    follow = frame(7, GET_INFO, struct.pack("<IIII", 16, 0, 0, 0))
    after = [_summary(_general(conn, follow[:16], follow[16:])[1]) for conn in (fast, general)]
    assert after[0] == after[1]


def _read(msg_id: int = 1, count: int = 4) -> tuple[bytes, bytes]:
    wire = frame(msg_id, REGION_READ, ACCESS.pack(0x10, 7, count))
    return wire[:16], wire[16:]


def test_an_access_is_answered_once() -> None:
    conn = negotiated_server(CAPS)
    access = conn.receive_trapped_access(*_read())
    assert access is not None
    assert conn.answer_access(access, b"\0" * 4) is not None
    with pytest.raises(LocalProtocolError, match="not owed a reply"):
        conn.answer_access(access, b"\0" * 4)
    with pytest.raises(LocalProtocolError, match="not owed a reply"):
        conn.refuse_access(access, 5)


def test_a_read_reply_is_exactly_count_bytes() -> None:
    conn = negotiated_server(CAPS)
    access = conn.receive_trapped_access(*_read(count=4))
    assert access is not None
    with pytest.raises(LocalProtocolError, match="3 bytes, 4 asked"):
        conn.answer_access(access, b"abc")
    assert conn.answer_access(access, b"abcd") is not None  # still owed after the mistake


def test_while_one_access_is_owed_the_next_takes_the_general_path() -> None:
    conn = negotiated_server(CAPS)
    first = conn.receive_trapped_access(*_read(1))
    assert first is not None
    header, body = _read(2)
    assert conn.trapped_access_body(header) == -1
    assert conn.receive_trapped_access(header, body) is None
    kind, request = _general(conn, header, body)
    assert kind == "event" and isinstance(request, Request) and request.msg_id == 2
    assert conn.answer_access(first, b"\0" * 4) is not None
    assert conn.send_access_reply(request, b"\0" * 4) is not None


def test_a_posted_write_is_owed_nothing() -> None:
    conn = negotiated_server(CAPS)
    wire = frame(3, REGION_WRITE, ACCESS.pack(0, 0, 2) + b"hi", flags=0x10)
    access = conn.receive_trapped_access(wire[:16], wire[16:])
    assert access is not None and access.no_reply and access.data == b"hi"
    assert conn.answer_access(access) is None
    assert conn.receive_trapped_access(*_read()) is not None  # nothing was left pending


def test_before_version_nothing_is_fast() -> None:
    conn = ServerConnection(QEMU_CAPS)
    header, body = _read()
    assert conn.trapped_access_body(header) == -1
    assert conn.receive_trapped_access(header, body) is None


def test_fast_path_leaves_an_access_that_wraps_by_one_byte() -> None:
    server = negotiated_server(CAPS)
    body = ACCESS.pack((1 << 64) - 1, 7, 2)  # ends at 2**64 + 1
    header = HEADER_STRUCT.pack(9, REGION_READ, 16 + len(body), 0, 0)
    assert server.receive_trapped_access(header, body) is None


def test_fast_path_error_reply_needs_a_positive_errno() -> None:
    access = TrappedAccess(1, REGION_READ, False, 0, 7, 4, b"")
    with pytest.raises(LocalProtocolError):
        access_error(access, 0)
