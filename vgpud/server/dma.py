"""The per-connection DMA table: what the client mapped, and our mappings of it.

Spec vfio-user.md §3.2/§3.3, R15 and §12: accept fd-less maps (ROM, BAR back-mappings),
identical re-maps succeed, overlaps fail (EEXIST), unmap-all (flag 2) removes everything,
and every mapping and fd is released before the unmap reply. One deliberate deviation: the
sheet (§3.3, R15, §5.7) wants an unmap to match a prior map exactly; here an unmap removes
every mapping inside its range and succeeds on an empty one, as the kernel's type1 IOMMU
does, because QEMU's vIOMMU code unmaps whole ranges (docs/protocol.md "DMA_UNMAP ranges",
:meth:`DmaTable.unmap`). An exact unmap is the one-mapping case. An fd-backed map is
checked against the file's size first: mapping past the end of a file would SIGBUS the
daemon on first touch.

Guest RAM backed by huge pages (hugetlb memfds) can only be mapped from block-aligned file
offsets and in whole blocks, while QEMU's offsets are a section's place in its RAM block
(q35 low RAM: 0x0, 0xc0000, 0x100000). So a map covers whole blocks around the requested
window and the device sees only the window (spec vfio-user.md §5.7, libvfio-user lib/dma.c).

The received fd is kept with its mapping, so that a live upgrade can hand the mapping to the
next process (vgpud/upgrade.py: a mapping does not survive exec, its fd does). Python's
``mmap`` keeps a private dup of it as well, so each live fd-backed mapping costs two
descriptors; the table is bounded by ``max_dma_maps`` (vgpud/budget.py counts both) and the
daemon raises its soft RLIMIT_NOFILE at start-up.
"""

from __future__ import annotations

import errno
import mmap
import os
import stat
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from backends.device import DmaRegion
from vgpud.server.transport import close_fds


class DmaError(Exception):
    """A DMA request the client must be told about (``errno`` positive)."""

    def __init__(self, errno_: int, message: str) -> None:
        super().__init__(message)
        self.errno = errno_


@dataclass(slots=True)
class DmaMapping:
    """One entry of the table."""

    iova: int
    size: int
    readable: bool
    writable: bool
    file_offset: int
    mapping: mmap.mmap | None = field(default=None, repr=False)
    # Identity of the backing file, so an identical re-map can be recognised.
    file_id: tuple[int, int] | None = None
    # Where the requested window starts inside ``mapping``, which begins at ``file_offset``
    # rounded down to the file's block (see _mmap_guest_memory).
    window: int = 0
    fd: int | None = None  # the client's fd, kept for a live upgrade (module docstring)

    @property
    def end(self) -> int:
        return self.iova + self.size

    def region(self) -> DmaRegion:
        """What the device is told: exactly the ``size`` bytes the client mapped."""
        memory = None
        if self.mapping is not None:
            memory = memoryview(self.mapping)[self.window : self.window + self.size]
        return DmaRegion(self.iova, self.size, self.readable, self.writable, memory)

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        if self.mapping is not None:
            try:
                self.mapping.close()
            except BufferError:
                # A view into the mapping is still alive somewhere (a bug in a device model);
                # dropping our reference lets the GC unmap it once that view dies.
                pass
            self.mapping = None


