"""The bad-input catalogue (DESIGN.md "Errors and bad input"; libvfio-user's test suite).

Each case: the daemon answers with an error reply or closes the connection cleanly, no fd
it received stays open, and a new client is then served normally.
"""

from __future__ import annotations

import array
import contextlib
import errno
import os
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import trio
import trio.testing

from tests.server.conftest import Daemon, open_fds
from tests.server.rawclient import HEADER, QEMU_VERSION, RawConn
from vgpud.server import session as session_module
from vgpud.server.transport import close_fds

CLOSE = -1  # the expected outcome is a closed connection


def msg(command: int, payload: bytes = b"", msg_id: int = 7, flags: int = 0) -> bytes:
    return HEADER.pack(msg_id, command, 16 + len(payload), flags, 0) + payload


def region_read(region: int, offset: int, count: int) -> bytes:
    return msg(9, struct.pack("<QII", offset, region, count))


def region_write(region: int, offset: int, count: int, data: bytes) -> bytes:
    return msg(10, struct.pack("<QII", offset, region, count) + data)


def dma_map(flags: int, offset: int, address: int, size: int) -> bytes:
    return msg(2, struct.pack("<IIQQQ", 32, flags, offset, address, size))


def set_irqs(flags: int, index: int, start: int, count: int, data: bytes = b"") -> bytes:
    return msg(8, struct.pack("<IIIII", 20 + len(data), flags, index, start, count) + data)


def eventfd() -> int:
    return os.eventfd(0, os.EFD_CLOEXEC)


def pipe_end() -> int:
    read_end, write_end = os.pipe()
    os.close(read_end)
    return write_end


def small_memfd() -> int:
    fd = os.memfd_create("small", os.MFD_CLOEXEC)
    os.ftruncate(fd, 0x1000)
    return fd


@dataclass
class Case:
    name: str
    data: bytes
    expect: int  # an errno for the error reply, or CLOSE
    negotiate: bool = True
    make_fds: Callable[[], list[int]] = field(default=list)


