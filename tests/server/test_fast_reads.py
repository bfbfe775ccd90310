"""Config reads answered by the C loop (vgpud/server/fast_reads.py): the same bytes as the
Python path for every message, and a wait in poll() that never holds up the rest of the loop.

The equivalence tests replay one seeded script of config reads, writes and resets, the
malformed ones included, against a daemon with the C loop and one without it (the extension
reported missing), and compare every reply byte for byte.
"""

from __future__ import annotations

import os
import random
import socket
import struct
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest
import structlog.testing
import trio

from backends.device import ConfigView
from tests.server.conftest import Daemon, open_fds, tray_devices
from tests.server.rawclient import HEADER, QEMU_VERSION, RawConn
from vgpud import daemon
from vgpud.config import DaemonConfig, single_device
from vgpud.server import fast_reads
from vgpud.server.fast_reads import FastReadStats

REGION_READ, REGION_WRITE, DEVICE_RESET = 9, 10, 13
CONFIG, BAR0 = 7, 0
FLAG_NO_REPLY = 0x10
ACCESS = struct.Struct("<QII")
T = TypeVar("T")


def _read(msg_id: int, offset: int, count: int, region: int = CONFIG, flags: int = 0) -> bytes:
    return HEADER.pack(msg_id, REGION_READ, 32, flags, 0) + ACCESS.pack(offset, region, count)


def _write(msg_id: int, offset: int, data: bytes) -> bytes:
    body = ACCESS.pack(offset, CONFIG, len(data)) + data
    return HEADER.pack(msg_id, REGION_WRITE, 16 + len(body), 0, 0) + body


def _script(seed: int, steps: int) -> list[bytes]:
    """Config traffic as a guest and a hostile VMM make it; msg_ids count up from 1."""
    rng = random.Random(seed)
    out: list[bytes] = []
    for msg_id in range(1, steps + 1):
        kind = rng.random()
        if kind < 0.55:  # plain reads, the computed and emulated registers among them
            offset = rng.choice([0, 4, 6, 0x10, 0x18, 0x1C, 0x20, 0x24, 0x34, 0x40, 0x100])
            offset = offset if rng.random() < 0.5 else rng.randrange(4096)
            count = rng.choice([1, 2, 4, 4, 8, 16, 64, 256, 4096 - offset])
            out.append(_read(msg_id, offset, max(1, min(count, 4096 - offset))))
        elif kind < 0.75:  # writes: BAR sizing, COMMAND, PM and MSI-X control, anywhere
            offset = rng.choice([0x04, 0x10, 0x14, 0x18, 0x1C, 0x20, 0x24, 0x44, 0x6A])
            value = rng.choice([0xFFFFFFFF, 0, 0x6, 0x12345678, 0x8000C000])
            out.append(_write(msg_id, offset, struct.pack("<I", value)[: rng.choice([1, 2, 4])]))
        elif kind < 0.78:
            out.append(HEADER.pack(msg_id, DEVICE_RESET, 16, 0, 0))
        else:  # what the C loop must leave to the Python path
            bad = rng.choice(
                [
                    _read(msg_id, 0, 0),  # empty
                    _read(msg_id, 4095, 2),  # past the end
                    _read(msg_id, 1 << 63, 4),
                    _read(msg_id, 0, 1 << 21),  # over max_data_xfer_size
                    _read(msg_id, 0, 4, flags=FLAG_NO_REPLY),  # a posted read: no reply
                    _read(msg_id, 0, 4, region=BAR0),
                    _read(msg_id, 0, 4, region=12),
                    HEADER.pack(msg_id, REGION_READ, 32, 0, 5) + ACCESS.pack(0, CONFIG, 4),
                ]
            )
            out.append(bad)
    return out


Reply = tuple[int, int, int, int, int, bytes]


async def _open(vgpud: Daemon, monkeypatch: pytest.MonkeyPatch, *, fast: bool) -> RawConn:
    """A negotiated connection whose session has the C loop or not (``MISSING`` is read as
    the session starts)."""
    with monkeypatch.context() as patch:
        if not fast:
            patch.setattr(fast_reads, "MISSING", "switched off by the test")
        conn = await RawConn.open(vgpud.socket_path)
    current = vgpud.server.current_session
    assert current is not None and (current.fast is not None) == fast
    return conn


async def _replay(conn: RawConn, script: list[bytes]) -> list[Reply | None]:
    """Each message's reply, None for one that gets none (a posted read)."""
    replies: list[Reply | None] = []
    for wire in script:
        await conn.send(wire)
        if HEADER.unpack_from(wire)[3] & FLAG_NO_REPLY:
            replies.append(None)
            continue
        reply = await conn.receive()
        assert reply is not None, f"connection closed after {wire.hex()}"
        assert not reply.fds
        replies.append(
            (reply.msg_id, reply.command, reply.size, reply.flags, reply.error, reply.payload)
        )
    return replies


