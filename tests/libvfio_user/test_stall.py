"""A client stalling libvfio-user mid-message is cut off; the daemon's other devices go on.

libvfio-user reads bodies and sends replies with blocking calls, so without the engine's
watchdog (vgpud/libvfio_user/watchdog.py) one such client blocks its device's thread
forever (and, before each device had a thread of its own, every device of the daemon:
tests/libvfio_user/test_thread.py shows the neighbour served during the stall). The daemon
runs in a process of its own here, as deployed.

Needs a libvfio-user build (``VGPUD_LIBVFIO_USER``); skipped without one.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.serve_process import read_log_until, start, stop
from tests.server.rawclient import HEADER, QEMU_VERSION
from vgpud.libvfio_user import EngineUnavailable, load_library

try:
    load_library()
except EngineUnavailable as exc:
    pytest.skip(f"libvfio-user engine tests need the library ({exc})", allow_module_level=True)

STALL_EVENT = "client stalled in the middle of a message, cutting it off"
REGION_READ, REGION_WRITE = 9, 10
CONFIG, BAR4 = 7, 4
HANG_GUARD = 30.0  # seconds; the watchdog acts after about 5


def connect(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(HANG_GUARD)
    sock.connect(str(path))
    sock.sendall(QEMU_VERSION)
    assert receive(sock) is not None, "no VERSION reply"
    return sock


def receive(sock: socket.socket) -> tuple[int, int, bytes] | None:
    """(msg_id, flags, body) of the next message, or None at EOF."""
    head = receive_exactly(sock, HEADER.size)
    if head is None:
        return None
    msg_id, _, size, flags, _ = HEADER.unpack(head)
    body = receive_exactly(sock, size - HEADER.size)
    return None if body is None else (msg_id, flags, body)


def receive_exactly(sock: socket.socket, count: int) -> bytes | None:
    data = b""
    while len(data) < count:
        try:
            more = sock.recv(count - len(data))
        except ConnectionResetError:
            return None
        if not more:
            return None
        data += more
    return data


def config_read(sock: socket.socket, msg_id: int) -> bytes:
    send_config_read(sock, msg_id)
    return config_read_reply(sock, msg_id)


def send_config_read(sock: socket.socket, msg_id: int) -> None:
    request = struct.pack("<QII", 0, CONFIG, 4)
    sock.sendall(HEADER.pack(msg_id, REGION_READ, 16 + len(request), 0, 0) + request)


def config_read_reply(sock: socket.socket, msg_id: int) -> bytes:
    reply = receive(sock)
    assert reply is not None and reply[0] == msg_id and not reply[1] & 0x20, reply
    return reply[2][16:]


def header_then_silence(sock: socket.socket) -> None:
    """A REGION_WRITE header announcing 80 bytes of body, then nothing.

    (Part of a body would not do: libvfio-user reads bodies with one plain ``recv`` and
    fails the message on a short read.)"""
    sock.sendall(HEADER.pack(5, REGION_WRITE, 16 + 16 + 64, 0, 0))


def requests_nobody_reads(sock: socket.socket) -> None:
    """1 MiB reads, pipelined and never read: the replies fill the socket, then block."""
    enable = struct.pack("<QII", 0x04, CONFIG, 2) + b"\x06\x00"  # COMMAND: memory decoding
    sock.sendall(HEADER.pack(4, REGION_WRITE, 16 + len(enable), 0, 0) + enable)
    reply = receive(sock)
    assert reply is not None and not reply[1] & 0x20, reply
    request = struct.pack("<QII", 0, BAR4, 1 << 20)
    message = HEADER.pack(6, REGION_READ, 16 + len(request), 0, 0) + request
    sock.sendall(message * 16)


@pytest.mark.parametrize("stall", [header_then_silence, requests_nobody_reads])
def test_stalling_client_is_cut_off_and_other_devices_are_served(
    tmp_path: Path, notify_socket: socket.socket, stall: Callable[[socket.socket], None]
) -> None:
    config = tmp_path / "tray.toml"
    config.write_text(
        '[daemon]\nengine = "libvfio-user"\nlog_format = "json"\n'
        + "".join(
            f'[[device]]\nname = "gpu{i}"\nsocket_path = "{tmp_path}/gpu{i}.sock"\n'
            f'memory_size = "4GiB"\nbacking_dir = "{tmp_path}/mem{i}"\n'
            for i in range(2)
        )
    )
    proc = start(["serve", "--config", str(config)], tmp_path)
    try:
        assert notify_socket.recv(64) == b"READY=1"
        neighbour = connect(tmp_path / "gpu1.sock")
        ids = config_read(neighbour, 1)
        staller = connect(tmp_path / "gpu0.sock")
        stall(staller)
        send_config_read(neighbour, 2)  # to a device of the same daemon
        # The watchdog cuts the staller off. Without it this waits out the hang guard.
        stall_event, _ = read_log_until(proc, STALL_EVENT)
        assert (stall_event["device"], stall_event["connection"]) == ("gpu0", 1)
        # ... the staller's stream ends after whatever replies made it out ...
        while receive(staller) is not None:
            pass
        staller.close()
        # ... the neighbour's device works as before, and gpu0 takes its next client.
        assert config_read_reply(neighbour, 2) == ids
        neighbour.close()
        again = connect(tmp_path / "gpu0.sock")
        assert config_read(again, 3) == ids
        again.close()
        assert proc.poll() is None, "the daemon died"
    finally:
        stderr = stop(proc, check=False)
    assert proc.returncode == 0, stderr
    assert "client stalled" not in stderr, "one stall, one cut"
