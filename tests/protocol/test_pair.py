"""Every command, both roles, through a client/server pair joined by an in-memory wire."""

from __future__ import annotations

import errno
import struct
from typing import Any

import pytest

from protocol import (
    FLAG_ERROR,
    FLAG_TYPE_REPLY,
    HEADER_STRUCT,
    Capabilities,
    ClientConnection,
    Command,
    DeviceFeature,
    DeviceInfo,
    DeviceReset,
    DmaLayout,
    DmaMap,
    DmaReadReply,
    DmaReadRequest,
    DmaUnmap,
    DmaWriteReply,
    DmaWriteRequest,
    ErrorReply,
    FeatureFlags,
    IoFdEntry,
    IrqInfo,
    MigDataRead,
    MigDataReadReply,
    MigDataWrite,
    MigrationFeature,
    Outgoing,
    QemuDmaReadReply,
    QemuDmaReadRequest,
    QemuDmaWriteRequest,
    RegionInfoRequest,
    RegionIoFdsReply,
    RegionIoFdsRequest,
    RegionReadReply,
    RegionReadRequest,
    RegionWriteMulti,
    RegionWriteMultiReply,
    RegionWriteReply,
    RegionWriteRequest,
    Reply,
    Request,
    SetIrqs,
    SparseMmapCap,
    State,
    WriteMultiEntry,
    build_region_info_reply,
    decode_feature,
)

from .helpers import QEMU_CAPS, deliver_one, frame, negotiated_pair, new_fds

# (request, request fds, reply or None, reply fds) for every client -> server command.
CLIENT_CASES: list[tuple[Any, int, Any, int]] = [
    (DmaMap(3, 0, 0, 1 << 30), 1, None, 0),
    (DmaMap(1, 0, 0xFFFC0000, 256 << 10), 0, None, 0),
    (DmaUnmap(0, 0, 1 << 30), 0, DmaUnmap(0, 0, 1 << 30), 0),
    (DmaUnmap(2, 0, 0), 0, None, 0),
    (DeviceInfo(16), 0, DeviceInfo(16, 3, 9, 5), 0),
    (
        RegionInfoRequest(64, 4),
        0,
        build_region_info_reply(64, 4, 7, 8 << 30, 0, (SparseMmapCap(((0, 7 << 30),)),)),
        1,
    ),
    (RegionInfoRequest(32, 7), 0, build_region_info_reply(32, 7, 3, 4096, 0), 0),
    (
        RegionIoFdsRequest(256, 0),
        0,
        RegionIoFdsReply(56, 0, 0, 1, (IoFdEntry(0x1000, 4, 0, 0, 0, 0),)),
        1,
    ),
    (IrqInfo(16, 0, 3), 0, IrqInfo(16, 1, 3, 1), 0),
    (SetIrqs.build(0x24, 0, 0, 1), 1, None, 0),
    (SetIrqs.build(0x24, 2, 0, 3), 3, None, 0),
    (SetIrqs.build(0x24, 3, 0, 1), 0, None, 0),  # ERR de-assign: EVENTFD, no fd
    (SetIrqs.build(0x21, 0, 0, 0), 0, None, 0),  # disable all
    (SetIrqs.build(0x0A, 0, 0, 2, b"\x01\x00"), 0, None, 0),
    (RegionReadRequest(0, 7, 4096), 0, RegionReadReply(0, 7, 4096, bytes(4096)), 0),
    (RegionWriteRequest(4, 7, 2, b"\x06\x01"), 0, RegionWriteReply(4, 7, 2), 0),
    (RegionWriteRequest(0x30, 7, 4, b"\0\0\0\0"), 0, None, 0),
    (DeviceReset(), 0, None, 0),
    (
        RegionWriteMulti((WriteMultiEntry(0, 0, 4, b"abcd"), WriteMultiEntry(8, 0, 1, b"z"))),
        0,
        RegionWriteMultiReply(2),
        0,
    ),
    (
        DeviceFeature(16, FeatureFlags.GET | 1),
        0,
        DeviceFeature(16, FeatureFlags.GET | 1, MigrationFeature(5).pack()),
        0,
    ),
    (MigDataRead(8, 16), 0, MigDataReadReply(24, 16, bytes(range(16))), 0),
    (MigDataWrite(12, 4, b"\1\2\3\4"), 0, None, 0),
]