def _stats(vgpud: Daemon) -> FastReadStats:
    current = vgpud.server.current_session
    assert current is not None and current.fast is not None
    return current.fast.stats


async def _start(nursery: trio.Nursery, tmp_path: Path, name: str, **device: object) -> Daemon:
    config = single_device(
        socket_path=tmp_path / f"{name}.sock",
        name=name,
        memory_size="4GiB",
        backing_dir=tmp_path / f"{name}-mem",
        **device,  # type: ignore[arg-type]
    )
    servers = await nursery.start(daemon.run, DaemonConfig(devices=(config,)))
    return Daemon(tmp_path / f"{name}.sock", tmp_path / f"{name}-mem", servers[0])


def test_the_c_loop_is_built() -> None:
    assert fast_reads.MISSING is None, (
        "vgpud.server._fast_reads is missing: `pip install -e .` builds it with the host's C "
        "compiler (gcc) and Python's headers (python3-dev)"
    )


async def test_the_c_loop_can_wait_in_this_trio() -> None:
    """The wait needs trio internals (fast_reads.LoopWait): a trio that moved them fails
    here rather than making every config read park in trio again."""
    loop = fast_reads.LoopWait.current()
    assert isinstance(loop, fast_reads.LoopWait), loop
    cap = int(fast_reads.WAIT_CAP_SECONDS * 1000)
    assert 0 < loop.wait_ms() <= cap
    with trio.move_on_after(0.02):  # noqa: ASYNC100 -- its deadline, not a timeout, is the point
        assert loop.wait_ms() <= 20
    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.sleep, 0)
        assert loop.wait_ms() == 0  # a task to run: no wait at all


@pytest.mark.parametrize(
    "device", [{"profile": "gh200"}, {"profile": "gb300", "cxl_dvsec": True}], ids=str
)
async def test_replies_are_the_python_paths_byte_for_byte(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, device: dict[str, object]
) -> None:
    script = _script(seed=26, steps=800)
    async with trio.open_nursery() as nursery:
        python = await _start(nursery, tmp_path, "python", **device)
        fast = await _start(nursery, tmp_path, "fast", **device)
        python_conn = await _open(python, monkeypatch, fast=False)
        fast_conn = await _open(fast, monkeypatch, fast=True)
        try:
            expected = await _replay(python_conn, script)
            got = await _replay(fast_conn, script)
            stats = _stats(fast)
        finally:
            python_conn.close()
            fast_conn.close()
        nursery.cancel_scope.cancel()
    assert len(got) == len(expected)
    for wire, mine, theirs in zip(script, got, expected, strict=True):
        assert mine == theirs, f"{wire.hex()}: {mine} != {theirs}"
    # Not vacuous: many plain reads went through C (not all: after a message it declined,
    # the C loop waits for a config read the Python path serves; session._try_fast).
    plain = sum(1 for wire in script if wire[2:4] == b"\x09\x00" and wire[4:16] == b" " + bytes(11))
    assert stats.served > plain // 4, (stats, plain)


