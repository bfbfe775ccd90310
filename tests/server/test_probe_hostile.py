"""``vgpud probe`` against broken servers: one line and exit 1, in bounded time and memory.

A probe is pointed at servers of any quality. An audit found tracebacks (protocol errors,
an errno past a C int), hangs (a server that stops answering) and unbounded work (2^32
regions, an argsz that keeps growing); each case here is a small fake server.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import struct
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import trio

from vgpud import cli, probe
from vgpud.client import VfioUserClient, VfioUserError

HEADER = struct.Struct("<HHIII")  # msg_id, command, size, flags, error
REPLY, ERROR = 0x1, 0x20
VERSION_REPLY = b"\0\0\0\0" + json.dumps({"capabilities": {"max_msg_fds": 8}}).encode() + b"\0"

Script = Callable[[socket.socket], None]


def read_message(conn: socket.socket) -> tuple[int, int]:
    """(msg_id, command) of the next request; its body is read and dropped."""
    header = conn.recv(HEADER.size, socket.MSG_WAITALL)
    msg_id, command, size, _, _ = HEADER.unpack(header)
    if size > HEADER.size:
        conn.recv(size - HEADER.size, socket.MSG_WAITALL)
    return msg_id, command


def reply(conn: socket.socket, msg_id: int, command: int, body: bytes, error: int = 0) -> None:
    flags = REPLY | (ERROR if error else 0)
    conn.sendall(HEADER.pack(msg_id, command, HEADER.size + len(body), flags, error) + body)


def negotiated(then: Script) -> Script:
    def script(conn: socket.socket) -> None:
        msg_id, command = read_message(conn)
        reply(conn, msg_id, command, VERSION_REPLY)
        then(conn)

    return script


def device_info(num_regions: int, num_irqs: int) -> Script:
    def script(conn: socket.socket) -> None:
        msg_id, command = read_message(conn)
        reply(conn, msg_id, command, struct.pack("<IIII", 16, 3, num_regions, num_irqs))
        conn.recv(1)  # until the probe gives up

    return script


def growing_argsz(conn: socket.socket) -> None:
    msg_id, command = read_message(conn)
    reply(conn, msg_id, command, struct.pack("<IIII", 16, 3, 9, 5))
    argsz = 32
    while True:
        msg_id, command = read_message(conn)
        if not command:
            return
        argsz += 8  # never satisfied
        reply(conn, msg_id, command, struct.pack("<IIIIQQ", argsz, 0, 0, 0, 0, 0))


def silent(conn: socket.socket) -> None:
    read_message(conn)
    conn.recv(1)  # answers nothing, until the probe leaves


def garbage(conn: socket.socket) -> None:
    read_message(conn)
    conn.sendall(b"\xff" * 64)


def errno_past_a_c_int(conn: socket.socket) -> None:
    msg_id, command = read_message(conn)
    reply(conn, msg_id, command, b"", error=0xFFFFFFFF)


@pytest.fixture
def fake_server(tmp_path: Path) -> Iterator[Callable[[Script], Path]]:
    threads: list[threading.Thread] = []
    listeners: list[socket.socket] = []

    def start(script: Script) -> Path:
        path = tmp_path / f"fake{len(listeners)}.sock"
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(path))
        listener.listen(1)
        listeners.append(listener)

        def serve() -> None:
            conn, _ = listener.accept()
            with conn:
                try:
                    script(conn)
                except (OSError, struct.error):
                    pass  # the probe left

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        threads.append(thread)
        return path

    yield start
    for listener in listeners:
        listener.close()
    for thread in threads:
        thread.join(timeout=10)


@pytest.mark.parametrize(
    ("script", "message"),
    [
        (garbage, "neither command nor reply"),
        (errno_past_a_c_int, "VERSION failed: unknown error (errno 4294967295)"),
        (negotiated(device_info(0xFFFFFFFF, 5)), "claims 4294967295 regions"),
        (negotiated(device_info(9, 0xFFFFFFFF)), "4294967295 interrupt types"),
        (negotiated(growing_argsz), "keeps asking for a larger argsz"),
        (silent, "no complete answer within 0.5 s"),
    ],
    ids=["garbage", "errno-u32", "regions-2^32", "irqs-2^32", "argsz-grows", "silent"],
)
def test_a_broken_server_gets_one_line_and_exit_1(
    fake_server: Callable[[Script], Path],
    script: Script,
    message: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(probe, "PROBE_TIMEOUT", 0.5)
    path = fake_server(script)
    assert cli.main(["probe", str(path)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err


def device_info_with_an_fd(error: int, closed: threading.Event) -> Script:
    """DEVICE_GET_INFO answered (with ``error``, or a well-formed reply) and an eventfd that
    belongs to neither; ``closed`` is set once the server's own copy is closed."""

    def script(conn: socket.socket) -> None:
        msg_id, command = read_message(conn)
        body = b"" if error else struct.pack("<IIII", 16, 3, 9, 5)
        flags = REPLY | (ERROR if error else 0)
        header = HEADER.pack(msg_id, command, HEADER.size + len(body), flags, error)
        stray = os.eventfd(0, os.EFD_CLOEXEC)
        try:
            socket.send_fds(conn, [header + body], [stray])
        finally:
            os.close(stray)
            closed.set()
        conn.recv(1)  # until the client leaves

    return script


def eventfds() -> int:
    """How many eventfds this process holds (the fake server's thread is in it too)."""
    held = 0
    for name in os.listdir("/proc/self/fd"):
        try:
            held += os.readlink(f"/proc/self/fd/{name}") == "anon_inode:[eventfd]"
        except OSError:
            pass  # the listing's own fd, closed already
    return held


@pytest.mark.parametrize(
    ("error", "got"), [(errno.EIO, errno.EIO), (0, errno.EPROTO)], ids=["error", "reply"]
)
async def test_fds_a_server_sends_with_a_reply_that_takes_none_are_closed(
    fake_server: Callable[[Script], Path], error: int, got: int
) -> None:
    """The client (and so ``vgpud probe``) keeps no fd a server pushes on it with an error
    reply, or with a reply that carries none (refused as EPROTO)."""
    closed = threading.Event()
    path = fake_server(negotiated(device_info_with_an_fd(error, closed)))
    before = eventfds()
    async with await VfioUserClient.connect(path) as client:
        with pytest.raises(VfioUserError) as failed:
            await client.device_info()
        assert failed.value.errno == got
        await trio.to_thread.run_sync(closed.wait)
        assert eventfds() == before
