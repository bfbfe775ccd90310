"""Guest RAM in 2 MiB huge pages for the DMA tests (spec vfio-user.md §5.7).

Real hugetlb memfds need reserved huge pages, which CI machines do not have: those tests skip
unless ``/proc/meminfo`` shows enough free ones (as root: ``echo 8 >
/proc/sys/vm/nr_hugepages``). ``fake_huge_blocks`` makes an ordinary memfd look like a hugetlb
file to the DMA table (st_blksize 2 MiB), so the offset arithmetic is always tested.
"""

from __future__ import annotations

import array
import os

import pytest

HUGE = 2 << 20
# QEMU's DMA_MAP offsets are a section's place in its RAM block: q35 low RAM is split around
# the VGA hole and the BIOS (0x0, 0xc0000, 0x100000), in sizes that are not whole huge pages.
Q35_WINDOWS = [(0, 0xA0000), (0xC0000, 0x40000), (0x100000, 3 << 20)]


def position_pattern(length: int) -> bytes:
    """Each 8-byte word holds its own file offset: a window read from the wrong place shows."""
    return array.array("Q", range(0, length, 8)).tobytes()


def fake_huge_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make every file look like a hugetlb file (st_blksize 2 MiB) to the DMA table."""
    real_fstat = os.fstat

    def fstat(fd: int) -> os.stat_result:
        st = real_fstat(fd)
        return os.stat_result(tuple(st[:10]), {"st_blksize": HUGE, "st_blocks": st.st_blocks})

    monkeypatch.setattr("vgpud.server.dma.os.fstat", fstat)


def free_huge_pages() -> int:
    with open("/proc/meminfo", encoding="ascii") as meminfo:
        for line in meminfo:
            if line.startswith("HugePages_Free:"):
                return int(line.split()[1])
    return 0


def hugetlb_memfd(name: str, length: int) -> int:
    """A hugetlb memfd of ``length`` bytes, or a skip saying why there is none."""
    if free_huge_pages() < length // HUGE:
        pytest.skip(
            f"needs {length // HUGE} free 2 MiB huge pages (/proc/meminfo HugePages_Free); "
            "as root: echo 8 > /proc/sys/vm/nr_hugepages"
        )
    try:
        fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_HUGETLB)
    except OSError as exc:
        pytest.skip(f"no hugetlb memfd: {exc}")
    if os.fstat(fd).st_blksize != HUGE:
        os.close(fd)
        pytest.skip("the default huge page size is not 2 MiB")
    os.ftruncate(fd, length)
    return fd


def mappings_of(name: str) -> int:
    """How many mappings of memfd ``name`` this process has (/proc/self/maps)."""
    with open("/proc/self/maps", encoding="utf-8") as maps:
        return sum(f"/memfd:{name} " in line for line in maps)