@pytest.mark.parametrize(("request_msg", "nfds", "reply_msg", "reply_nfds"), CLIENT_CASES)
def test_client_to_server(request_msg: Any, nfds: int, reply_msg: Any, reply_nfds: int) -> None:
    client, server = negotiated_pair()
    fds = new_fds(nfds)
    msg_id, out = client.send_request(request_msg, fds)
    assert out.fds == fds
    event = deliver_one(out, server)
    assert isinstance(event, Request)
    assert (event.msg_id, event.command, event.message, event.fds) == (
        msg_id,
        request_msg.COMMAND,
        request_msg,
        fds,
    )
    reply_fds = new_fds(reply_nfds)
    reply_out = server.send_reply(event, reply_msg, reply_fds)
    assert reply_out is not None
    reply = deliver_one(reply_out, client)
    assert isinstance(reply, Reply)
    assert (reply.msg_id, reply.command, reply.message, reply.fds) == (
        msg_id,
        request_msg.COMMAND,
        reply_msg,
        reply_fds,
    )
    assert reply.request == request_msg


@pytest.mark.parametrize("case", CLIENT_CASES[:6])
def test_error_reply_is_header_only(case: Any) -> None:
    client, server = negotiated_pair()
    msg_id, out = client.send_request(case[0], new_fds(case[1]))
    event = deliver_one(out, server)
    assert isinstance(event, Request)
    error_out = server.send_error(event, errno.EPERM)
    assert error_out is not None and error_out.fds == ()
    # spec R3: 16 bytes, flags 0x21, positive errno.
    assert HEADER_STRUCT.unpack(error_out.data) == (
        msg_id,
        event.command,
        16,
        FLAG_TYPE_REPLY | FLAG_ERROR,
        errno.EPERM,
    )
    reply = deliver_one(error_out, client)
    assert reply == ErrorReply(msg_id, event.command, errno.EPERM, (), "", case[0])


SERVER_CASES: list[tuple[DmaLayout, Any, Any]] = [
    (DmaLayout.SPEC, DmaReadRequest(0x1000, 8), DmaReadReply(0x1000, 8, b"12345678")),
    (DmaLayout.SPEC, DmaWriteRequest(0x2000, 3, b"abc"), DmaWriteReply(0x2000, 3)),
    (DmaLayout.SPEC, DmaWriteRequest(0x2000, 3, b"abc"), None),
    (DmaLayout.QEMU, QemuDmaReadRequest(0x1000, 4), QemuDmaReadReply(0x1000, 4, b"wxyz")),
    (DmaLayout.QEMU, QemuDmaWriteRequest(0x3000, 2, b"hi"), None),
]


@pytest.mark.parametrize(("layout", "request_msg", "reply_msg"), SERVER_CASES)
def test_server_to_client(layout: DmaLayout, request_msg: Any, reply_msg: Any) -> None:
    client, server = negotiated_pair(dma_layout=layout)
    msg_id, out = server.send_request(request_msg)
    event = deliver_one(out, client)
    assert isinstance(event, Request)
    assert (event.msg_id, event.message) == (msg_id, request_msg)
    reply_out = client.send_reply(event, reply_msg)
    assert reply_out is not None
    reply = deliver_one(reply_out, server)
    assert isinstance(reply, Reply)
    assert (reply.msg_id, reply.message, reply.request) == (msg_id, reply_msg, request_msg)


def test_qemu_dma_layout_sizes() -> None:
    # Spec §3.12: QEMU's struct is 32 bytes with the header; data sits at payload offset 12.
    assert len(QemuDmaReadRequest(0, 4).pack()) + 16 == 32
    write = QemuDmaWriteRequest(0x10, 2, b"hi").pack()
    assert write[12:14] == b"hi" and len(write) + 16 == 32 + 2
    assert QemuDmaReadReply(0, 1, b"x").pack()[12:13] == b"x"


def test_interleaved_traffic_and_pipelining() -> None:
    client, server = negotiated_pair()
    sent = [client.send_request(DmaMap(3, i << 12, i << 12, 4096), new_fds(1)) for i in range(8)]
    dma_id, dma_out = server.send_request(DmaReadRequest(0, 4))
    requests = [deliver_one(out, server) for _, out in sent]
    dma_request = deliver_one(dma_out, client)
    assert isinstance(dma_request, Request)
    # Answer the pipelined maps in order, with the client's DMA reply in the middle.
    replies = []
    for i, request in enumerate(requests):
        assert isinstance(request, Request)
        out = server.send_reply(request)
        assert out is not None
        replies.append(deliver_one(out, client))
        if i == 3:
            dma_reply = client.send_reply(dma_request, DmaReadReply(0, 4, b"data"))
            assert dma_reply is not None
            assert isinstance(deliver_one(dma_reply, server), Reply)
    assert all(isinstance(r, Reply) for r in replies)
    assert [r.msg_id for r in replies if isinstance(r, Reply)] == [msg_id for msg_id, _ in sent]
    assert dma_id == 0


