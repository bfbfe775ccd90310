"""systemd glue in plain stdlib: readiness notification and socket activation.

sd_notify(3): send "READY=1" etc. as one datagram to $NOTIFY_SOCKET (a path, or an abstract
socket when it starts with "@"). sd_listen_fds(3): inherited listening sockets start at fd 3,
$LISTEN_FDS of them, meant for us only if $LISTEN_PID is our pid; $LISTEN_FDNAMES names them
(FileDescriptorName= in the .socket unit) so each can be matched to a configured device.
"""

from __future__ import annotations

import os
import socket

SD_LISTEN_FDS_START = 3


def notify(state: str) -> bool:
    """Send ``state`` (e.g. ``"READY=1"``) to the service manager; False if not under one."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        try:
            sock.sendto(state.encode(), address)
        except OSError:
            return False
    return True


def listen_fds() -> dict[str, int]:
    """Sockets passed by socket activation, by name (unnamed ones get "fd<N>").

    The environment variables are removed, as sd_listen_fds(unset_environment=1) does, so
    children of ours do not think the sockets are theirs.
    """
    try:
        if int(os.environ.get("LISTEN_PID", "0")) != os.getpid():
            return {}
        count = int(os.environ.get("LISTEN_FDS", "0"))
    except ValueError:
        return {}
    names = os.environ.get("LISTEN_FDNAMES", "").split(":") if count else []
    for key in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(key, None)
    result: dict[str, int] = {}
    for i in range(count):
        fd = SD_LISTEN_FDS_START + i
        os.set_inheritable(fd, False)
        name = names[i] if i < len(names) and names[i] else f"fd{fd}"
        result[name] = fd
    return result
