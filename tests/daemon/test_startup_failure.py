"""A daemon that cannot start gives back everything it took: device files, sockets, fds."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from backends.synthetic import BackingFileError
from backends.synthetic.memory import BackingFile
from vgpud import daemon
from vgpud.config import DaemonConfig, single_device
from vgpud.daemon import StartupError
from vgpud.server.socket_files import ListenerError, group_id


def open_fds() -> set[int]:
    return {int(name) for name in os.listdir("/proc/self/fd")}


async def test_a_busy_socket_path_fails_the_start_before_any_file_is_made(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The second device's path has a live server on it (one that takes no lock): the start
    fails before any memory file is made, the first device's claim goes, no fd is left, and
    the other server's socket is untouched."""
    monkeypatch.delenv("LISTEN_FDS", raising=False)
    busy = tmp_path / "b.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as other_server:
        other_server.bind(str(busy))
        other_server.listen(1)
        config = DaemonConfig(
            tuple(
                single_device(
                    socket_path=tmp_path / f"{name}.sock",
                    name=name,
                    memory_size="4GiB",
                    backing_dir=tmp_path / f"mem-{name}",
                )
                for name in ("a", "b")
            )
        )
        before = open_fds()
        with pytest.raises(StartupError, match="another server is already listening"):
            await daemon.run(config)
        assert open_fds() == before
        assert sorted(os.listdir(tmp_path)) == ["b.sock"]


@pytest.mark.parametrize(
    "group",
    [
        "no-such-group-here",
        # Past gid_t: it used to pass the check, and the start died on a traceback
        # (OverflowError from chown) with the memory files made and the socket file left.
        "99999999999",
    ],
)
async def test_an_unknown_socket_group_fails_before_any_file_is_made(
    tmp_path: Path, group: str
) -> None:
    config = DaemonConfig(
        (
            single_device(
                socket_path=tmp_path / "gpu0.sock",
                socket_group=group,
                backing_dir=tmp_path / "mem",
            ),
        )
    )
    with pytest.raises(StartupError, match=f"device gpu0: unknown group '{group}'"):
        await daemon.run(config)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("gid", ["99999999999", "4294967295"])
def test_a_group_number_chown_cannot_set_is_unknown(gid: str) -> None:
    """Past gid_t, os.chown raised OverflowError; (gid_t)-1 is chown's "no change"."""
    with pytest.raises(ListenerError, match=f"unknown group '{gid}'"):
        group_id(gid)
    assert group_id("4294967294") == 4294967294


def test_a_backing_file_too_large_for_its_filesystem_is_not_left_behind(tmp_path: Path) -> None:
    with pytest.raises(BackingFileError, match=r"cannot make backing file .*usemem"):
        BackingFile(tmp_path / "usemem", 1 << 62)  # past any filesystem's limit: EFBIG
    assert list(tmp_path.iterdir()) == []