class BlockingClient:
    """A client in another thread, on a blocking socket, as a VMM's vCPU thread is: the
    daemon's loop learns of its messages only through the kernel."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(str(path))
        self.sock.sendall(QEMU_VERSION)
        assert not self.receive()[3] & 0x20

    def _exactly(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            assert chunk, "the daemon closed the connection"
            data += chunk
        return data

    def receive(self) -> Reply:
        msg_id, command, size, flags, error = HEADER.unpack(self._exactly(16))
        return msg_id, command, size, flags, error, self._exactly(size - 16)

    def reads(self, count: int, offset: int = 0, size: int = 4) -> list[Reply]:
        replies = []
        for msg_id in range(1, count + 1):
            self.sock.sendall(_read(msg_id, offset, size))
            replies.append(self.receive())
        return replies

    def close(self) -> None:
        self.sock.close()


VENDOR_DEVICE = b"\xde\x10\x42\x23"  # NVIDIA, GH200 (0x2342)


async def _in_thread(fn: Callable[[], T]) -> T:
    return await trio.to_thread.run_sync(fn)


@pytest.mark.timeout(60)
async def test_a_wait_in_c_lets_another_device_be_served(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """gpu0's client goes quiet, so its session waits for it in C; gpu1's clients (one after
    the other, each in a thread) are served all the same, as are the loop's timers. With the
    backstop pushed out to a minute, a wake-up that only the backstop delivered would run
    the test into its timeout."""
    monkeypatch.setattr(fast_reads, "WAIT_CAP_SECONDS", 60.0)
    devices = tray_devices(tmp_path)
    async with trio.open_nursery() as nursery:
        servers = await nursery.start(daemon.run, DaemonConfig(devices=devices))
        quiet = await _in_thread(lambda: BlockingClient(devices[0].socket_path))  # type: ignore[arg-type]
        try:
            assert (await _in_thread(lambda: quiet.reads(3)))[-1][5][16:] == VENDOR_DEVICE
            for _ in range(3):
                busy = await _in_thread(lambda: BlockingClient(devices[1].socket_path))  # type: ignore[arg-type]
                replies = await _in_thread(lambda: busy.reads(50))  # noqa: B023
                busy.close()
                assert [reply[5][16:] for reply in replies] == [VENDOR_DEVICE] * 50
                await trio.sleep(0.05)  # a timer of the loop's own, met on time
            stats = servers[0].current_session.fast.stats
        finally:
            quiet.close()
        nursery.cancel_scope.cancel()
    assert stats.served == 3 and stats.woken_by_loop >= 1, stats


async def test_a_reply_the_socket_cannot_take_whole_is_sent_in_full(tmp_path: Path) -> None:
    """Large config reads (all of it past the emulated BARs) sent back to back before any
    reply is read: the replies (1.6 MB in all) fill the socket, the C loop hands the rest of
    one to the Python path, and every reply arrives whole and in order."""
    count, offset = 400, 0x40
    size = 4096 - offset
    async with trio.open_nursery() as nursery:
        vgpud = await _start(nursery, tmp_path, "gpu0")
        client = await _in_thread(lambda: BlockingClient(vgpud.socket_path))
        try:
            expected = (await _in_thread(lambda: client.reads(1, offset, size)))[0][5][16:]
            requests = b"".join(_read(i, offset, size) for i in range(1, count + 1))
            client.sock.sendall(requests)
            replies = await _in_thread(lambda: [client.receive() for _ in range(count)])
            stats = _stats(vgpud)
            model = vgpud.server.device.region_read(CONFIG, offset, size)
        finally:
            client.close()
        nursery.cancel_scope.cancel()
    assert expected == model and len(expected) == size
    assert [(reply[0], reply[2], reply[5][16:]) for reply in replies] == [
        (i, 32 + size, expected) for i in range(1, count + 1)
    ]
    assert stats.unsent >= 1 and stats.served == count + 1, stats


async def test_fds_with_a_config_read_are_the_python_paths_to_refuse(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A config read carrying an fd: the C loop leaves it (and the fd) queued, the Python
    path answers as it always did, and the daemon keeps no fd of it."""
    outcomes = []
    async with trio.open_nursery() as nursery:
        for fast in (False, True):
            vgpud = await _start(nursery, tmp_path, f"gpu{int(fast)}")
            conn = await _open(vgpud, monkeypatch, fast=fast)
            before = open_fds()
            passed = os.eventfd(0)
            try:
                await conn.send(_read(7, 0, 4), [passed])
            finally:
                os.close(passed)
            reply = await conn.receive()
            outcomes.append(None if reply is None else (reply.msg_id, reply.flags, reply.error))
            conn.close()
            await vgpud.idle()
            assert open_fds() <= before
        nursery.cancel_scope.cancel()
    assert outcomes[0] == outcomes[1]


async def test_fast_config_reads_can_be_switched_off(tmp_path: Path) -> None:
    """``[daemon] fast_config_reads = false`` (``--no-fast-config-reads``): no C loop, and
    the "serving" line says so."""
    config = single_device(
        socket_path=tmp_path / "gpu0.sock", memory_size="4GiB", backing_dir=tmp_path / "mem"
    )
    with structlog.testing.capture_logs() as logs:
        async with trio.open_nursery() as nursery:
            off = DaemonConfig(devices=(config,), fast_config_reads=False)
            servers = await nursery.start(daemon.run, off)
            conn = await RawConn.open(config.socket_path)  # type: ignore[arg-type]
            try:
                assert servers[0].current_session.fast is None
                await conn.send(_read(1, 0, 4))
                reply = await conn.receive()
                assert reply is not None and reply.payload[16:] == VENDOR_DEVICE
            finally:
                conn.close()
            nursery.cancel_scope.cancel()
    serving = [line for line in logs if line["event"] == "serving"]
    assert serving[0]["fast_config_reads"] == "off: fast_config_reads = false"


ODD_READS = {
    "a byte past the head": HEADER.pack(3, REGION_READ, 33, 0, 0)
    + ACCESS.pack(0, CONFIG, 4)
    + b"\0",
    "a reply's type": HEADER.pack(3, REGION_READ, 32, 0x1, 0) + ACCESS.pack(0, CONFIG, 4),
    "short of its head": HEADER.pack(3, REGION_READ, 31, 0, 0) + ACCESS.pack(0, CONFIG, 4)[:15],
    "unknown flags": HEADER.pack(3, REGION_READ, 32, 0x80, 0) + ACCESS.pack(0, CONFIG, 4),
    "a write of no data": HEADER.pack(3, REGION_WRITE, 32, 0, 0) + ACCESS.pack(0, CONFIG, 4),
}


