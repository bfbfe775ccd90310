"""Misusing the API is our bug: LocalProtocolError, and the connection is unharmed."""

from __future__ import annotations

import errno
import json
import struct
from typing import Any

import pytest

from protocol import (
    HEADER_SIZE,
    Capabilities,
    ClientConnection,
    DeviceInfo,
    DeviceReset,
    DmaMap,
    DmaReadRequest,
    IrqInfo,
    LocalProtocolError,
    RegionInfoRequest,
    RegionReadReply,
    RegionReadRequest,
    RegionWriteRequest,
    RejectedRequest,
    Request,
    ServerConnection,
    SetIrqs,
    SparseMmapCap,
    Version,
    build_region_info_reply,
    negotiate_reply,
)

from .helpers import QEMU_CAPS, SERVER_CAPS, deliver_one, drain, frame, negotiated_pair, new_fds


def _request(message: Any, nfds: int = 0) -> tuple[ClientConnection, ServerConnection, Request]:
    client, server = negotiated_pair()
    _, out = client.send_request(message, new_fds(nfds))
    event = deliver_one(out, server)
    assert isinstance(event, Request)
    return client, server, event


def test_reply_twice() -> None:
    _, server, request = _request(DeviceReset())
    assert server.send_reply(request) is not None
    with pytest.raises(LocalProtocolError):
        server.send_reply(request)
    with pytest.raises(LocalProtocolError):
        server.send_error(request, errno.EIO)


def test_reply_to_rejected_needs_send_error() -> None:
    server = negotiated_pair()[1]
    server.receive_data(frame(5, 19))
    (event,) = drain(server)
    assert isinstance(event, RejectedRequest)
    with pytest.raises(LocalProtocolError):
        server.send_reply(event)  # type: ignore[arg-type]
    assert server.send_error(event, event.errno) is not None
    with pytest.raises(LocalProtocolError):
        server.send_error(event, event.errno)


@pytest.mark.parametrize("bad", [0, -1, 1 << 32, True, "EIO"])
def test_errno_must_be_positive(bad: Any) -> None:
    _, server, request = _request(DeviceReset())
    with pytest.raises(LocalProtocolError):
        server.send_error(request, bad)
    assert server.send_error(request, errno.EIO) is not None  # still pending


@pytest.mark.parametrize(
    ("message", "nfds", "reply", "reply_nfds"),
    [
        (DeviceReset(), 0, DeviceInfo(16), 0),  # wrong reply type
        (DeviceInfo(16), 0, None, 0),  # GET_INFO needs a payload
        (DeviceInfo(16), 0, DeviceInfo(16, 3, 9, 5), 1),  # fds on a reply that takes none
        (RegionReadRequest(0, 7, 4), 0, RegionReadReply(0, 7, 2, b"ab"), 0),  # short read
        (
            RegionInfoRequest(32, 2),
            0,
            build_region_info_reply(64, 2, 7, 1 << 30, 0, (SparseMmapCap(((0, 1 << 30),)),)),
            0,
        ),  # longer than the request's argsz (spec R5)
        (
            RegionInfoRequest(64, 2),
            0,
            build_region_info_reply(64, 2, 7, 1 << 30, 0),
            2,
        ),  # two fds on a region-info reply (R7)
        (IrqInfo(16, 0, 3), 0, RegionWriteRequest(0, 0, 0, b""), 0),
    ],
)
def test_bad_replies(message: Any, nfds: int, reply: Any, reply_nfds: int) -> None:
    _, server, request = _request(message, nfds)
    with pytest.raises(LocalProtocolError):
        server.send_reply(request, reply, new_fds(reply_nfds))
    assert server.send_error(request, errno.EIO) is not None  # still pending


def test_sending_out_of_order() -> None:
    client = ClientConnection(Capabilities())
    with pytest.raises(LocalProtocolError):
        client.send_request(DeviceReset())  # before VERSION
    client.version_request()
    with pytest.raises(LocalProtocolError):
        client.version_request()  # only one
    with pytest.raises(LocalProtocolError):
        client.send_request(DeviceReset())  # VERSION not answered yet
    server = ServerConnection(SERVER_CAPS)
    with pytest.raises(LocalProtocolError):
        server.send_request(DmaReadRequest(0, 4))  # before VERSION


def test_wrong_direction_and_limits() -> None:
    client, server = negotiated_pair()
    with pytest.raises(LocalProtocolError):
        server.send_request(DmaMap(3, 0, 0, 4096))
    with pytest.raises(LocalProtocolError):
        client.send_request(DmaReadRequest(0, 4))
    with pytest.raises(LocalProtocolError):
        client.send_request(RegionReadRequest(0, 7, (1 << 20) + 1))
    with pytest.raises(LocalProtocolError):
        client.send_request(DmaMap(3, 0, 0, 4096), new_fds(2))
    with pytest.raises(LocalProtocolError):
        client.send_request(SetIrqs.build(0x24, 2, 0, 9), new_fds(9))  # > server's 8
    with pytest.raises(LocalProtocolError):
        client.send_request(SetIrqs.build(0x24, 2, 0, 2), new_fds(1))
    with pytest.raises(LocalProtocolError):
        server.send_request(DmaReadRequest(0, 4), new_fds(1))  # R7


