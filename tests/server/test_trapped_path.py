"""The session's trapped-access fast path where the socket does not hand it a whole message:
what it read is handed to the general path, which finishes the job as it always did.

Each test writes its bytes with plain syscalls, without yielding, so the in-process daemon
sees exactly them when it next runs; ``wait_all_tasks_blocked`` then lets it read what is
there and park before the rest is sent.
"""

from __future__ import annotations

import array
import os
import socket
import struct

import trio
import trio.testing

from tests.server.conftest import Daemon, open_fds
from tests.server.rawclient import HEADER, QEMU_VERSION, RawConn

REGION_READ, REGION_WRITE = 9, 10
CONFIG, BAR4 = 7, 4
ACCESS = struct.Struct("<QII")


def _write(msg_id: int, region: int, offset: int, data: bytes) -> bytes:
    body = ACCESS.pack(offset, region, len(data)) + data
    return HEADER.pack(msg_id, REGION_WRITE, 16 + len(body), 0, 0) + body


def _read(msg_id: int, region: int, offset: int, count: int) -> bytes:
    return HEADER.pack(msg_id, REGION_READ, 32, 0, 0) + ACCESS.pack(offset, region, count)


async def _negotiated(vgpud: Daemon) -> tuple[RawConn, socket.socket]:
    conn = await RawConn.open(vgpud.socket_path, negotiate=False)
    sock = conn.stream.socket  # non-blocking; the test's few bytes always fit its buffer
    sock.sendall(QEMU_VERSION)
    reply = await conn.receive()
    assert reply is not None and not reply.is_error
    return conn, sock


async def test_a_trapped_write_whose_body_arrives_late_is_served(vgpud: Daemon) -> None:
    conn, sock = await _negotiated(vgpud)
    try:
        sock.sendall(_write(1, CONFIG, 0x04, struct.pack("<H", 0x0006)))  # memory on
        assert (reply := await conn.receive()) is not None and not reply.is_error
        wire = _write(2, BAR4, 0x100, b"late body")
        sock.sendall(wire[: 16 + 5])  # the header and 5 bytes of the body
        await trio.testing.wait_all_tasks_blocked()  # the daemon took them and parked
        sock.sendall(wire[16 + 5 :])
        assert (reply := await conn.receive()) is not None and not reply.is_error
        assert reply.msg_id == 2
        sock.sendall(_read(3, BAR4, 0x100, 9))
        reply = await conn.receive()
        assert reply is not None and reply.payload[ACCESS.size :] == b"late body"
    finally:
        conn.close()


async def test_a_trapped_read_whose_body_arrives_late_is_served(vgpud: Daemon) -> None:
    conn, sock = await _negotiated(vgpud)
    try:
        wire = _read(1, CONFIG, 0, 4)
        sock.sendall(wire[:16])  # the header alone
        await trio.testing.wait_all_tasks_blocked()
        sock.sendall(wire[16:])
        reply = await conn.receive()
        assert reply is not None and not reply.is_error
        assert reply.payload[ACCESS.size :] == b"\xde\x10\x42\x23"  # NVIDIA, 0x2342
    finally:
        conn.close()


async def test_fds_with_a_trapped_access_body_close_the_connection(vgpud: Daemon) -> None:
    """fds belong to a message's first byte (spec vfio-user.md §1): ones that come with the
    body are fatal on the fast path as on the general path, and are not leaked."""
    before = open_fds()
    conn, sock = await _negotiated(vgpud)
    stray = os.eventfd(0, os.EFD_CLOEXEC)
    try:
        wire = _write(1, CONFIG, 0x3C, b"\x0b")
        sock.sendmsg([wire[:16]])
        fds = array.array("i", [stray]).tobytes()
        sock.sendmsg([wire[16:]], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])
        assert await conn.receive() is None  # closed, no reply
    finally:
        conn.close()
        os.close(stray)
    await vgpud.idle()
    assert open_fds() == before
    async with await vgpud.connect() as client:  # and the next client is served
        assert (await client.device_info()).num_regions == 9
