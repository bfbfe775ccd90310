"""The DMA table (spec vfio-user.md §3.2-3.3, R15, §12): limits, overlaps, fd hygiene."""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
from collections.abc import Iterator

import pytest

from tests.hugepages import (
    HUGE,
    Q35_WINDOWS,
    fake_huge_blocks,
    hugetlb_memfd,
    mappings_of,
    position_pattern,
)
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
    # Only the one live mapping holds descriptors: the client's, kept for a live upgrade,
    # and the dup Python's mmap keeps (vgpud/budget.py counts both).
    assert open_fd_count() == before + 2
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


# -- guest RAM in huge pages (spec vfio-user.md §5.7) ---------------------------------------


@pytest.fixture
def huge_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_huge_blocks(monkeypatch)


@pytest.mark.usefixtures("huge_blocks")
@pytest.mark.parametrize(
    ("offset", "size"),
    [
        *Q35_WINDOWS,
        (0x1FF000, 0x2000),  # crosses a block boundary: the mapping needs two blocks
        (0x400000, 0x100000),  # ends at EOF, which is not block aligned (5 MiB)
    ],
)
def test_unaligned_offset_exposes_exactly_the_requested_window(offset: int, size: int) -> None:
    fd = os.memfd_create("guest-ram", os.MFD_CLOEXEC)
    length = 5 << 20
    os.ftruncate(fd, length)
    os.pwrite(fd, position_pattern(length), 0)
    table = DmaTable(max_maps=8)
    entry = table.map(
        0x10000000, size, readable=True, writable=True, fd=os.dup(fd), file_offset=offset
    )
    assert entry is not None and entry.mapping is not None
    assert entry.window == offset % HUGE  # mapped from the block below the offset
    memory = entry.region().memory
    assert memory is not None
    assert len(memory) == size
    assert bytes(memory) == position_pattern(length)[offset : offset + size]
    memory[size - 8 :] = b"dev-wrot"
    assert os.pread(fd, 8, offset + size - 8) == b"dev-wrot"
    memory.release()
    table.unmap_all()
    os.close(fd)


@pytest.mark.usefixtures("huge_blocks")
def test_window_past_end_of_file_is_refused_with_huge_blocks() -> None:
    fd = os.memfd_create("guest-ram", os.MFD_CLOEXEC)
    os.ftruncate(fd, 5 << 20)
    table = DmaTable(max_maps=8)
    with pytest.raises(DmaError) as info:
        table.map(0, 0x101000, readable=True, writable=True, fd=os.dup(fd), file_offset=0x400000)
    assert info.value.errno == errno.EINVAL
    assert "beyond the end of its file" in str(info.value)
    os.close(fd)


def test_madvise_failure_is_a_dma_error(monkeypatch: pytest.MonkeyPatch, memfd: int) -> None:
    closed: list[bool] = []

    class RefusingMmap(mmap.mmap):
        def madvise(self, option: int, start: int = 0, length: int = 0) -> None:
            raise OSError(errno.EINVAL, "Invalid argument")

        def close(self) -> None:
            closed.append(True)
            super().close()

    monkeypatch.setattr("vgpud.server.dma.mmap.mmap", RefusingMmap)
    before = open_fd_count()
    table = DmaTable(max_maps=8)
    with pytest.raises(DmaError) as info:
        table.map(0, PAGE, readable=True, writable=True, fd=os.dup(memfd), file_offset=0)
    assert info.value.errno == errno.EINVAL
    assert "MADV_DONTFORK" in str(info.value)
    assert closed == [True], "the mapping was not released"
    assert len(table) == 0
    assert open_fd_count() == before


def test_hugetlb_guest_ram_maps_at_qemu_offsets() -> None:
    length = 4 * HUGE
    fd = hugetlb_memfd("hugetlb-ram", length)
    # hugetlbfs has no write(): fill and check the file through a mapping of our own.
    whole = mmap.mmap(fd, length, mmap.MAP_SHARED)
    whole[:] = position_pattern(length)
    table = DmaTable(max_maps=8)
    for offset, size in Q35_WINDOWS:
        entry = table.map(
            offset, size, readable=True, writable=True, fd=os.dup(fd), file_offset=offset
        )
        assert entry is not None
        memory = entry.region().memory
        assert memory is not None
        assert len(memory) == size
        assert bytes(memory[:8]) == whole[offset : offset + 8]
        assert bytes(memory[-8:]) == whole[offset + size - 8 : offset + size]
        memory[:8] = b"dev-wrot"
        assert whole[offset : offset + 8] == b"dev-wrot"
        memory.release()
    assert mappings_of("hugetlb-ram") == 1 + len(Q35_WINDOWS)
    table.unmap_all()
    # munmap of a hugetlb mapping fails on a partial huge page (and Python's mmap.close
    # ignores that): only our own mapping may be left.
    assert mappings_of("hugetlb-ram") == 1
    whole.close()
    os.close(fd)


def test_remap_with_another_offset_or_access_is_eexist(memfd: int) -> None:
    table = DmaTable(max_maps=8)
    table.map(0, PAGE, readable=True, writable=True, fd=os.dup(memfd), file_offset=0)
    for offset, writable in ((PAGE, True), (0, False)):
        with pytest.raises(DmaError) as info:
            table.map(
                0, PAGE, readable=True, writable=writable, fd=os.dup(memfd), file_offset=offset
            )
        assert info.value.errno == errno.EEXIST
    table.unmap_all()


def test_map_one_page_past_the_end_of_its_file_is_refused(memfd: int) -> None:
    table = DmaTable(max_maps=8)
    with pytest.raises(DmaError) as info:  # 16-page file: pages 1..16 run one page past it
        table.map(0, 16 * PAGE, readable=True, writable=True, fd=os.dup(memfd), file_offset=PAGE)
    assert info.value.errno == errno.EINVAL
    assert len(table) == 0


def _vm_flags(address: int) -> list[str]:
    """The VmFlags of the mapping holding ``address``, from /proc/self/smaps."""
    inside = False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                start, end = (int(part, 16) for part in head.split("-"))
                inside = start <= address < end
            elif inside and line.startswith("VmFlags:"):
                return line.split()[1:]
    raise AssertionError(f"no mapping holds {address:#x}")


def test_guest_memory_is_not_inherited_by_children(memfd: int) -> None:
    table = DmaTable(max_maps=8)
    entry = table.map(0, PAGE, readable=True, writable=True, fd=os.dup(memfd), file_offset=0)
    assert entry is not None and entry.mapping is not None
    view = ctypes.c_char.from_buffer(entry.mapping)
    address = ctypes.addressof(view)
    del view  # release the buffer export before the mapping is closed
    assert "dc" in _vm_flags(address)  # VM_DONTCOPY: MADV_DONTFORK
    table.unmap_all()
