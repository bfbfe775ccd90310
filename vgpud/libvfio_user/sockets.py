"""Socket plumbing around libvfio-user, which owns its sockets and exposes only fd numbers.

libvfio-user binds and listens on a path itself and keeps the connection fd private
(lib/tran_sock.c). The engine still has to serve a socket it inherited, find the connection
the library is negotiating on to cut it, and shut a connection down by number; these are
the helpers for that, kept apart from the engine's serving logic.
"""

from __future__ import annotations

import os
import socket
import stat
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from vgpud.server.socket_files import ListenerError, check_unix_stream


def adopt_listener(listener: socket.socket, bind: Callable[[Path], int]) -> tuple[Path, Path]:
    """Make a libvfio-user context serve ``listener``, an inherited listening socket
    (``--fd``, systemd socket activation); return its path and a private directory to
    remove once the context is destroyed.

    libvfio-user has no way to take a socket: it always binds a path of its own
    (``tran_sock_init``). So ``bind`` creates the context on a path in a private directory
    and returns the fd it listens on, and ``listener`` is ``dup2``'d onto that number. That
    fd is all the library ever uses of its socket: the poll fd until a client is attached,
    and what ``vfu_attach_ctx`` accepts on. ``listener`` is closed (its socket lives on
    under the library's number) and the stand-in socket file goes at once. Its directory
    stays, empty and ours alone, because ``vfu_destroy_ctx`` unlinks the path it bound.
    """
    try:
        name = listener.getsockname()
        listening = listener.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
    except OSError as exc:
        raise ListenerError(f"inherited socket: {exc.strerror}") from exc
    check_unix_stream(listener, "inherited socket")
    if not listening:
        # Attach always accepts: a connection handed over whole (vfio-user's --fd with a
        # connected socket) has nothing to accept from.
        raise ListenerError(
            "inherited socket is connected, not listening: the libvfio-user engine can "
            "only accept clients (serve a connected socket with the python engine)"
        )
    if not isinstance(name, str) or not name:
        # The engine finds connections by their listener's path (accepted_connections).
        raise ListenerError("inherited socket is not bound to a filesystem path")
    # Short names: a socket path has to fit in sun_path (108 bytes).
    private_dir = Path(tempfile.mkdtemp(prefix="vgpud-lvu-"))
    stand_in = private_dir / "s"
    try:
        listen_fd = bind(stand_in)
        listener.setblocking(False)  # as libvfio-user made its own (ATTACH_NB)
        os.dup2(listener.fileno(), listen_fd, inheritable=False)
        listener.close()
    except BaseException:
        stand_in.unlink(missing_ok=True)
        private_dir.rmdir()
        raise
    stand_in.unlink()
    return Path(name), private_dir


def accepted_connections(path: Path) -> Iterator[socket.socket]:
    """Duplicates of this process's accepted connections on the socket ``path``: its
    non-listening sockets whose local address is ``path`` (each closed once iterated past)."""
    wanted = os.fsencode(path)
    for name in os.listdir("/proc/self/fd"):
        try:
            if not stat.S_ISSOCK(os.fstat(int(name)).st_mode):
                continue
            sock = socket.socket(fileno=os.dup(int(name)))
        except OSError:
            continue
        with sock:
            try:
                listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
                local = sock.getsockname() if sock.family == socket.AF_UNIX else None
            except OSError:
                continue
            if not listening and local is not None and os.fsencode(local) == wanted:
                yield sock


def shutdown_fd(fd: int) -> None:
    """Shut down the connection on ``fd`` (the library's number; it stays open)."""
    try:
        with socket.socket(fileno=os.dup(fd)) as sock:
            sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