class DmaTable:
    """DMA mappings of one client, bounded by the negotiated ``max_dma_maps``."""

    def __init__(self, max_maps: int, page_size: int = mmap.PAGESIZE) -> None:
        self.max_maps = max_maps
        self.page_size = page_size
        self._maps: dict[int, DmaMapping] = {}

    def __len__(self) -> int:
        return len(self._maps)

    def mappings(self) -> list[DmaMapping]:
        """Current entries, by IOVA."""
        return sorted(self._maps.values(), key=lambda m: m.iova)

    def map(
        self,
        iova: int,
        size: int,
        *,
        readable: bool,
        writable: bool,
        fd: int | None,
        file_offset: int,
    ) -> DmaMapping | None:
        """Add a mapping. Takes ownership of ``fd`` (kept by the new entry, closed on every
        other path).

        Returns the new entry, or None for an identical re-map (already present).
        """
        entry = None
        try:
            entry = self._map(iova, size, readable, writable, fd, file_offset)
            return entry
        finally:
            if fd is not None and (entry is None or entry.fd != fd):
                os.close(fd)

    def handover(self) -> tuple[list[dict[str, Any]], list[int]]:
        """The mappings as JSON-able data for a live upgrade, and the fds they name (still
        ours: the next process takes them over with :meth:`adopt`)."""
        entries: list[dict[str, Any]] = []
        fds: list[int] = []
        for entry in self.mappings():
            entries.append(
                {
                    "iova": entry.iova,
                    "size": entry.size,
                    "readable": entry.readable,
                    "writable": entry.writable,
                    "file_offset": entry.file_offset,
                    "fd": entry.fd,
                }
            )
            if entry.fd is not None:
                fds.append(entry.fd)
        return entries, fds

    def adopt(self, entries: Sequence[Mapping[str, Any]]) -> list[DmaMapping]:
        """Map again what :meth:`handover` described (another process's table); the new
        entries. Every fd the entries name is taken over as :meth:`map` takes it, whatever
        happens. Raises DmaError, or KeyError/TypeError/ValueError for a description that is
        not one; the entries adopted so far stay, to be released with the table."""
        adopted: list[DmaMapping] = []
        for index, raw in enumerate(entries):
            fd = raw.get("fd") if isinstance(raw, Mapping) else None
            try:
                iova, size = int(raw["iova"]), int(raw["size"])
                readable, writable = bool(raw["readable"]), bool(raw["writable"])
                file_offset = int(raw["file_offset"])
                if fd is not None and type(fd) is not int:
                    raise TypeError(f"DMA fd {fd!r} is not a number")
            except BaseException:
                _close_named_fds([raw, *entries[index + 1 :]])
                raise
            try:  # map() owns fd from here
                entry = self.map(
                    iova, size, readable=readable, writable=writable, fd=fd, file_offset=file_offset
                )
            except BaseException:
                _close_named_fds(entries[index + 1 :])
                raise
            if entry is not None:
                adopted.append(entry)
        return adopted

    def _map(  # noqa: PLR0917 (private; mirrors map()'s keywords)
        self,
        iova: int,
        size: int,
        readable: bool,
        writable: bool,
        fd: int | None,
        file_offset: int,
    ) -> DmaMapping | None:
        if size == 0:
            raise DmaError(errno.EINVAL, "DMA_MAP of size 0")
        if iova + size > 1 << 64:
            raise DmaError(errno.EOVERFLOW, "DMA_MAP range wraps the address space")
        if (iova | size) % self.page_size:
            raise DmaError(errno.EINVAL, f"DMA_MAP range not aligned to {self.page_size}")
        file_id = _file_identity(fd) if fd is not None else None
        existing = self._overlapping(iova, size)
        if existing is not None:
            if (
                existing.iova == iova
                and existing.size == size
                and existing.file_id == file_id
                and existing.file_offset == file_offset
                and (existing.readable, existing.writable) == (readable, writable)
            ):
                return None
            raise DmaError(
                errno.EEXIST,
                f"DMA_MAP [{iova:#x}, {iova + size:#x}) overlaps "
                f"[{existing.iova:#x}, {existing.end:#x})",
            )
        if len(self._maps) >= self.max_maps:
            raise DmaError(errno.ENOSPC, f"more than max_dma_maps={self.max_maps} mappings")
        entry = DmaMapping(iova, size, readable, writable, file_offset, None, file_id)
        if fd is not None:
            entry.mapping, entry.window = _mmap_guest_memory(fd, file_offset, size, writable)
            entry.fd = fd
        self._maps[iova] = entry
        return entry

    def unmap(self, iova: int, size: int) -> list[DmaMapping]:
        """Remove and release every mapping inside [iova, iova+size); return them.

        The kernel's type1 rule (VFIO_IOMMU_UNMAP_DMA), which QEMU's vIOMMU code is written
        against: with an emulated IOMMU, QEMU also unmaps whole address ranges in
        power-of-two pieces when the guest switches or resets the device's IOMMU domain
        (docs/protocol.md "DMA_UNMAP ranges"). A range holding no mapping is not an error,
        and the mappings inside a range all go (an exact unmap is the one-mapping case). A
        range that would cut a mapping in two is refused, as type1v2 does: the mapping's
        fd-backed memory cannot be partly released.
        """
        if size == 0 or (iova | size) % self.page_size:
            raise DmaError(
                errno.EINVAL, f"DMA_UNMAP [{iova:#x}, +{size:#x}) empty or not page aligned"
            )
        end = iova + size
        if end > 1 << 64:
            raise DmaError(errno.EINVAL, "DMA_UNMAP range wraps the address space")
        inside: list[DmaMapping] = []
        for entry in self._maps.values():
            if entry.iova < end and iova < entry.end:
                if entry.iova < iova or entry.end > end:
                    raise DmaError(
                        errno.EINVAL,
                        f"DMA_UNMAP [{iova:#x}, {end:#x}) would split the mapping "
                        f"[{entry.iova:#x}, {entry.end:#x})",
                    )
                inside.append(entry)
        for entry in inside:
            del self._maps[entry.iova]
            entry.release()
        return inside

    def unmap_all(self) -> list[DmaMapping]:
        """Remove and release everything (unmap-all, and disconnect)."""
        entries = list(self._maps.values())
        self._maps.clear()
        for entry in entries:
            entry.release()
        return entries

    def _overlapping(self, iova: int, size: int) -> DmaMapping | None:
        # Linear scan: QEMU keeps a few dozen maps (40-73 over a whole guest lifetime in the
        # captures), far below where an interval tree would pay for itself.
        end = iova + size
        for entry in self._maps.values():
            if entry.iova < end and iova < entry.end:
                return entry
        return None