def test_version_reply_never_longer_than_request() -> None:
    server = ServerConnection(
        Capabilities(max_msg_fds=16, max_dma_maps=1000, pgsizes=8192, write_multiple=True)
    )
    tiny = Version(0, 0, Capabilities(max_msg_fds=16, write_multiple=True)).pack()
    server.receive_data(frame(0, 1, tiny))
    (request,) = drain(server)
    assert isinstance(request, Request)
    reply = server.version_reply(request)
    assert len(reply.data) <= 16 + len(tiny)
    parsed = Version.unpack(reply.data[16:])
    # Optional keys went, the essential ones stayed (spec R2, R8).
    assert parsed.capabilities == Capabilities(max_msg_fds=16, pgsizes=8192)


def test_version_reply_drops_all_json_when_nothing_fits() -> None:
    server = ServerConnection(Capabilities(max_msg_fds=16))
    server.receive_data(frame(0, 1, b"\0\0\0\0"))
    (request,) = drain(server)
    assert isinstance(request, Request)
    reply = server.version_reply(request)
    assert reply.data == frame(0, 1, b"\0\0\0\0", flags=1)
    assert server.negotiated == Capabilities()


@pytest.mark.parametrize(
    ("request_size", "reply_json"),
    [
        (39, b""),  # not even the empty object fits: a bare 0.0
        (40, b'{"capabilities":{}}\0'),
        (84, b'{"capabilities":{}}\0'),  # one byte short of the two mandatory keys
        (85, b'{"capabilities":{"max_msg_fds":16,"max_data_xfer_size":1048576}}\0'),
    ],
)
def test_short_version_request_gets_an_empty_capabilities_object(
    request_size: int, reply_json: bytes
) -> None:
    """rust-vmm's vfio-user client parses the reply's JSON as bytes [0, len - 1) and requires
    a "capabilities" key: give it one whenever "{"capabilities":{}}" fits (spec R2)."""
    server = ServerConnection(Capabilities(max_msg_fds=16))
    payload = b"\0\0\0\0" + b" " * (request_size - 16 - 7) + b"{}\0"  # JSON, padded
    server.receive_data(frame(0, 1, payload))
    (request,) = drain(server)
    assert isinstance(request, Request)
    reply = server.version_reply(request)
    assert reply.data == frame(0, 1, b"\0\0\0\0" + reply_json, flags=1)
    if reply_json:
        assert "capabilities" in json.loads(reply.data[20:-1])


def test_empty_capabilities_json_only_stands_for_the_defaults() -> None:
    assert Version(0, 0, Capabilities(), empty_json=True).pack()[4:] == b'{"capabilities":{}}\0'
    with pytest.raises(LocalProtocolError):
        Version(0, 0, Capabilities(max_msg_fds=16), empty_json=True)


def test_an_explicit_request_leaves_the_reply_room_for_the_servers_limits() -> None:
    """Every key written, defaults too (as QEMU's request has them): the server's reply may
    be no longer than the request, so a short request cost the client the server's
    max_dma_maps (vgpud probe showed 65535 against a daemon allowing 19 608)."""
    request = Version(0, 0, Capabilities(max_msg_fds=16), explicit_json=True)
    caps = json.loads(request.pack()[4:-1])["capabilities"]
    assert caps["max_dma_maps"] == 65535 and caps["pgsizes"] == 4096
    assert Version.unpack(request.pack()) == Version(0, 0, Capabilities(max_msg_fds=16))
    ours = Capabilities(max_msg_fds=16, max_dma_maps=19608)
    reply = negotiate_reply(request, ours, HEADER_SIZE + len(request.pack()))
    assert reply.capabilities is not None and reply.capabilities.max_dma_maps == 19608
    short = Version(0, 0, Capabilities(max_msg_fds=16))
    reply = negotiate_reply(short, ours, HEADER_SIZE + len(short.pack()))
    assert reply.capabilities is not None and reply.capabilities.max_dma_maps == 65535


def test_explicit_version_reply_checked() -> None:
    server = ServerConnection(SERVER_CAPS)
    server.receive_data(frame(0, 1, Version(0, 0, Capabilities()).pack()))
    (request,) = drain(server)
    assert isinstance(request, Request)
    big = Version(0, 0, Capabilities(max_msg_fds=8, write_multiple=True, max_dma_maps=7))
    with pytest.raises(LocalProtocolError):
        server.send_reply(request, big)
    with pytest.raises(LocalProtocolError):
        server.send_reply(request, Version(1, 0, None))
    assert server.send_reply(request, Version(0, 0, None)) is not None


def test_client_respects_the_servers_max_data_xfer_size() -> None:
    client, _ = negotiated_pair(server_caps=Capabilities(max_msg_fds=8, max_data_xfer_size=4096))
    with pytest.raises(LocalProtocolError):
        client.send_request(RegionReadRequest(0, 7, 8192))
    client.send_request(RegionReadRequest(0, 7, 4096))  # the limit itself is fine


def test_after_a_version_error_the_server_still_awaits_version() -> None:
    client, server = ClientConnection(QEMU_CAPS), ServerConnection(SERVER_CAPS)
    _, out = client.version_request()
    request = deliver_one(out, server)
    assert isinstance(request, Request)
    server.send_error(request, errno.EINVAL)
    server.receive_data(frame(2, 4, struct.pack("<IIII", 16, 0, 0, 0)))  # DEVICE_GET_INFO
    (event,) = drain(server)
    assert isinstance(event, RejectedRequest) and event.errno == errno.EINVAL
