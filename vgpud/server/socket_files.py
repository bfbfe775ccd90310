"""A device's socket file on disk: claimed, bound with deliberate permissions, removed.

Two daemons (two instances of a template unit, say, whose configurations name one socket
path) must not take each other's socket. Checking for a stale socket and replacing it is not
enough on its own: A finds the old socket stale and binds a fresh one while B, which found
the same old socket stale a moment earlier, removes A's fresh one and binds its own, leaving
A listening on a socket no VMM can reach. So a path is first *claimed*, by an exclusive
``flock`` on ``<path>.lock`` held for as long as the socket is served (the convention
Wayland compositors use for their sockets): only the holder replaces, binds or removes the
socket, and a second daemon is told at once who holds it. The lock file is ours alone (mode
0600, so no other user can hold the lock to keep a device from starting) and is removed,
with the socket, at stop.

At stop the socket file is removed only if it is still the one this daemon bound (same
device and inode): one made by someone else after an administrator removed ours is left
alone.
"""

from __future__ import annotations

import contextlib
import fcntl
import grp
import os
import socket
import stat
from dataclasses import dataclass
from pathlib import Path

from backends.trusted_dirs import untrusted_directory

_LISTEN_BACKLOG = 8
# (gid_t)-1: chown(2)'s "no change", and so no group of its own.
_NO_GID = (1 << 32) - 1
# Opening a lock file that its holder removes before we lock it is retried this often (each
# time means another daemon stopped in between; three in a row would be a daemon flapping).
_CLAIM_ATTEMPTS = 3


class ListenerError(Exception):
    """A socket could not be set up; the message says which and why."""


FileId = tuple[int, int]  # (st_dev, st_ino): which file a path names


@dataclass(eq=False)
class SocketClaim:
    """The right to a socket path: the locked ``<path>.lock`` (``lock_fd``), and once bound,
    which file the socket is (``socket_file``)."""

    path: Path
    lock_fd: int
    socket_file: FileId | None = None

    @property
    def lock_path(self) -> Path:
        return lock_path(self.path)

    def bound(self) -> None:
        """Note the socket file just bound at :attr:`path` as ours (removed at release)."""
        st = os.lstat(self.path)
        self.socket_file = (st.st_dev, st.st_ino)

    def release(self, *, remove_socket: bool = True) -> None:
        """Give the path up: the socket file if it is still ours (and ``remove_socket``),
        then the lock file, then the lock. Idempotent."""
        if self.lock_fd < 0:
            return
        if remove_socket and self.socket_file is not None:
            _unlink_if(self.path, self.socket_file)
        with contextlib.suppress(OSError):
            st = os.fstat(self.lock_fd)
            _unlink_if(self.lock_path, (st.st_dev, st.st_ino))
        os.close(self.lock_fd)
        self.lock_fd = -1


def lock_path(path: Path) -> Path:
    return path.with_name(path.name + ".lock")


def _unlink_if(path: Path, file_id: FileId) -> None:
    """Remove ``path`` if it still names the file ``file_id``."""
    with contextlib.suppress(OSError):
        st = os.lstat(path)
        if (st.st_dev, st.st_ino) == file_id:
            os.unlink(path)