def _close_named_fds(entries: Sequence[object]) -> None:
    """Close the fd each of ``entries`` (handed-over mappings, maybe malformed) names."""
    named = [raw.get("fd") if isinstance(raw, Mapping) else None for raw in entries]
    close_fds([fd for fd in named if type(fd) is int])


def _file_identity(fd: int) -> tuple[int, int]:
    st = os.fstat(fd)
    return (st.st_dev, st.st_ino)


def _mmap_guest_memory(fd: int, offset: int, size: int, writable: bool) -> tuple[mmap.mmap, int]:
    """Map the file around [offset, offset+size); return the mapping and the window's start."""
    try:
        st = os.fstat(fd)
    except OSError as exc:
        raise DmaError(errno.EBADF, f"DMA_MAP fd unusable: {exc.strerror}") from exc
    if not stat.S_ISREG(st.st_mode):
        raise DmaError(errno.EINVAL, "DMA_MAP fd is not a regular file or memfd")
    if offset + size > st.st_size:
        raise DmaError(
            errno.EINVAL,
            f"DMA_MAP [{offset:#x}, +{size:#x}) lies beyond the end of its file "
            f"({st.st_size:#x} bytes)",
        )
    # A hugetlb file can only be mapped from a huge-page aligned offset, and munmap/madvise of
    # its mappings refuse partial huge pages; st_blksize is the huge page size there and the
    # base page size for a memfd. QEMU's offsets are not aligned to it (q35: 0xc0000), so map
    # whole blocks and keep the delta (spec vfio-user.md §5.7; libvfio-user lib/dma.c rounds
    # the offset down the same way).
    block = max(st.st_blksize, mmap.ALLOCATIONGRANULARITY)
    start = offset - offset % block
    # Not past the end of the file: Python's mmap refuses that (ValueError). A hugetlb file's
    # size is a whole number of huge pages (ftruncate refuses anything else), so there the end
    # stays block aligned; mmap and munmap of other files take any length.
    end = min(-(-(offset + size) // block) * block, st.st_size)
    prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
    try:
        mapping = mmap.mmap(fd, end - start, flags=mmap.MAP_SHARED, prot=prot, offset=start)
    except (OSError, ValueError, OverflowError) as exc:
        raise DmaError(errno.EINVAL, f"cannot map DMA region: {exc}") from exc
    # Guest RAM must never be inherited by a child process.
    try:
        mapping.madvise(mmap.MADV_DONTFORK)
    except OSError as exc:
        mapping.close()
        raise DmaError(
            exc.errno or errno.EINVAL,
            f"cannot keep DMA region [{start:#x}, {end:#x}) out of child processes "
            f"(madvise MADV_DONTFORK): {exc.strerror}",
        ) from exc
    return mapping, offset - start
