"""Directories another user could tamper with are refused for sockets and memory files
(backends/trusted_dirs.py): /tmp/vgpud or /dev/shm/vgpud made first by someone else."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from backends.trusted_dirs import untrusted_directory
from vgpud import daemon
from vgpud.config import DaemonConfig, single_device
from vgpud.daemon import StartupError
from vgpud.server.socket_files import ListenerError, bind_unix_listener

OTHER_UID = 54321  # no user of this machine

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="giving a directory away takes root")


def test_own_and_sticky_directories_are_trusted(tmp_path: Path) -> None:
    assert untrusted_directory(tmp_path) is None
    assert untrusted_directory(Path("/tmp")) is None  # root's, sticky


def test_a_world_writable_directory_that_is_not_sticky_is_refused(tmp_path: Path) -> None:
    open_door = tmp_path / "open"
    open_door.mkdir()
    open_door.chmod(0o777)
    (open_door / "vgpud").mkdir()
    reason = untrusted_directory(open_door / "vgpud")
    assert reason is not None and "writable by every user" in reason and str(open_door) in reason
    open_door.chmod(0o1777)  # sticky: others can remove only what they own
    assert untrusted_directory(open_door / "vgpud") is None


@needs_root
def test_a_directory_another_user_made_first_is_refused(tmp_path: Path) -> None:
    squatted = tmp_path / "vgpud"
    squatted.mkdir()
    os.chown(squatted, OTHER_UID, -1)
    reason = untrusted_directory(squatted)
    assert reason is not None and f"uid {OTHER_UID}" in reason


@needs_root
def test_a_symlink_another_user_planted_is_refused(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    link = tmp_path / "vgpud"
    link.symlink_to(tmp_path / "real")
    assert untrusted_directory(link) is None
    os.lchown(link, OTHER_UID, -1)
    reason = untrusted_directory(link)
    assert reason is not None and reason.startswith(f"symlink {link}")


@needs_root
def test_no_socket_in_a_directory_another_user_owns(tmp_path: Path) -> None:
    squatted = tmp_path / "vgpud"
    squatted.mkdir()
    os.chown(squatted, OTHER_UID, -1)
    with pytest.raises(ListenerError, match=f"uid {OTHER_UID}"):
        bind_unix_listener(squatted / "gpu0.sock")
    assert os.listdir(squatted) == []


@needs_root
async def test_no_memory_files_in_a_directory_another_user_owns(tmp_path: Path) -> None:
    """The daemon refuses to start, naming the directory, and makes no file there."""
    squatted = tmp_path / "shm-vgpud"
    squatted.mkdir()
    os.chown(squatted, OTHER_UID, -1)
    config = DaemonConfig(
        (
            single_device(
                socket_path=tmp_path / "gpu0.sock",
                memory_size="4GiB",
                backing_dir=squatted / "gpu0",
            ),
        )
    )
    with pytest.raises(StartupError, match=f"backing directory .* refused: .*uid {OTHER_UID}"):
        await daemon.run(config)
    assert os.listdir(squatted / "gpu0") == []
    assert not (tmp_path / "gpu0.sock").exists()
