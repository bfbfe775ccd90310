"""The trapped-access fast paths give exactly what the general paths give.

Decoders that skip ``__post_init__`` (``slot_setters``), the per-state command table, and
``send_access_reply``: each is checked against the slow path it short-cuts, for valid input
and for the invalid input the skipped checks used to catch.
"""

from __future__ import annotations

import errno
import struct
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import (
    Command,
    DeviceReset,
    LocalProtocolError,
    RegionReadReply,
    RegionReadRequest,
    RegionWriteReply,
    RegionWriteRequest,
    RejectedRequest,
    RemoteProtocolError,
    Request,
)
from protocol._fields import slot_setters
from protocol.commands import request_fd_error
from protocol.state import ACCEPTED, RECEIVABLE

from .helpers import deliver_one, frame, negotiated_pair, negotiated_server
from .strategies import MESSAGES

ACCESS = struct.Struct("<QII")
u32 = st.integers(0, 0xFFFF_FFFF)
u64 = st.integers(0, (1 << 64) - 1)


@settings(max_examples=200, deadline=None)
@given(u64, u32, u32)
def test_region_read_decode_matches_the_validating_constructor(
    offset: int, region: int, count: int
) -> None:
    payload = ACCESS.pack(offset, region, count)
    if offset + count <= 1 << 64:
        decoded = RegionReadRequest.unpack(payload)
        assert decoded == RegionReadRequest(offset, region, count)
        assert hash(decoded) == hash(RegionReadRequest(offset, region, count))
    else:
        with pytest.raises(RemoteProtocolError, match="overflows") as info:
            RegionReadRequest.unpack(payload)
        assert info.value.errno == errno.EINVAL and not info.value.fatal


@settings(max_examples=200, deadline=None)
@given(u64, u32, st.integers(0, 16), st.binary(max_size=16))
def test_region_write_decode_matches_the_validating_constructor(
    offset: int, region: int, count: int, data: bytes
) -> None:
    payload = ACCESS.pack(offset, region, count) + data
    if offset + count <= 1 << 64 and len(data) == count:
        decoded = RegionWriteRequest.unpack(payload)
        assert decoded == RegionWriteRequest(offset, region, count, data)
        assert type(decoded.data) is bytes
    else:
        with pytest.raises(RemoteProtocolError):
            RegionWriteRequest.unpack(payload)


def test_short_and_long_access_payloads_are_still_refused() -> None:
    for payload in (b"", bytes(15), bytes(17)):
        with pytest.raises(RemoteProtocolError, match="REGION_READ"):
            RegionReadRequest.unpack(payload)
    with pytest.raises(RemoteProtocolError, match="REGION_WRITE"):
        RegionWriteRequest.unpack(bytes(15))


def test_decoded_messages_stay_frozen() -> None:
    decoded = RegionReadRequest.unpack(ACCESS.pack(0, 7, 4))
    with pytest.raises(AttributeError):
        decoded.count = 8  # type: ignore[misc]


def test_slot_setters_must_name_every_field() -> None:
    @dataclass(frozen=True, slots=True)
    class Pair:
        a: int
        b: int

    assert len(slot_setters(Pair, "a", "b")) == 2
    with pytest.raises(TypeError):
        slot_setters(Pair, "a")


def test_accepted_table_is_receivable_by_number() -> None:
    assert ACCEPTED.keys() == RECEIVABLE.keys()
    for key, commands in RECEIVABLE.items():
        assert set(ACCEPTED[key].values()) == set(commands)
        assert all(number == command for number, command in ACCEPTED[key].items())


