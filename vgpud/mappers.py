"""Other processes that map a device's memory files.

QEMU maps BAR2 and BAR4 straight from the files the region-info replies hand it (DESIGN.md
"Device memory and backing files"), and keeps those mappings for as long as it runs, also
after its connection is gone: it never reconnects (spec vfio-user.md §5.8). So when vgpud
restarts under a running VM, that VM's GPU stops answering, yet the VM still writes the
device memory that the next VM attached to the device is given: two VMs on one GPU memory
(docs/operations.md, "The VM's life cycle"; seen with QEMU 11.1.3). vgpud cannot take the
mapping away, but it can say so, naming the process: at start-up, and when a client
attaches while another process maps the memory.

Found by reading ``/proc/<pid>/maps`` of every process the daemon may read (root sees all;
another user sees its own; a container sees its own pid namespace), matching the files by
device and inode number.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from vgpud.log_limit import LogLimiter
from vgpud.memory_files import FileId, MemoryFiles
from vgpud.signals import quiet_thread

PROC = Path("/proc")
# How long a client's attach waits for the search: it runs before the session is served,
# and QEMU gives each reply 5 s (x-msg-timeout, spec vfio-user.md §5.1). Measured here: 63 ms
# over 2000 small processes; a host with thousands of large ones could take seconds.
ATTACH_SCAN_LIMIT = 1.0


@dataclass(frozen=True, slots=True)
class Mapper:
    """A process that maps at least one of the files."""

    pid: int
    command: str  # /proc/<pid>/comm
    files: frozenset[FileId]  # which of the files asked about it maps


def find_mappers(
    files: Collection[FileId], *, exclude: Iterable[int] = (), proc: Path = PROC
) -> list[Mapper]:
    """Every process but ``exclude`` (and this one) that maps one of ``files``, by pid.

    Processes that vanish or may not be read while this runs are skipped, and so is a
    ``proc`` that cannot be listed: the answer is what could be seen, which is all of it for
    root outside a container.
    """
    if not files:
        return []
    try:
        entries = list(proc.iterdir())
    except OSError:
        return []
    skip = {os.getpid(), *exclude}
    # A quick test before parsing: the inode number as the maps line spells it.
    inodes = {b" %d " % ino for _, ino in files}
    found = []
    for entry in entries:
        if not entry.name.isdigit() or int(entry.name) in skip:
            continue
        try:
            maps = (entry / "maps").read_bytes()
        except OSError:
            continue
        if any(ino in maps for ino in inodes):
            mapped = _mapped(maps, files)
            if mapped:
                found.append(Mapper(int(entry.name), _command(entry), mapped))
    return sorted(found, key=lambda m: m.pid)


def _mapped(maps: bytes, files: Collection[FileId]) -> frozenset[FileId]:
    # "start-end perms offset major:minor inode path" (proc(5)); major and minor in hex.
    mapped = set()
    for line in maps.splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) < 5:
            continue
        try:
            major, minor = (int(part, 16) for part in fields[3].split(b":"))
            file_id = (os.makedev(major, minor), int(fields[4]))
        except ValueError:
            continue
        if file_id in files:
            mapped.add(file_id)
    return frozenset(mapped)


def _command(entry: Path) -> str:
    try:
        return (entry / "comm").read_text().strip()
    except OSError:
        return "?"


class SharedMemoryCheck:
    """For one device: at each client's attach, warn when another process maps the
    device's memory (a VM from before a restart: the new client's guest would share it)."""

    def __init__(self, files: MemoryFiles) -> None:
        self._files = files.ids

    async def at_attach(
        self,
        log: Any,
        log_limit: LogLimiter,
        peer: dict[str, int],
        *,
        limit: float = ATTACH_SCAN_LIMIT,
    ) -> None:
        """The scan runs on a worker thread, so the daemon's other devices go on being
        served, for at most ``limit`` seconds (then it is left to finish unheard, and the
        client is served). A diagnostic: its own failure is logged and goes no further."""
        mappers: list[Mapper] | None = None
        try:
            exclude = [peer["peer_pid"]] if "peer_pid" in peer else []
            with trio.move_on_after(limit):
                mappers = await trio.to_thread.run_sync(
                    quiet_thread(functools.partial(find_mappers, self._files, exclude=exclude)),
                    abandon_on_cancel=True,
                )
        except Exception:
            log.exception("could not look for other processes mapping the device memory")
            return
        if mappers is None:
            log_limit.log(
                log,
                "info",
                "gave up looking for other processes mapping the device memory",
                limit_s=limit,
            )
        elif mappers:
            log_limit.log(
                log,
                "warning",
                "device memory is also mapped by another process, which shares it with this "
                "client's guest (a VM from before vgpud's restart?)",
                **describe(mappers),
            )


def describe(mappers: Iterable[Mapper]) -> dict[str, list[Any]]:
    """Log fields naming the processes."""
    mappers = list(mappers)
    return {"pids": [m.pid for m in mappers], "commands": [m.command for m in mappers]}
