"""The files behind a device's mappable memory, as the VMM is given them.

The region-info replies for BAR2 and BAR4 hand QEMU an fd to mmap (DESIGN.md "Device memory
and backing files"): for the synthetic GPU, its sparse memory files. What is said about
those files while the device is served -- who else maps them (vgpud/mappers.py), how much
of them the filesystem holds (the status line) -- starts from these fds, taken before any
client attaches and owned by the device.
"""

from __future__ import annotations

import os
import stat

from backends.device import (
    BAR2_REGION_INDEX,
    BAR4_REGION_INDEX,
    MmapTarget,
    RegionInfo,
    VfioDevice,
)

# (st_dev, st_ino) of a file.
FileId = tuple[int, int]


def mappable_regions(device: VfioDevice) -> list[tuple[RegionInfo, MmapTarget]]:
    """BAR2's and BAR4's region info, with what it hands the VMM to mmap, where it does (the
    variant's resmem and usemem, or a Blackwell's real BAR1)."""
    infos = [device.region_info(index) for index in (BAR2_REGION_INDEX, BAR4_REGION_INDEX)]
    return [(info, info.mmap) for info in infos if info.mmap is not None]


class MemoryFiles:
    """The regular files a VMM is told to mmap for BAR2 and BAR4: none for a device whose
    memory is not in files (a VFIO device's mappings are of its own device fd)."""

    def __init__(self, device: VfioDevice) -> None:
        # Asked once, before any client: the device may open its files to answer, and
        # under the libvfio-user engine only the device's own thread may ask it anything
        # later. The fds stay the device's; they are only fstat()ed here, from any thread.
        self._fds = [
            target.fd
            for _, target in mappable_regions(device)
            if stat.S_ISREG(os.fstat(target.fd).st_mode)
        ]
        self.ids: frozenset[FileId] = frozenset(
            (st.st_dev, st.st_ino) for st in map(os.fstat, self._fds)
        )

    def allocated(self) -> int | None:
        """Bytes of the files their filesystem holds (the guest's writes, or a prealloc);
        None when the device has no such files or has been released."""
        if not self._fds:
            return None
        try:
            return sum(os.fstat(fd).st_blocks * 512 for fd in self._fds)
        except OSError:
            return None