REQUEST_TYPES = sorted(name for name in MESSAGES if "Reply" not in name and name != "RegionInfo")


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(REQUEST_TYPES).flatmap(lambda name: MESSAGES[name]))
def test_no_request_needs_fds(message: object) -> None:
    # _on_request only asks request_fd_error when fds came: this is why that is enough.
    assert request_fd_error(message, 0) is None  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("command", "flags", "err", "reason"),
    [
        (14, 0, errno.ENOSYS, "unknown command 14"),
        (99, 0x40, errno.ENOSYS, "unknown command 99"),  # unknown wins over bad flags
        (Command.DMA_READ, 0x40, errno.EINVAL, "is not a server's request"),
        (Command.VERSION, 0x40, errno.EINVAL, "request flags 0x40"),  # flags win over state
        (Command.VERSION, 0, errno.EINVAL, "not allowed in state ready"),
        (Command.REGION_READ, 0x20, errno.EINVAL, "request flags 0x20"),
    ],
)
def test_rejections_keep_their_errno_and_order(
    command: int, flags: int, err: int, reason: str
) -> None:
    server = negotiated_server()
    server.receive_data(frame(5, command, flags=flags))
    event = server.next_event()
    assert isinstance(event, RejectedRequest)
    assert (event.errno, event.msg_id, event.command) == (err, 5, command)
    assert reason in event.reason


def _request(server: object, message: object, msg_id: int = 3, flags: int = 0) -> Request:
    data = frame(msg_id, message.COMMAND, message.pack(), flags=flags)  # type: ignore[attr-defined]
    server.receive_data(data)  # type: ignore[attr-defined]
    event = server.next_event()  # type: ignore[attr-defined]
    assert isinstance(event, Request)
    return event


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 1 << 40), u32, st.binary(max_size=8))
def test_access_reply_is_the_reply_send_reply_builds(offset: int, region: int, data: bytes) -> None:
    server = negotiated_server()
    read = RegionReadRequest(offset, region, len(data))
    fast = server.send_access_reply(_request(server, read, 1), data)
    slow = server.send_reply(
        _request(server, read, 2), RegionReadReply(offset, region, len(data), data)
    )
    assert fast is not None and slow is not None
    assert fast.data[:1] == b"\x01" and fast.data[2:] == slow.data[2:] and fast.fds == ()

    write = RegionWriteRequest(offset, region, len(data), data)
    fast = server.send_access_reply(_request(server, write, 1))
    slow = server.send_reply(
        _request(server, write, 2), RegionWriteReply(offset, region, len(data))
    )
    assert fast is not None and slow is not None
    assert fast.data[:1] == b"\x01" and fast.data[2:] == slow.data[2:]


def test_access_reply_decodes_on_the_client() -> None:
    client, server = negotiated_pair()
    _, out = client.send_request(RegionReadRequest(0x10, 7, 4))
    request = deliver_one(out, server)
    assert isinstance(request, Request)
    reply_out = server.send_access_reply(request, b"\x01\x02\x03\x04")
    assert reply_out is not None
    reply = deliver_one(reply_out, client)
    assert reply.message == RegionReadReply(0x10, 7, 4, b"\x01\x02\x03\x04")  # type: ignore[union-attr]


def test_access_reply_keeps_the_checks() -> None:
    server = negotiated_server()
    read = _request(server, RegionReadRequest(0, 7, 4))
    with pytest.raises(LocalProtocolError, match="3 bytes, 4 asked"):
        server.send_access_reply(read, b"abc")
    with pytest.raises(LocalProtocolError, match="bytes"):
        server.send_access_reply(read, bytearray(4))  # type: ignore[arg-type]
    assert server.send_access_reply(read, b"abcd") is not None
    with pytest.raises(LocalProtocolError, match="already answered"):
        server.send_access_reply(read, b"abcd")

    write = _request(server, RegionWriteRequest(0, 7, 2, b"ab"), 4)
    with pytest.raises(LocalProtocolError, match="no data"):
        server.send_access_reply(write, b"ab")
    assert server.send_access_reply(write) is not None

    reset = _request(server, DeviceReset(), 5)
    with pytest.raises(LocalProtocolError, match="REGION_READ or REGION_WRITE"):
        server.send_access_reply(reset)
    assert server.send_reply(reset) is not None  # the failed attempts left it pending

    posted = _request(server, RegionWriteRequest(0, 7, 1, b"a"), 6, flags=0x10)
    assert posted.no_reply and server.send_access_reply(posted) is None
