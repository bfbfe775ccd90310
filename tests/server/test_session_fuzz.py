"""Any sequence of well-framed requests, with any fds, against the real daemon.

The bad-input catalogue (test_bad_input.py) has one case per known failure; this drives the
session's handlers with hypothesis: requests of every command the daemon serves, with
values biased to the edges the handlers check (region and irq indices, offsets around the
region ends, page-unaligned DMA, fds of the wrong kind or number). Each example is one client
connection. What must hold (DESIGN.md "Errors and bad input"):

* no handler fails unexpectedly: the daemon's ``internal_errors`` count (requests answered
  EIO by an unexpected exception, sessions that failed) stays put -- a bug costs only one
  EIO reply, but it is still a bug;
* every reply answers the request it follows, or the daemon closes the connection;
* once the client has gone, every fd it sent is closed in the daemon;
* the next client is served normally.

The daemon runs in-process on the test's trio loop; hypothesis drives ordinary blocking
sockets from a worker thread.
"""

from __future__ import annotations

import array
import functools
import os
import socket
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.server.conftest import Daemon, open_fds
from tests.server.rawclient import HEADER, QEMU_VERSION

PAGE = 4096
# Commands the session serves (spec vfio-user.md §3), and some it must refuse.
DMA_MAP, DMA_UNMAP, GET_INFO, REGION_INFO, REGION_IO_FDS, IRQ_INFO, SET_IRQS = 2, 3, 4, 5, 6, 7, 8
REGION_READ, REGION_WRITE, DMA_READ, RESET, WRITE_MULTI, FEATURE = 9, 10, 11, 13, 15, 16
REGION_ENDS = [0, 16 << 20, 0, 1 << 30, 0, 4 << 30, 0, 0, 4096, 0]  # by region index

# Mostly values the handlers accept, so that requests get past the protocol's own checks.
indices = st.one_of(
    st.integers(0, 5), st.integers(0, 10), st.sampled_from([7, 8, 9, 0xFFFF, 0xFFFF_FFFF])
)
argszs = st.one_of(st.sampled_from([16, 32, 64]), st.sampled_from([16, 20]), st.integers(0, 128))
offsets = st.one_of(
    st.sampled_from([0, 4, 0x10, 0x3C, 0xA0, 0x1498, 0xFF0000, PAGE]),
    st.integers(0, (1 << 33)),
    st.sampled_from([(1 << 64) - 4, (1 << 63)]),
)
counts = st.one_of(st.sampled_from([0, 1, 2, 4, 8, PAGE]), st.integers(0, 1 << 21))
fd_kinds = st.lists(st.sampled_from(["eventfd", "memfd", "pipe", "file"]), max_size=3)


def region_access(command: int) -> st.SearchStrategy[tuple[int, bytes]]:
    def build(region: int, offset: int, count: int, data_len: int) -> tuple[int, bytes]:
        if region < len(REGION_ENDS) and REGION_ENDS[region] and offset == 0:
            offset = REGION_ENDS[region] - min(count, REGION_ENDS[region])  # the last bytes
        body = struct.pack("<QII", offset & ((1 << 64) - 1), region & 0xFFFF_FFFF, count)
        if command == REGION_WRITE:
            body += b"\x5a" * data_len
        return command, body

    return st.builds(
        build, indices, offsets, st.integers(0, 64), st.one_of(st.integers(0, 64), st.just(8))
    )


def dma_map() -> st.SearchStrategy[tuple[int, bytes]]:
    def build(flags: int, offset: int, address: int, size: int) -> tuple[int, bytes]:
        return DMA_MAP, struct.pack("<IIQQQ", 32, flags, offset, address, size)

    sizes = st.one_of(st.sampled_from([0, PAGE, 2 * PAGE, 0x800, 1 << 40]), st.integers(0, 1 << 20))
    return st.builds(build, st.integers(0, 7), sizes, st.integers(0, 1 << 40), sizes)


def set_irqs() -> st.SearchStrategy[tuple[int, bytes]]:
    def build(flags: int, index: int, start: int, count: int, extra: bytes) -> tuple[int, bytes]:
        body = struct.pack("<IIIII", 20 + len(extra), flags, index, start, count) + extra
        return SET_IRQS, body

    flag_sets = st.sampled_from([0x21, 0x22, 0x24, 0x11, 0x12, 0x14, 0x09, 0x0A, 0x23, 0x3F, 0x40])
    return st.builds(
        build,
        flag_sets,
        st.integers(0, 6),
        st.integers(0, 20),
        st.integers(0, 20),
        st.binary(max_size=4),
    )


def simple(command: int, body: st.SearchStrategy[bytes]) -> st.SearchStrategy[tuple[int, bytes]]:
    return body.map(lambda b: (command, b))