def test_msg_ids_wrap() -> None:
    client, server = negotiated_pair()
    client._next_msg_id = 0xFFFF
    first, out1 = client.send_request(DeviceReset())
    second, out2 = client.send_request(DeviceReset())
    assert (first, second) == (0xFFFF, 0)
    for out in (out1, out2):
        request = deliver_one(out, server)
        assert isinstance(request, Request)
        reply = server.send_reply(request)
        assert reply is not None
        assert isinstance(deliver_one(reply, client), Reply)


def test_no_reply_requests_are_never_answered() -> None:
    client, server = negotiated_pair()
    _, out = client.send_request(RegionWriteRequest(0, 4, 4, b"abcd"), no_reply=True)
    assert HEADER_STRUCT.unpack_from(out.data)[3] == 0x10
    event = deliver_one(out, server)
    assert isinstance(event, Request) and event.no_reply
    assert server.send_reply(event) is None
    assert server.send_error(event, errno.EIO) is None


def test_version_negotiation_result() -> None:
    client, server = negotiated_pair(
        Capabilities(max_msg_fds=16, write_multiple=True),
        Capabilities(max_msg_fds=8, max_data_xfer_size=1 << 16, write_multiple=True),
    )
    assert server.state is State.READY and client.state is State.READY
    assert server.negotiated == Capabilities(max_msg_fds=16, write_multiple=True)
    assert client.negotiated == Capabilities(
        max_msg_fds=8, max_data_xfer_size=1 << 16, write_multiple=True
    )


def test_feature_decoder() -> None:
    feature = DeviceFeature(16, FeatureFlags.GET | 1, MigrationFeature(5).pack())
    assert decode_feature(feature) == MigrationFeature(5)
    assert decode_feature(DeviceFeature(8, FeatureFlags.PROBE | 1)) is None
    assert Command.DEVICE_FEATURE == feature.COMMAND


def test_undecodable_reply_is_an_error_reply_and_keeps_the_stream() -> None:
    client, server = negotiated_pair()
    msg_id, out = client.send_request(RegionInfoRequest(64, 2))
    request = deliver_one(out, server)
    assert isinstance(request, Request)
    # A region-info reply with two fds (spec R7 allows one): the client refuses the reply,
    # hands the fds back, and the next reply on the stream is still understood.
    reply = build_region_info_reply(64, 2, 7, 1 << 30, 0)
    bad = Outgoing(HEADER_STRUCT.pack(msg_id, 5, 48, 1, 0) + reply.pack(), new_fds(2))
    event = deliver_one(bad, client)
    assert isinstance(event, ErrorReply)
    assert event.errno == errno.EPROTO and event.reason and event.fds == bad.fds
    msg_id, out = client.send_request(DeviceReset())
    reset = deliver_one(out, server)
    assert isinstance(reset, Request)
    done = server.send_reply(reset)
    assert done is not None and isinstance(deliver_one(done, client), Reply)


def test_deeply_nested_version_reply_is_an_error_reply() -> None:
    client = ClientConnection(QEMU_CAPS)
    msg_id, _ = client.version_request()
    payload = struct.pack("<HH", 0, 0) + b"[" * 2000 + b"\0"
    event = deliver_one(Outgoing(frame(msg_id, 1, payload, flags=1)), client)
    assert isinstance(event, ErrorReply) and event.errno == errno.EPROTO
    assert "nested too deeply" in event.reason


def test_short_region_read_reply_is_refused() -> None:
    client, server = negotiated_pair()
    msg_id, out = client.send_request(RegionReadRequest(0, 7, 4))
    assert isinstance(deliver_one(out, server), Request)
    short = RegionReadReply(0, 7, 2, b"ab").pack()
    header = HEADER_STRUCT.pack(msg_id, 9, 16 + len(short), 1, 0)
    event = deliver_one(Outgoing(header + short), client)
    assert isinstance(event, ErrorReply) and event.errno == errno.EPROTO
