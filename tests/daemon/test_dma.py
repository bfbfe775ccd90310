"""The DMA table (spec vfio-user.md §3.2-3.3, R15, §12): limits, overlaps, fd hygiene."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator

import pytest

from vgpud.server.dma import DmaError, DmaTable

PAGE = 4096


def open_fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture
def memfd() -> Iterator[int]:
    fd = os.memfd_create("guest-ram", os.MFD_CLOEXEC)
    os.ftruncate(fd, 16 * PAGE)
    yield fd
    os.close(fd)


def test_fd_backed_map_sees_guest_memory(memfd: int) -> None:
    table = DmaTable(max_maps=8)
    os.pwrite(memfd, b"guest", 4 * PAGE)
    entry = table.map(
        0x10000, 8 * PAGE, readable=True, writable=True, fd=os.dup(memfd), file_offset=4 * PAGE
    )
    assert entry is not None and entry.mapping is not None
    assert entry.region().memory is not None
    assert bytes(entry.mapping[:5]) == b"guest"
    entry.mapping[8:12] = b"dev!"
    assert os.pread(memfd, 4, 4 * PAGE + 8) == b"dev!"
    table.unmap(0x10000, 8 * PAGE)
    assert len(table) == 0


def test_received_fds_are_closed_on_every_path(memfd: int) -> None:
    table = DmaTable(max_maps=2)
    before = open_fd_count()
    table.map(0, PAGE, readable=True, writable=True, fd=os.dup(memfd), file_offset=0)
    # identical re-map: accepted, fd closed
    assert table.map(0, PAGE, readable=True, writable=True, fd=os.dup(memfd), file_offset=0) is None
    # overlap, beyond the file, unaligned, too many: refused, fd closed
    for kwargs, code in [
        ({"iova": PAGE // 2 * 0, "size": 2 * PAGE}, errno.EEXIST),
        ({"iova": 0x100000, "size": 32 * PAGE}, errno.EINVAL),
        ({"iova": 0x100800, "size": PAGE}, errno.EINVAL),
    ]:
        with pytest.raises(DmaError) as info:
            table.map(readable=True, writable=True, fd=os.dup(memfd), file_offset=0, **kwargs)
        assert info.value.errno == code
    table.map(0x200000, PAGE, readable=True, writable=False, fd=None, file_offset=0)
    with pytest.raises(DmaError) as info:
        table.map(0x300000, PAGE, readable=True, writable=True, fd=os.dup(memfd), file_offset=0)
    assert info.value.errno == errno.ENOSPC
    # Only the one live mapping holds a descriptor (Python's mmap keeps a dup of its fd).
    assert open_fd_count() == before + 1
    table.unmap_all()
    assert len(table) == 0
    assert open_fd_count() == before


def test_unmap_removes_the_mappings_inside_its_range() -> None:
    # The kernel's type1 rule, which QEMU's vIOMMU path relies on (docs/protocol.md).
    table = DmaTable(max_maps=8)
    table.map(0, 4 * PAGE, readable=True, writable=True, fd=None, file_offset=0)
    table.map(8 * PAGE, PAGE, readable=True, writable=True, fd=None, file_offset=0)
    for iova, size in [(0, PAGE), (PAGE, 4 * PAGE), (2 * PAGE, 8 * PAGE)]:
        with pytest.raises(DmaError) as info:
            table.unmap(iova, size)  # would cut [0, 4 pages) in two
        assert info.value.errno == errno.EINVAL
    assert len(table) == 2, "a refused unmap removed something"
    assert table.unmap(4 * PAGE, 4 * PAGE) == []  # nothing there: not an error
    removed = table.unmap(0, 16 * PAGE)
    assert [(m.iova, m.size) for m in removed] == [(0, 4 * PAGE), (8 * PAGE, PAGE)]
    assert len(table) == 0
    table.map(0, PAGE, readable=True, writable=True, fd=None, file_offset=0)
    assert [(m.iova, m.size) for m in table.unmap(0, PAGE)] == [(0, PAGE)]  # exact


def test_unmap_refuses_empty_unaligned_and_wrapping_ranges() -> None:
    table = DmaTable(max_maps=8)
    for iova, size in [(0, 0), (0x800, PAGE), (0, PAGE + 1), (1 << 63, 1 << 64)]:
        with pytest.raises(DmaError) as info:
            table.unmap(iova, size)
        assert info.value.errno == errno.EINVAL, (iova, size)
    # QEMU's last piece of a whole-space unmap ends exactly at 2**64.
    assert table.unmap(0xFEF00000, (1 << 64) - 0xFEF00000) == []


def test_non_file_fd_is_refused() -> None:
    table = DmaTable(max_maps=8)
    efd = os.eventfd(0)
    with pytest.raises(DmaError):
        table.map(0, PAGE, readable=True, writable=True, fd=efd, file_offset=0)
    with pytest.raises(OSError):
        os.fstat(efd)  # closed by the table


def test_zero_and_wrapping_sizes() -> None:
    table = DmaTable(max_maps=8)
    with pytest.raises(DmaError):
        table.map(0, 0, readable=True, writable=True, fd=None, file_offset=0)
    with pytest.raises(DmaError) as info:
        table.map((1 << 64) - PAGE, 2 * PAGE, readable=True, writable=True, fd=None, file_offset=0)
    assert info.value.errno == errno.EOVERFLOW