requests = st.one_of(
    region_access(REGION_READ),
    region_access(REGION_WRITE),
    dma_map(),
    st.builds(
        lambda address, size, flags: (DMA_UNMAP, struct.pack("<IIQQ", 24, flags, address, size)),
        st.sampled_from([0, PAGE, 1 << 30]),
        st.sampled_from([0, PAGE, 2 * PAGE]),
        st.sampled_from([0, 2, 4]),  # 2: UNMAP_ALL
    ),
    simple(GET_INFO, st.builds(lambda a: struct.pack("<IIII", a, 0, 0, 0), argszs)),
    simple(
        REGION_INFO,
        st.builds(lambda a, i: struct.pack("<IIIIQQ", a, 0, i, 0, 0, 0), argszs, indices),
    ),
    simple(
        REGION_IO_FDS,
        st.builds(lambda a, i: struct.pack("<IIII", a, 0, i, 0), argszs, indices),
    ),
    simple(
        IRQ_INFO,
        st.builds(lambda a, i: struct.pack("<IIII", a, 0, i, 0), argszs, indices),
    ),
    set_irqs(),
    simple(RESET, st.just(b"")),
    simple(DMA_READ, st.binary(max_size=24)),
    simple(
        FEATURE,
        st.builds(lambda a, f: struct.pack("<II", a, f), argszs, st.integers(0, 0x7_0000)),
    ),
    simple(WRITE_MULTI, st.binary(max_size=80)),
    st.tuples(st.sampled_from([0, 1, 12, 14, 17, 99]), st.binary(max_size=32)),
)
sessions = st.lists(st.tuples(requests, fd_kinds, st.booleans()), min_size=1, max_size=12)


def make_fd(kind: str, directory: Path) -> int:
    if kind == "eventfd":
        return os.eventfd(0, os.EFD_CLOEXEC)
    if kind == "memfd":
        fd = os.memfd_create("guest-ram", os.MFD_CLOEXEC)
        os.ftruncate(fd, 4 * PAGE)
        return fd
    if kind == "pipe":
        read_end, write_end = os.pipe()
        os.close(read_end)
        return write_end
    return os.open(directory / "plain-file", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)


def connect(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(30)  # a hang guard only
    sock.connect(str(path))
    return sock


def receive(sock: socket.socket) -> tuple[int, int, list[int]] | None:
    """(msg_id, flags, fds) of the next reply, or None when the daemon closed."""
    data, fds = b"", []
    size = 16
    while len(data) < size:
        try:
            chunk, ancdata, _, _ = sock.recvmsg(size - len(data), socket.CMSG_SPACE(64 * 4))
        except ConnectionResetError:
            return None
        for level, kind, payload in ancdata:
            if (level, kind) == (socket.SOL_SOCKET, socket.SCM_RIGHTS):
                fds += array.array("i", payload[: len(payload) - len(payload) % 4]).tolist()
        if not chunk:
            for fd in fds:
                os.close(fd)
            return None
        data += chunk
        if len(data) == 16:
            size = HEADER.unpack(data)[2]
    msg_id, _, _, flags, _ = HEADER.unpack(data[:16])
    return msg_id, flags, fds


class Target(Protocol):
    """What the fuzz needs of a server under test (either engine)."""

    @property
    def socket_path(self) -> Path: ...

    @property
    def internal_errors(self) -> int: ...

    async def idle(self) -> None: ...


@dataclass
class PythonEngine:
    daemon: Daemon

    @property
    def socket_path(self) -> Path:
        return self.daemon.socket_path

    @property
    def internal_errors(self) -> int:
        return self.daemon.server.internal_errors

    async def idle(self) -> None:
        await self.daemon.idle()


async def test_any_request_sequence_is_answered_or_closed_and_leaks_nothing(
    vgpud: Daemon, tmp_path: Path
) -> None:
    # The daemon runs in this (trio) thread; hypothesis drives blocking clients from a worker
    # thread, and waits for the daemon to be idle through trio.from_thread.
    await trio.to_thread.run_sync(functools.partial(fuzz_sessions, PythonEngine(vgpud), tmp_path))


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(session=sessions)
def fuzz_sessions(target: Target, tmp_path: Path, session: list[Any]) -> None:
    before = open_fds()
    bugs_before = target.internal_errors
    sock = connect(target.socket_path)
    try:
        sock.sendall(QEMU_VERSION)
        assert receive(sock) is not None
        for msg_id, ((command, body), kinds, posted) in enumerate(session, start=1):
            fds = [make_fd(kind, tmp_path) for kind in kinds]
            flags = 0x10 if posted and command == REGION_WRITE else 0  # NO_REPLY
            frame = HEADER.pack(msg_id, command, 16 + len(body), flags, 0) + body
            try:
                ancillary = (
                    [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
                    if fds
                    else []
                )
                sock.sendmsg([frame], ancillary)
            except (BrokenPipeError, ConnectionResetError):
                break  # the daemon closed the connection on an earlier request
            finally:
                for fd in fds:
                    os.close(fd)
            if flags:
                continue
            reply = receive(sock)
            if reply is None:
                break  # a clean close is an allowed answer
            reply_id, reply_flags, reply_fds = reply
            for fd in reply_fds:
                os.close(fd)
            assert reply_id == msg_id and reply_flags & 0xF == 1, (command, reply)
    finally:
        sock.close()
    trio.from_thread.run(target.idle)
    # Each is also logged, with its traceback ("internal error handling request").
    assert target.internal_errors == bugs_before, "a request met a bug in vgpud"
    assert open_fds() == before, "an fd the client sent is still open in the daemon"
    # The next client is served normally.
    with connect(target.socket_path) as sock:
        sock.sendall(QEMU_VERSION)
        assert receive(sock) is not None
        sock.sendall(HEADER.pack(1, GET_INFO, 32, 0, 0) + struct.pack("<IIII", 16, 0, 0, 0))
        reply = receive(sock)
        assert reply is not None and not reply[1] & 0x20
    trio.from_thread.run(target.idle)
