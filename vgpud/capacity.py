"""Whether the filesystems under the device memory files can hold the device memory.

The files are sparse (DESIGN.md "Device memory and backing files"): a page costs its
filesystem something only once written, so a device may be larger than the free space
under it. The page the filesystem cannot provide when the guest writes it, through QEMU's
mapping, is a SIGBUS that kills the VM, far from its cause (docs/operations.md, "Device
memory"). So the daemon warns at start-up when that could happen, and with ``prealloc``
allocates every page a VMM can map before it serves, failing the start instead.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import trio

from backends.device import SparseArea
from backends.synthetic import SyntheticGpu
from backends.synthetic.memory import Unbacked
from vgpud.devices import BuiltDevice
from vgpud.memory_files import mappable_regions

# fallocate of this much takes well under a second even on tmpfs (which zeroes the pages),
# so a stop during a large preallocation is heard between two of them.
PREALLOC_CHUNK = 256 << 20


class PreallocError(Exception):
    """The device memory could not be allocated; the message says how much was missing."""


@dataclass(frozen=True, slots=True)
class MemoryShortfall:
    """Devices whose memory, not yet written, is more than their filesystem has free."""

    devices: tuple[str, ...]
    backing_dirs: tuple[str, ...]
    unbacked: int
    free: int


def memory_shortfalls(built: Sequence[BuiltDevice]) -> list[MemoryShortfall]:
    """Filesystems that could not provide every page of the device memory they hold.

    Sparse files make this legal (a 96 GiB device on a 12 GiB ``/dev/shm`` is fine until the
    guest writes 12 GiB), so it is worth a warning, not a refusal. Devices on one filesystem
    are summed, as they share its free space (like LVM's warning when thin volumes add up to
    more than their pool).
    """
    by_filesystem: dict[int, list[tuple[str, Unbacked]]] = {}
    for device in built:
        if isinstance(device.backend, SyntheticGpu):
            unbacked = device.backend.unbacked_memory()
            if unbacked is not None:
                by_filesystem.setdefault(unbacked.filesystem, []).append((device.name, unbacked))
    shortfalls = []
    for entries in by_filesystem.values():
        total = sum(unbacked.size for _, unbacked in entries)
        free = min(unbacked.free for _, unbacked in entries)
        if total > free:
            shortfalls.append(
                MemoryShortfall(
                    devices=tuple(name for name, _ in entries),
                    backing_dirs=tuple(str(unbacked.directory) for _, unbacked in entries),
                    unbacked=total,
                    free=free,
                )
            )
    return shortfalls


def mappable_extents(built: BuiltDevice) -> list[tuple[int, int, int]]:
    """``(fd, offset, length)`` of every part of the memory files a VMM can map: the
    mmappable areas of BAR2 and BAR4 as the region-info replies give them to QEMU (the
    variant's resmem and usemem, or a Blackwell's real BAR1), and nothing of the BAR tails."""
    extents = []
    for info, target in mappable_regions(built.device):
        for area in info.sparse_areas or (SparseArea(0, info.size),):
            extents.append((target.fd, target.offset + area.offset, area.size))
    return extents


async def preallocate(built: BuiltDevice, log: Any) -> None:
    """Allocate every page of ``built``'s memory files a VMM can map (``prealloc``).

    Contents are kept: fallocate only gives storage to the holes. A device the filesystem
    cannot hold is refused before anything is allocated, so a failed start does not leave a
    disk filled; one that loses a race for the space gets the filesystem's own ENOSPC.
    """
    assert isinstance(built.backend, SyntheticGpu)  # the config allows prealloc for no other
    extents = mappable_extents(built)  # first: it opens the files the device will serve
    unbacked = built.backend.unbacked_memory()
    if unbacked is None or unbacked.size == 0:
        return
    if unbacked.size > unbacked.free:
        raise PreallocError(
            f"device {built.name}: cannot preallocate its memory in {unbacked.directory}: "
            f"{unbacked.size} bytes are not yet allocated and the filesystem has {unbacked.free} "
            "free"
        )
    started = trio.current_time()
    for fd, offset, length in extents:
        for start in range(offset, offset + length, PREALLOC_CHUNK):
            try:
                os.posix_fallocate(fd, start, min(PREALLOC_CHUNK, offset + length - start))
            except OSError as exc:
                raise PreallocError(
                    f"device {built.name}: cannot preallocate its memory in "
                    f"{unbacked.directory}: {exc.strerror}"
                ) from exc
            await trio.lowlevel.checkpoint()
    log.info(
        "device memory allocated",
        allocated=unbacked.size,
        elapsed_ms=round((trio.current_time() - started) * 1000),
    )