def prepare_socket_directory(path: Path) -> None:
    """Make the directory for the socket at ``path``, and refuse it if another user could
    replace the socket there (backends/trusted_dirs.py: /tmp/vgpud, made first by someone
    else, say)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    reason = untrusted_directory(path.parent)
    if reason is not None:
        raise ListenerError(
            f"cannot listen on {path}: {reason} (docs/security.md; choose another socket "
            "path or fix the owner/mode)"
        )


def claim_socket_path(path: Path) -> SocketClaim:
    """Claim ``path`` for a socket of this daemon (module docstring): its directory made and
    checked, its lock taken, a stale socket there removed. Raises :class:`ListenerError`
    when another daemon holds it, a server listens there, or it is not a socket."""
    prepare_socket_directory(path)
    claim = lock_socket_path(path)
    try:
        # Servers that take no lock (another program, an older vgpud) are still detected.
        remove_if_stale(path)
    except BaseException:
        claim.release(remove_socket=False)
        raise
    return claim


def lock_socket_path(path: Path) -> SocketClaim:
    """Take the lock on ``path`` (nothing else); :class:`ListenerError` if another holds it."""
    lock = lock_path(path)
    for _ in range(_CLAIM_ATTEMPTS):
        try:
            # O_NOFOLLOW: the directory is trusted, but a symlink there is not a lock file.
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        except OSError as exc:
            raise ListenerError(f"cannot lock {lock}: {exc.strerror}") from exc
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise ListenerError(f"{lock} is not a regular file; refusing to use it")
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise ListenerError(
                    f"{path} is in use: another vgpud holds {lock} (two devices, or two "
                    "daemons, configured with one socket path?)"
                ) from None
        except BaseException:
            os.close(fd)
            raise
        if _same_file(fd, lock):
            return SocketClaim(path, fd)
        # Its holder removed it at stop between our open and our lock: try again.
        os.close(fd)
    raise ListenerError(f"cannot lock {lock}: it keeps being replaced")


def _same_file(fd: int, path: Path) -> bool:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (held.st_dev, held.st_ino)


def bind_unix_listener(
    path: Path, mode: int = 0o600, group: str | None = None
) -> tuple[socket.socket, SocketClaim]:
    """Claim ``path`` and create a listening socket there with exactly ``mode`` and
    ``group``; the claim is released (the socket file removed) by the caller at stop.

    A stale socket file (nobody accepts on it) is replaced; a live one, or a path that is
    not a socket, is an error -- silently stealing another daemon's socket would cut its VM
    off.
    """
    claim = claim_socket_path(path)
    try:
        return listen_on_claim(claim, mode, group), claim
    except BaseException:
        claim.release()
        raise


def listen_on_claim(
    claim: SocketClaim, mode: int = 0o600, group: str | None = None
) -> socket.socket:
    """A listening socket at the claimed path with exactly ``mode`` and ``group``."""
    path = claim.path
    if group is not None:
        group_id(group)  # an unknown group is refused before there is a file to remove
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        # Born owner-only, so no other user can connect in the window before chmod.
        old_umask = os.umask(0o177)
        try:
            sock.bind(str(path))
            claim.bound()  # removed at release, and by whoever fails below
        finally:
            os.umask(old_umask)
        if group is not None:
            give_to_group(path, group)
        os.chmod(path, mode)
        sock.listen(_LISTEN_BACKLOG)
    except OSError as exc:
        sock.close()
        if claim.socket_file is not None:
            _unlink_if(path, claim.socket_file)  # ours, and no use to anyone now
            claim.socket_file = None
        raise ListenerError(f"cannot listen on {path}: {exc.strerror or exc}") from exc
    except BaseException:
        sock.close()
        raise
    return sock


def give_to_group(path: Path, group: str) -> None:
    """chown ``path`` to ``group`` (a name or number); :class:`ListenerError` if it cannot."""
    try:
        os.chown(path, -1, group_id(group))
    except PermissionError as exc:
        # chown(2) lets an unprivileged owner give a file only to a group it is in.
        raise ListenerError(
            f"cannot give {path} to group {group}: {exc.strerror} (a daemon not running as "
            "root can only use a socket_group its user is a member of)"
        ) from exc


def remove_if_stale(path: Path) -> None:
    """Unlink a socket file nobody listens on; refuse live sockets and non-sockets."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ListenerError(f"{path} exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        probe.settimeout(1.0)
        probe.connect(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        _unlink_if(path, (st.st_dev, st.st_ino))
        return
    except OSError as exc:
        raise ListenerError(f"cannot check existing socket {path}: {exc.strerror}") from exc
    finally:
        probe.close()
    raise ListenerError(f"another server is already listening on {path}")


def group_id(group: str) -> int:
    """A group name (or number) as a gid."""
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        # A number must be a gid chown(2) can set: past gid_t it raised OverflowError out of
        # the socket's set-up (a traceback, the socket file left behind), and (gid_t)-1 means
        # "leave the group as it is", which would serve a group-writable socket of the
        # daemon's own group.
        if group.isdigit() and int(group) < _NO_GID:
            return int(group)
        raise ListenerError(f"unknown group {group!r}") from None


def group_refusal(gid: int) -> str | None:
    """Why this process cannot give its sockets to the group ``gid`` (chown(2): only to a
    group its user is in, unless privileged), or None when it can."""
    if os.geteuid() == 0 or gid == os.getegid() or gid in os.getgroups() or _may_chown():
        return None
    return (
        f"the daemon's user is not a member of group {gid}, so it cannot give its socket to "
        "it (add the user to the group, or run as root)"
    )


def group_reach_problem(path: Path, gid: int) -> str | None:
    """Why a VMM in group ``gid`` may be unable to reach the socket at ``path`` however the
    socket's own mode reads, or None: the first directory above it that gives neither that
    group nor others search permission (a socket under $XDG_RUNTIME_DIR, always 0700, say).
    Only a hint, hence a warning and not a refusal: the VMM's user may own that directory,
    and a directory with an access ACL is passed over (its ACL decides; not read here)."""
    for directory in Path(os.path.abspath(path)).parents:
        try:
            st = os.stat(directory)
        except OSError:
            return None  # cannot tell
        mode = stat.S_IMODE(st.st_mode)
        if mode & stat.S_IXOTH or (st.st_gid == gid and mode & stat.S_IXGRP):
            continue
        if _has_access_acl(directory):
            continue
        return (
            f"{directory} (mode {mode:04o}, owner {st.st_uid}:{st.st_gid}) lets neither "
            f"group {gid} nor others enter it"
        )
    return None


def _has_access_acl(directory: Path) -> bool:
    try:
        return "system.posix_acl_access" in os.listxattr(directory)
    except OSError:
        return False


def _may_chown() -> bool:
    """Whether this process has CAP_CHOWN (bit 0 of its effective set)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) & 1)
    except (OSError, ValueError):
        pass
    return False


def check_unix_stream(sock: socket.socket, what: str) -> None:
    """Raise :class:`ListenerError` unless ``sock`` is a UNIX stream socket: nothing else is a
    vfio-user endpoint, and a TCP listener would let anyone reach the device (a config audit
    found one served through ``--fd``)."""
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
        raise ListenerError(
            f"{what} is not a UNIX stream socket ({sock.family.name}, {sock.type.name})"
        )