@pytest.mark.parametrize("wire", ODD_READS.values(), ids=ODD_READS.keys())
async def test_odd_config_reads_meet_what_they_always_met(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, wire: bytes
) -> None:
    """Each gets the Python path's answer (an error reply, or the connection closed), then
    a plain config read after it the same reply, whichever path serves the session."""
    outcomes = []
    async with trio.open_nursery() as nursery:
        for fast in (False, True):
            vgpud = await _start(nursery, tmp_path, f"gpu{int(fast)}")
            conn = await _open(vgpud, monkeypatch, fast=fast)
            try:
                await conn.send(wire + _read(4, 0, 4))
                replies = [await conn.receive(), await conn.receive()]
            finally:
                conn.close()
            outcomes.append(
                [None if r is None else (r.msg_id, r.flags, r.error, r.payload) for r in replies]
            )
        nursery.cancel_scope.cancel()
    assert outcomes[0] == outcomes[1]


class FixedWait(fast_reads.LoopWait):
    """A loop whose "epoll fd" the test makes ready, and a fixed time to its next timer."""

    def __init__(self, fd: int, wait_ms: int) -> None:
        super().__init__(None, fd)
        self._wait_ms = wait_ms

    def wait_ms(self) -> int:
        return self._wait_ms


def test_the_c_loop_stops_for_the_rest_of_the_loop_and_not_for_nobody() -> None:
    """Straight on a socketpair: with the loop idle a call answers past its budget and then
    waits until the loop's next timer; with the loop ready it stops at the budget, and does
    not wait."""
    ours, theirs = socket.socketpair()
    loop_fd = os.eventfd(0, os.EFD_NONBLOCK)
    config = bytearray(os.urandom(4096))
    fast = fast_reads.FastReads(ours.fileno(), ConfigView(config), FixedWait(loop_fd, wait_ms=20))
    limits = (1 << 12, 1 << 20)
    try:
        theirs.sendall(b"".join(_read(i, 0x40, 4) for i in range(100)))
        assert fast.serve(*limits) == (100, fast_reads.Outcome.WOULD_BLOCK)
        assert (fast.stats.waits, fast.stats.timed_out) == (1, 1)
        os.eventfd_write(loop_fd, 1)  # something else in the loop is ready
        theirs.sendall(b"".join(_read(i, 0x40, 4) for i in range(100, 200)))
        assert fast.serve(*limits) == (fast_reads.BUDGET, fast_reads.Outcome.BUDGET)
        served = fast_reads.BUDGET
        while (got := fast.serve(*limits))[1] is fast_reads.Outcome.BUDGET:
            served += got[0]
        assert (served + got[0], got[1]) == (100, fast_reads.Outcome.WOULD_BLOCK)
        assert fast.stats.woken_by_loop == 1  # the empty socket's wait ended at once
        replies = b""
        while len(replies) < 200 * 36:
            replies += theirs.recv(65536)
        assert all(replies[i * 36 + 32 : i * 36 + 36] == config[0x40:0x44] for i in range(200))
    finally:
        fast.close()
        os.close(loop_fd)
        ours.close()
        theirs.close()


async def test_a_run_of_bar0_reads_does_not_call_the_c_loop(tmp_path: Path) -> None:
    """After a message it declined, the C loop is not called again until the Python path
    serves a config read (session._try_fast): a guest's BAR0 accesses do not pay for it."""
    async with trio.open_nursery() as nursery:
        vgpud = await _start(nursery, tmp_path, "gpu0")
        client = await _in_thread(lambda: BlockingClient(vgpud.socket_path))
        try:
            await _in_thread(lambda: client.reads(3))
            before = _stats(vgpud)

            def bar0_then_config() -> list[Reply]:
                replies = []
                for msg_id in range(1, 51):
                    client.sock.sendall(_read(msg_id, 0, 4, region=BAR0))
                    replies.append(client.receive())
                return replies + client.reads(3)

            replies = await _in_thread(bar0_then_config)
            after = _stats(vgpud)
        finally:
            client.close()
        nursery.cancel_scope.cancel()
    assert all(not reply[3] & 0x20 for reply in replies)
    # One call declines the first BAR0 read; then none until the Python path serves the
    # first config read after them, and the C loop takes the other two.
    assert after.calls - before.calls <= 3, (before, after)
    assert after.served - before.served == 2, (before, after)
