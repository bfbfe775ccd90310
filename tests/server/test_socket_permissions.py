"""Who may connect: the socket is born owner-only and then gets the configured mode/group."""

from __future__ import annotations

import grp
import os
import socket
import stat
from pathlib import Path

import pytest

from vgpud.server.socket_files import ListenerError, bind_unix_listener


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
