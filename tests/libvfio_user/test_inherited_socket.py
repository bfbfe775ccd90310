"""The libvfio-user engine on a listening socket it was handed (``--fd``, socket activation).

libvfio-user binds a path of its own; the engine puts the inherited socket in its place
(``vgpud.libvfio_user.sockets.adopt_listener``). These tests hold it to what the Python engine
does with such a socket: clients are served and a second one refused, the socket file stays
when the daemon stops, and nothing of the stand-in socket or its directory is left behind.

Needs a libvfio-user build (``VGPUD_LIBVFIO_USER``); skipped without one.
"""

from __future__ import annotations

import os
import shutil
import socket
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from vgpud.client import VfioUserClient, VfioUserError
from vgpud.config import single_device
from vgpud.devices import BuiltDevice, build_device
from vgpud.libvfio_user import EngineUnavailable, LibvfioUserServer, load_library
from vgpud.libvfio_user.engine import serve_device
from vgpud.server.socket_files import ListenerError

try:
    LIBRARY = load_library()
except EngineUnavailable as exc:
    pytest.skip(f"libvfio-user engine tests need the library ({exc})", allow_module_level=True)

CONFIG = 7


@pytest.fixture
def private_tmp(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Where the engine's stand-in socket directory goes (tempfile's directory; short, as
    socket paths must be)."""
    directory = Path(tempfile.mkdtemp(prefix="vgpud-test-"))
    monkeypatch.setattr(tempfile, "tempdir", str(directory))
    yield directory
    shutil.rmtree(directory)


@pytest.fixture
def built(tmp_path: Path) -> Iterator[BuiltDevice]:
    config = single_device(
        socket_path=tmp_path / "configured.sock", memory_size="4GiB", backing_dir=tmp_path / "mem"
    )
    device = build_device(config)
    yield device
    device.release()


def listening_socket(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    sock.listen(4)
    return sock


def open_fds() -> set[int]:
    return {int(name) for name in os.listdir("/proc/self/fd")}


def entries(directory: Path) -> list[str]:
    return os.listdir(directory)


async def test_serves_the_inherited_socket_and_leaves_its_file(
    tmp_path: Path, private_tmp: Path, built: BuiltDevice
) -> None:
    path = tmp_path / "activated.sock"
    unused = tmp_path / "configured.sock"
    before = open_fds()
    listener = listening_socket(path)
    async with trio.open_nursery() as nursery:
        server: LibvfioUserServer = await nursery.start(
            lambda task_status: serve_device(
                built, unused, library=LIBRARY, listener=listener, task_status=task_status
            )
        )
        assert server.socket_path == path
        assert listener.fileno() == -1, "the socket lives on as libvfio-user's fd only"
        # The stand-in socket is gone already; its (empty) directory stays ours meanwhile.
        [private_dir] = entries(private_tmp)
        assert entries(private_tmp / private_dir) == []
        for _ in range(2):  # served, and served again after the first client left
            async with await VfioUserClient.connect(path) as client:
                ids = await client.region_read(CONFIG, 0, 4)
                assert ids == bytes.fromhex("de104223")  # 10de:2342
                with pytest.raises(VfioUserError, match="Device or resource busy"):
                    await VfioUserClient.connect(path)
            await server.wait_idle()
        nursery.cancel_scope.cancel()
    assert stat.S_ISSOCK(os.stat(path).st_mode), "an inherited socket's file is not ours to remove"
    assert unused.name not in entries(tmp_path), "an inherited socket's device binds no path"
    assert entries(private_tmp) == []
    assert open_fds() == before


async def test_a_connected_socket_is_refused_with_the_reason(
    private_tmp: Path, built: BuiltDevice, tmp_path: Path
) -> None:
    before = open_fds()
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with theirs, pytest.raises(ListenerError, match="connected, not listening"):
        await serve_device(built, tmp_path / "s", library=LIBRARY, listener=ours)
    assert ours.fileno() == -1
    assert entries(private_tmp) == []
    assert open_fds() == before


async def test_a_socket_without_a_path_is_refused(
    private_tmp: Path, built: BuiltDevice, tmp_path: Path
) -> None:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(f"\0vgpud-test-{os.getpid()}")  # abstract: no file to find clients by
    listener.listen(1)
    with pytest.raises(ListenerError, match="not bound to a filesystem path"):
        await serve_device(built, tmp_path / "s", library=LIBRARY, listener=listener)
    assert listener.fileno() == -1
    assert entries(private_tmp) == []
