"""Who may connect: the socket is born owner-only and then gets the configured mode/group."""

from __future__ import annotations

import errno
import functools
import grp
import os
import shutil
import socket
import stat
import struct
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog
import trio

from vgpud import daemon
from vgpud.config import DaemonConfig, single_device
from vgpud.server.socket_files import ListenerError, bind_unix_listener, group_reach_problem


def test_default_is_owner_only(tmp_path: Path) -> None:
    sock, claim = bind_unix_listener(tmp_path / "a.sock")
    try:
        assert stat.S_IMODE((tmp_path / "a.sock").stat().st_mode) == 0o600
    finally:
        sock.close()
        claim.release()


def test_group_and_mode(tmp_path: Path) -> None:
    group = grp.getgrgid(os.getgid()).gr_name
    sock, claim = bind_unix_listener(tmp_path / "g.sock", mode=0o660, group=group)
    try:
        st = (tmp_path / "g.sock").stat()
        assert stat.S_IMODE(st.st_mode) == 0o660
        assert st.st_gid == os.getgid()
    finally:
        sock.close()
        claim.release()


def test_unknown_group_is_refused_and_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(ListenerError, match="unknown group"):
        bind_unix_listener(tmp_path / "x.sock", group="no-such-group-vgpud")
    assert not (tmp_path / "x.sock").exists()


def test_stale_socket_is_replaced(tmp_path: Path) -> None:
    path = tmp_path / "stale.sock"
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(path))
    dead.close()  # the file stays, nobody listens: what a crashed daemon leaves
    sock, claim = bind_unix_listener(path)
    try:
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client.connect(str(path))
        client.close()
    finally:
        sock.close()
        claim.release()


@pytest.fixture
def open_root() -> Iterator[Path]:
    """A directory every user can enter, under one (/tmp) they can too: pytest's own
    tmp_path sits under an owner-only directory, which would answer every question below."""
    root = Path(tempfile.mkdtemp(prefix="vgpud-reach-", dir="/tmp"))
    root.chmod(0o711)
    yield root
    shutil.rmtree(root)


def test_a_directory_that_keeps_the_group_out_is_named(open_root: Path) -> None:
    gid = os.getgid()
    private = open_root / "private"
    private.mkdir(mode=0o700)
    (private / "vgpud").mkdir(mode=0o755)
    problem = group_reach_problem(private / "vgpud" / "gpu0.sock", gid)
    assert problem is not None and str(private) in problem and "0700" in problem


@pytest.mark.parametrize(("mode", "own_group"), [(0o710, True), (0o701, False)])
def test_the_groups_or_others_search_permission_lets_it_in(
    open_root: Path, mode: int, own_group: bool
) -> None:
    directory = open_root / "d"
    directory.mkdir()
    directory.chmod(mode)
    gid = os.stat(directory).st_gid if own_group else _other_gid(os.stat(directory).st_gid)
    assert group_reach_problem(directory / "gpu0.sock", gid) is None
    # The group bit is for the directory's own group only.
    if own_group:
        problem = group_reach_problem(directory / "gpu0.sock", _other_gid(gid))
        assert problem is not None and str(directory) in problem


def test_a_directory_with_an_acl_is_left_to_its_acl(open_root: Path) -> None:
    directory = open_root / "acl"
    directory.mkdir(mode=0o700)
    gid = _other_gid(os.stat(directory).st_gid)
    # POSIX ACL xattr, version 2: user::rwx, group::---, group:<gid>:r-x, mask::r-x, other::---
    entries = [(0x01, 7, 0xFFFFFFFF), (0x04, 0, 0xFFFFFFFF), (0x08, 5, gid), (0x10, 5, 0xFFFFFFFF)]
    entries.append((0x20, 0, 0xFFFFFFFF))
    acl = struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in entries)
    try:
        os.setxattr(directory, "system.posix_acl_access", acl)
    except OSError as exc:
        pytest.skip(f"no POSIX ACLs on {open_root}: {exc.strerror}")
    assert group_reach_problem(directory / "gpu0.sock", gid) is None


async def test_the_daemon_warns_when_its_socket_group_cannot_reach_the_socket(
    open_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A socket of the right group and mode in a directory the group cannot enter: the VMM
    would get EACCES, so the start says so (and serves: the VMM's user may own it)."""
    monkeypatch.delenv("LISTEN_FDS", raising=False)
    private = open_root / "private"
    private.mkdir(mode=0o700)
    gid = os.getgid()
    lines = []
    for directory in (private / "run", open_root / "shared"):
        config = single_device(
            socket_path=directory / "gpu0.sock",
            memory_size="4GiB",
            backing_dir=open_root / "mem",
            socket_group=str(gid),
        )
        with structlog.testing.capture_logs() as logs:
            async with trio.open_nursery() as nursery:
                await nursery.start(functools.partial(daemon.run, DaemonConfig((config,))))
                nursery.cancel_scope.cancel()
        lines.append(
            [line for line in logs if line["event"] == "socket_group cannot reach the socket"]
        )
    (warning,) = lines[0]
    assert warning["log_level"] == "warning"
    assert str(private) in str(warning["reason"])
    assert lines[1] == []  # made by the daemon under an open directory: reachable


def _connects_as(path: Path, uid: int, gid: int, groups: list[int]) -> int:
    """0 if a process of ``uid``/``gid`` with ``groups`` can connect to ``path``, else the
    errno. A forked child drops to that user and tries (it runs no Python after the fork
    but these few calls, and leaves with os._exit)."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover (the child)
        code = 100
        try:
            os.setgroups(groups)
            os.setgid(gid)
            os.setuid(uid)
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
                client.connect(str(path))
            code = 0
        except OSError as exc:
            code = exc.errno or 100
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


@pytest.mark.skipif(os.geteuid() != 0, reason="dropping to another user needs root")
def test_a_vmm_of_another_user_gets_in_through_the_socket_group_only(open_root: Path) -> None:
    """What libvirt's system QEMU (another user, in the socket's group) meets: connected
    through the group with --socket-group, refused by an owner-only socket and by a
    directory above it that keeps the group out -- the case the start warns about."""
    nobody = 65534
    group = _other_gid(os.getgid())
    shared, private = open_root / "shared", open_root / "private"
    private.mkdir(mode=0o700)
    (private / "run").mkdir(mode=0o755)
    sockets = []
    try:
        for path, mode, sock_group in (
            (shared / "group.sock", 0o660, str(group)),
            (shared / "owner.sock", 0o600, None),
            (private / "run" / "group.sock", 0o660, str(group)),
        ):
            shared.mkdir(mode=0o755, exist_ok=True)
            sockets.append(bind_unix_listener(path, mode=mode, group=sock_group))
        assert _connects_as(shared / "group.sock", nobody, nobody, [group]) == 0
        assert _connects_as(shared / "group.sock", nobody, nobody, []) == errno.EACCES
        assert _connects_as(shared / "owner.sock", nobody, nobody, [group]) == errno.EACCES
        assert _connects_as(private / "run" / "group.sock", nobody, nobody, [group]) == (
            errno.EACCES
        )
        assert group_reach_problem(private / "run" / "group.sock", group) is not None
    finally:
        for sock, claim in sockets:
            sock.close()
            claim.release()


def _other_gid(gid: int) -> int:
    """A gid that is not ``gid`` (one the system knows, else any)."""
    for group in grp.getgrall():
        if group.gr_gid != gid:
            return group.gr_gid
    return gid + 1