CASES = [
    Case("command before VERSION", region_read(7, 0, 4), errno.EINVAL, negotiate=False),
    Case("second VERSION", QEMU_VERSION, errno.EINVAL),
    Case("VERSION with bad JSON", msg(1, b"\0\0\0\0{not json\0"), errno.EINVAL, negotiate=False),
    Case("VERSION with JSON array", msg(1, b"\0\0\0\0[1, 2]\0"), errno.EINVAL, negotiate=False),
    Case(
        "VERSION with deeply nested JSON",
        msg(1, b"\0\0\0\0" + b"[" * 2000 + b"\0"),
        errno.EINVAL,
        negotiate=False,
    ),
    Case("VERSION major 1", msg(1, b"\1\0\0\0{}\0"), errno.EINVAL, negotiate=False),
    Case("short VERSION", msg(1, b"\0\0"), errno.EINVAL, negotiate=False),
    Case("unknown command", msg(99, b"abcd"), errno.ENOSYS),
    Case("reply sent as a command", msg(4, bytes(16), flags=1), CLOSE),
    Case("header type 5", msg(4, bytes(16), flags=5), CLOSE),
    Case("size below the header", HEADER.pack(1, 4, 8, 0, 0), CLOSE),
    Case("size beyond every limit", HEADER.pack(1, 10, 0xFFFFFFF0, 0, 0), CLOSE),
    Case("EOF in the middle of a body", HEADER.pack(1, 10, 64, 0, 0) + b"x" * 10, CLOSE),
    Case("GET_INFO with bad argsz", msg(4, struct.pack("<IIII", 8, 0, 0, 0)), errno.EINVAL),
    Case(
        "GET_INFO carrying an fd",
        msg(4, struct.pack("<IIII", 16, 0, 0, 0)),
        errno.EINVAL,
        make_fds=lambda: [eventfd()],
    ),
    Case(
        "region info of region 50", msg(5, struct.pack("<IIIIQQ", 32, 0, 50, 0, 0, 0)), errno.EINVAL
    ),
    Case("read of region 12", region_read(12, 0, 4), errno.EINVAL),
    Case("read past the config space", region_read(7, 4094, 4), errno.EINVAL),
    Case("read at an offset that wraps", region_read(0, (1 << 64) - 2, 4), errno.EINVAL),
    Case("read larger than max_data_xfer_size", region_read(4, 0, 2 << 20), errno.E2BIG),
    # An empty access still names a region and an offset, which must exist.
    Case("empty read of region 12", region_read(12, 0, 0), errno.EINVAL),
    Case("empty read of an absent BAR", region_read(1, 0, 0), errno.EINVAL),
    Case("empty write past the config space", region_write(7, 1 << 63, 0, b""), errno.EINVAL),
    Case("write shorter than its count", region_write(7, 0x3C, 4, b"\1"), errno.EINVAL),
    Case(
        "DMA_MAP with two fds",
        dma_map(3, 0, 0, 0x1000),
        errno.EINVAL,
        make_fds=lambda: [small_memfd(), small_memfd()],
    ),
    Case(
        "DMA_MAP beyond the end of its file",
        dma_map(3, 0, 0, 0x100000),
        errno.EINVAL,
        make_fds=lambda: [small_memfd()],
    ),
    Case(
        "DMA_MAP of an eventfd",
        dma_map(3, 0, 0, 0x1000),
        errno.EINVAL,
        make_fds=lambda: [eventfd()],
    ),
    Case("DMA_MAP of size 0", dma_map(3, 0, 0, 0), errno.EINVAL),
    Case("DMA_MAP unaligned", dma_map(3, 0, 0x800, 0x1000), errno.EINVAL),
    Case(
        "DMA_UNMAP not page aligned",
        msg(3, struct.pack("<IIQQ", 24, 0, 0x800, 0x1000)),
        errno.EINVAL,
    ),
    Case(
        "DMA_UNMAP of size 0",
        msg(3, struct.pack("<IIQQ", 24, 0, 0, 0)),
        errno.EINVAL,
    ),
    # Unmap-all takes address = size = 0 only (spec R15).
    Case("DMA_UNMAP ALL with a size", msg(3, struct.pack("<IIQQ", 24, 2, 0, 0x1000)), errno.EINVAL),
    Case(
        "DMA_UNMAP asking for a dirty bitmap",
        msg(3, struct.pack("<IIQQQQ", 24 + 16 + 8, 1, 0, 0x1000, 0x1000, 8)),
        errno.ENOTSUP,
    ),
    Case(
        "SET_IRQS with fds but DATA_NONE",
        set_irqs(0x21, 2, 0, 1),
        errno.EINVAL,
        make_fds=lambda: [eventfd()],
    ),
    Case(
        "SET_IRQS fd count != count",
        set_irqs(0x24, 2, 0, 3),
        errno.EINVAL,
        make_fds=lambda: [eventfd(), eventfd()],
    ),
    Case("SET_IRQS index 9", set_irqs(0x24, 9, 0, 1), errno.EINVAL, make_fds=lambda: [eventfd()]),
    Case(
        "SET_IRQS with a pipe for an eventfd",
        set_irqs(0x24, 2, 0, 1),
        errno.EINVAL,
        make_fds=lambda: [pipe_end()],
    ),
    Case(
        "SET_IRQS with a memfd for an eventfd",
        set_irqs(0x24, 2, 0, 2),
        errno.EINVAL,
        make_fds=lambda: [eventfd(), small_memfd()],
    ),
    Case(
        "INTx resampler that is not an eventfd",
        set_irqs(0x14, 0, 0, 1),  # DATA_EVENTFD | ACTION_UNMASK: the INTx resampler
        errno.EINVAL,
        make_fds=lambda: [pipe_end()],
    ),
    Case(
        "SET_IRQS start past the vectors",
        set_irqs(0x24, 2, 200, 1),
        errno.EINVAL,
        make_fds=lambda: [eventfd()],
    ),
    Case("SET_IRQS two data types", set_irqs(0x23, 2, 0, 1, b"\1"), errno.EINVAL),
    Case("SET_IRQS ERR with MASK", set_irqs(0x09, 3, 0, 1), errno.EINVAL),
    Case("SET_IRQS count 0 with EVENTFD", set_irqs(0x24, 2, 0, 0), errno.EINVAL),
    # A de-assign (EVENTFD, no fds) with a count far past the vectors: refused before any
    # list is sized by it (a count near 2^32 once took the daemon's memory).
    Case("SET_IRQS de-assign of 2^32-1 vectors", set_irqs(0x24, 2, 0, 0xFFFFFFFF), errno.EINVAL),
    Case("SET_IRQS de-assign of 17 vectors", set_irqs(0x24, 2, 0, 17), errno.EINVAL),
    Case("DEVICE_FEATURE", msg(16, struct.pack("<II", 8, 1 | (1 << 16))), errno.ENOTTY),
    # PROBE may ask about GET and SET at once (vfio_ioctl_device_feature): the feature is
    # unsupported, not the request malformed.
    Case(
        "DEVICE_FEATURE probing GET|SET",
        msg(16, struct.pack("<II", 8, 1 | (7 << 16))),
        errno.ENOTTY,
    ),
    Case("DEVICE_FEATURE GET|SET", msg(16, struct.pack("<II", 8, 1 | (3 << 16))), errno.EINVAL),
    Case("DMA_READ sent by the client", msg(11, struct.pack("<QQ", 0, 4)), errno.EINVAL),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
async def test_bad_input(vgpud: Daemon, case: Case) -> None:
    before = open_fds()
    conn = await RawConn.open(vgpud.socket_path, negotiate=case.negotiate)
    try:  # closed however the case ends, so one red case does not leak into the next
        fds = case.make_fds()
        await conn.send(case.data, fds)
        for fd in fds:
            os.close(fd)  # the daemon got its own copies
        if case.name.startswith("EOF"):
            conn.stream.socket.shutdown(socket.SHUT_WR)
        reply = await conn.receive()
    finally:
        conn.close()
    if case.expect == CLOSE:
        assert reply is None, f"expected a close, got {reply}"
    else:
        assert reply is not None, "expected an error reply, the daemon closed"
        assert reply.is_error and reply.error == case.expect, reply
        assert reply.size == 16 and reply.payload == b""  # spec vfio-user.md R3
        assert reply.msg_id == struct.unpack_from("<H", case.data)[0]
    await vgpud.idle()
    assert open_fds() == before, "an fd leaked"
    # ... and the daemon serves the next client normally.
    async with await vgpud.connect() as client:
        assert (await client.device_info()).num_regions == 9


async def test_too_many_fds_close_the_connection(vgpud: Daemon) -> None:
    before = open_fds()
    conn = await RawConn.open(vgpud.socket_path)
    fds = [eventfd() for _ in range(40)]
    # More fds than max_msg_fds (16): the kernel truncates them (MSG_CTRUNC), we close.
    sock = conn.stream.socket
    ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
    sock.sendmsg([set_irqs(0x24, 2, 0, 40)], ancillary)
    for fd in fds:
        os.close(fd)
    assert await conn.receive() is None
    conn.close()
    await vgpud.idle()
    assert open_fds() == before


async def test_socket_failing_mid_message_releases_its_fds(vgpud: Daemon) -> None:
    """fds that came with a header are the daemon's to close when the body read fails (here:
    the body brings more fds than allowed, MSG_CTRUNC, so the stream is unusable)."""
    before = open_fds()
    conn = await RawConn.open(vgpud.socket_path)
    sock = conn.stream.socket
    message = dma_map(3, 0, 0, 0x1000)
    header_fds = [small_memfd()]
    body_fds = [eventfd() for _ in range(40)]
    for data, fds in ((message[:16], header_fds), (message[16:], body_fds)):
        ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
        sock.sendmsg([data], ancillary)
    for fd in header_fds + body_fds:
        os.close(fd)
    assert await conn.receive() is None
    conn.close()
    await vgpud.idle()
    assert open_fds() == before, "an fd leaked"


@pytest.mark.parametrize("argsz", [24, 32, 4096])
async def test_dma_unmap_reply_fits_its_argsz(vgpud: Daemon, argsz: int) -> None:
    # docs/interop/vfio-user.rst DMA_UNMAP (the sheet's §3.3 only gives QEMU's 24): argsz is
    # the most reply payload the client takes; the reply echoes the 24-byte request struct
    # (spec vfio-user.md §3.3; libvfio-user accepts any argsz >= 24 the same way).
    conn = await RawConn.open(vgpud.socket_path)
    try:
        reply = await conn.request(40, 3, struct.pack("<IIQQ", argsz, 0, 0x100000, 0x1000))
    finally:
        conn.close()
    assert reply is not None and not reply.is_error, reply
    assert reply.payload == struct.pack("<IIQQ", 24, 0, 0x100000, 0x1000)


async def test_posted_write_gets_no_reply(vgpud: Daemon) -> None:
    conn = await RawConn.open(vgpud.socket_path)
    # Spec R4/R11: a NO_REPLY write is applied and never answered; the next read sees it.
    await conn.send(msg(10, struct.pack("<QII", 0x3C, 7, 1) + b"\x0b", msg_id=20, flags=0x10))
    reply = await conn.request(21, 9, struct.pack("<QII", 0x3C, 7, 1))
    assert reply is not None and reply.msg_id == 21 and reply.payload[16:] == b"\x0b"
    conn.close()


async def test_error_on_posted_write_is_silent(vgpud: Daemon) -> None:
    conn = await RawConn.open(vgpud.socket_path)
    await conn.send(msg(10, struct.pack("<QII", 1 << 40, 0, 4) + b"abcd", msg_id=30, flags=0x10))
    reply = await conn.request(31, 4, struct.pack("<IIII", 16, 0, 0, 0))
    assert reply is not None and reply.msg_id == 31 and not reply.is_error
    conn.close()


async def test_client_vanishing_mid_reply_leaves_daemon_serving(vgpud: Daemon) -> None:
    conn = await RawConn.open(vgpud.socket_path)
    await conn.send(region_read(7, 0, 4096))
    conn.close()
    await vgpud.idle()
    with trio.fail_after(5):
        async with await vgpud.connect() as client:
            assert (await client.device_info()).num_irqs == 5


async def test_fds_inside_a_body_cut_off_by_the_negotiation_timeout_are_closed(
    vgpud: Daemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    """fds that arrive with body bytes (a protocol error) while the session gathers a body
    the client never finishes: the negotiation timeout ends the session mid-body, and those
    fds are the daemon's to close like any others."""
    monkeypatch.setattr(session_module, "NEGOTIATION_TIMEOUT", 0.3)
    before = open_fds()
    conn = await RawConn.open(vgpud.socket_path, negotiate=False)
    try:
        sock = conn.stream.socket
        sock.send(HEADER.pack(1, 4, 16 + 64, 0, 0))  # a 64-byte body, of which ...
        stray = [eventfd(), eventfd()]
        ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", stray).tobytes())]
        sock.sendmsg([bytes(8)], ancillary)  # ... 8 bytes come, with fds, and no more
        for fd in stray:
            os.close(fd)
        with trio.fail_after(10):
            assert await conn.receive() is None  # cut off at NEGOTIATION_TIMEOUT
    finally:
        conn.close()
    await vgpud.idle()
    assert open_fds() == before, "an fd leaked"


@pytest.mark.parametrize("split_header", [False, True], ids=["whole header", "split header"])
async def test_fds_inside_a_body_end_the_connection_at_once(
    vgpud: Daemon, split_header: bool
) -> None:
    """fds that come with body bytes break the stream (spec vfio-user.md §1: fds travel with
    a message's first byte). The daemon closes them, and the connection, as they arrive:
    gathering the rest of the body first let a client trickle a 1 MiB body a byte at a time,
    16 fds per byte, and so hold every descriptor of the daemon (all its devices') for as
    long as it liked. Each stray fd here is a pipe's write end: the read end sees EOF once
    the daemon has closed every copy."""
    before = open_fds()
    conn = await RawConn.open(vgpud.socket_path)
    read_end, write_end = os.pipe()
    try:
        sock = conn.stream.socket
        header = HEADER.pack(1, 10, 16 + 16 + 4096, 0, 0)  # a REGION_WRITE of 4 KiB ...
        if split_header:
            sock.send(header[:8])
            await trio.testing.wait_all_tasks_blocked()
            sock.send(header[8:])
        else:
            sock.send(header)
        ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [write_end] * 16))]
        with contextlib.suppress(OSError):  # the daemon may have closed us already
            for _ in range(3):  # ... whose first bytes bring 48 fds
                sock.sendmsg([b"x"], ancillary)
        os.close(write_end)
        write_end = -1
        with trio.fail_after(5):
            await trio.lowlevel.wait_readable(read_end)
            assert os.read(read_end, 1) == b""  # every copy closed
            assert await conn.receive() is None
    finally:
        conn.close()
        close_fds([read_end, write_end])
    await vgpud.idle()
    assert open_fds() == before, "an fd leaked"
