"""A socket path is claimed (a lock on ``<path>.lock``) before it is replaced, bound or
removed (vgpud/server/socket_files.py), so two daemons never take each other's socket."""

from __future__ import annotations

import fcntl
import os
import socket
import stat
from pathlib import Path

import pytest
import trio

from tests.server.conftest import open_fds, start_daemon
from vgpud import daemon
from vgpud.config import DaemonConfig, single_device
from vgpud.daemon import StartupError
from vgpud.server import socket_files
from vgpud.server.socket_files import (
    ListenerError,
    bind_unix_listener,
    claim_socket_path,
    group_refusal,
)


def stale_socket(path: Path) -> None:
    """What a daemon that crashed leaves: a socket file nobody listens on."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as dead:
        dead.bind(str(path))


def test_a_path_claimed_but_not_yet_bound_is_not_taken(tmp_path: Path) -> None:
    """The window that let two daemons take each other's socket: A has found the old socket
    stale and not yet bound its own when B looks. B used to find nobody listening, remove
    the file and bind; now it is refused, and A binds as it meant to."""
    path = tmp_path / "gpu0.sock"
    stale_socket(path)
    first = claim_socket_path(path)
    try:
        with pytest.raises(ListenerError, match=r"in use: another vgpud holds .*gpu0\.sock\.lock"):
            bind_unix_listener(path)
        sock = socket_files.listen_on_claim(first)
        with sock, socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.connect(str(path))  # A's socket is the one at the path
    finally:
        first.release()
    assert list(tmp_path.iterdir()) == []


def test_a_lock_file_left_by_a_crashed_daemon_is_taken(tmp_path: Path) -> None:
    path = tmp_path / "gpu0.sock"
    stale_socket(path)
    (tmp_path / "gpu0.sock.lock").touch()  # nobody holds its lock
    sock, claim = bind_unix_listener(path)
    sock.close()
    claim.release()
    assert list(tmp_path.iterdir()) == []


def test_a_lock_file_removed_by_its_holder_before_it_is_locked_is_made_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The holder stopping between this claim's open and its lock removes the file this
    claim opened: locking that unlinked file would hold nothing another daemon can see."""
    path = tmp_path / "gpu0.sock"
    lock = tmp_path / "gpu0.sock.lock"
    real_flock = fcntl.flock
    calls = 0

    def holder_stops_first(fd: int, operation: int) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            lock.unlink()  # what the holder's release does, just before this lock
        real_flock(fd, operation)

    monkeypatch.setattr(fcntl, "flock", holder_stops_first)
    claim = claim_socket_path(path)
    try:
        held, named = os.fstat(claim.lock_fd), lock.stat()
        assert (held.st_dev, held.st_ino) == (named.st_dev, named.st_ino)
        assert calls == 2
    finally:
        claim.release()


def test_a_lock_path_that_is_not_a_regular_file_is_refused(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "gpu0.sock.lock")
    with pytest.raises(ListenerError, match="not a regular file"):
        bind_unix_listener(tmp_path / "gpu0.sock")
    assert stat.S_ISFIFO((tmp_path / "gpu0.sock.lock").lstat().st_mode)


def test_the_lock_file_is_the_daemons_alone(tmp_path: Path) -> None:
    """Mode 0600: another user cannot open it, so cannot hold its lock to keep the device
    from starting."""
    sock, claim = bind_unix_listener(tmp_path / "gpu0.sock")
    try:
        assert stat.S_IMODE((tmp_path / "gpu0.sock.lock").stat().st_mode) == 0o600
    finally:
        sock.close()
        claim.release()


async def test_a_second_daemon_on_the_same_path_fails_at_once_and_makes_nothing(
    tmp_path: Path,
) -> None:
    """It says which path is held and by what, makes no memory file, and leaves the first
    daemon's socket serving."""
    async with trio.open_nursery() as nursery:
        first = await start_daemon(nursery, tmp_path)
        before = open_fds()
        second = single_device(
            socket_path=first.socket_path, name="gpu0", backing_dir=tmp_path / "mem-second"
        )
        with pytest.raises(StartupError, match="in use: another vgpud holds"):
            await daemon.run(DaemonConfig(devices=(second,)))
        assert open_fds() == before
        assert not (tmp_path / "mem-second").exists()
        async with await first.connect() as client:
            assert (await client.device_info()).num_regions == 9
        nursery.cancel_scope.cancel()
    assert sorted(os.listdir(tmp_path)) == ["mem"]


async def test_a_socket_that_is_no_longer_the_daemons_is_left_at_stop(tmp_path: Path) -> None:
    """Someone removed the daemon's socket file and another server bound the path: the
    daemon stopping removes its lock file, not that server's socket."""
    other = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with other:
        async with trio.open_nursery() as nursery:
            vgpud = await start_daemon(nursery, tmp_path)
            vgpud.socket_path.unlink()
            other.bind(str(vgpud.socket_path))
            other.listen()
            nursery.cancel_scope.cancel()
        assert vgpud.socket_path.exists()
        assert not (tmp_path / "gpu0.sock.lock").exists()


def test_a_group_the_daemons_user_is_not_in_is_refused_with_the_reason(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """chown(2) gives a file only to a group of the caller's, unless privileged: a daemon
    not running as root used to fail at bind with a bare "Operation not permitted"."""
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.setattr(os, "getegid", lambda: 1000)
    monkeypatch.setattr(os, "getgroups", lambda: [1000, 24])
    monkeypatch.setattr(socket_files, "_may_chown", lambda: False)
    assert group_refusal(1000) is None
    assert group_refusal(24) is None
    refusal = group_refusal(36)
    assert refusal is not None and "not a member of group 36" in refusal
    monkeypatch.setattr(socket_files, "_may_chown", lambda: True)  # CAP_CHOWN
    assert group_refusal(36) is None
