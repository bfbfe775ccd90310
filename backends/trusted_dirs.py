"""Refuse directories another user could tamper with, for the daemon's sockets and files.

vgpud's defaults put a device's memory files under /dev/shm/vgpud and, for a user without
XDG_RUNTIME_DIR, its socket under /tmp/vgpud: in world-writable directories, where any local
user can create ``vgpud`` first. Whoever owns a directory can rename and replace what is in
it: a socket of their own in place of the device's (QEMU then hands *them* the guest's RAM
with its DMA maps), or memory files of their own, which the next start serves to a VM. So
every directory on the way to a socket or a memory file, and every symlink on that way, must
belong to the daemon's user or to root, and no directory may be writable by every user
unless it is sticky (as /tmp and /dev/shm are: there others can remove only what they own).
Group-writable directories are left to the administrator who made them so.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path


def untrusted_directory(path: Path) -> str | None:
    """Why another user could tamper with the existing directory ``path`` (through it, a
    parent of it, or a symlink on the way), or None when no other user can."""
    euid = os.geteuid()
    spelled = Path(os.path.abspath(path))
    resolved = Path(os.path.realpath(path))
    for entry in (spelled, *spelled.parents, resolved, *resolved.parents):
        try:
            st = os.lstat(entry)
        except OSError as exc:
            return f"{entry}: {exc.strerror}"
        kind = "symlink" if stat.S_ISLNK(st.st_mode) else "directory"
        if st.st_uid not in (0, euid):
            return (
                f"{kind} {entry} belongs to uid {st.st_uid}, another user, who could replace "
                "what vgpud keeps there"
            )
        if kind == "directory" and st.st_mode & stat.S_IWOTH and not st.st_mode & stat.S_ISVTX:
            return (
                f"directory {entry} is writable by every user (mode {stat.S_IMODE(st.st_mode):o}) "
                "and not sticky, so anyone could replace what vgpud keeps there"
            )
    return None
