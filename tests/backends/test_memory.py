"""Device memory in sparse backing files: creation, persistence, windows."""

from __future__ import annotations

import errno
import fcntl
import os
import time
from pathlib import Path

import pytest

from backends.device import BAR2_REGION_INDEX, DeviceError, RegionFlags
from backends.synthetic import BackingFileError, SyntheticGpu, get_profile
from backends.synthetic.memory import BackingFile
from backends.synthetic.profiles import GIB
from tests.backends.helpers import open_fds


def test_device_memory_from_profile(gpu: SyntheticGpu) -> None:
    memory = gpu.device_memory()
    assert memory is not None
    assert (memory.memphys, memory.memlength) == (0x4000_0000_0000, 4 * GIB)


def test_size_zero_means_no_device_memory(tmp_path: Path) -> None:
    gpu = SyntheticGpu(get_profile("gb200").with_overrides(memory_size=0), tmp_path)
    assert gpu.device_memory() is None
    with pytest.raises(DeviceError):
        gpu.memory_window(0, 4096, True)
    gpu.shutdown()


def test_144g_device_is_sparse_and_fast(tmp_path: Path) -> None:
    start = time.monotonic()
    gpu = SyntheticGpu(get_profile("gh200-480g"), tmp_path)
    usemem = gpu.memory_window(0, 143 * GIB, True)
    resmem = gpu.memory_window(143 * GIB, 1 * GIB, False)
    usemem.view[5 * GIB] = 0x42  # touch one page
    elapsed = time.monotonic() - start
    assert elapsed < 0.5
    st = os.stat(tmp_path / "usemem")
    assert st.st_size == 143 * GIB
    assert st.st_blocks * 512 <= 1 << 20
    assert os.stat(tmp_path / "resmem").st_blocks == 0
    assert not resmem.mapped
    gpu.shutdown()


def test_contents_survive_recreation(tmp_path: Path) -> None:
    profile = get_profile("gh200").with_overrides(memory_size=2 * GIB)
    gpu = SyntheticGpu(profile, tmp_path)
    gpu.memory_window(0, GIB, True).view[100:104] = b"keep"
    gpu.shutdown()
    again = SyntheticGpu(profile, tmp_path)
    assert bytes(again.memory_window(0, GIB, True).view[100:104]) == b"keep"
    again.shutdown()


def test_existing_file_of_other_size_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "usemem").write_bytes(b"x" * 4096)
    gpu = SyntheticGpu(get_profile("gh200"), tmp_path)
    before = open_fds()
    with pytest.raises(BackingFileError, match="4096 bytes"):
        gpu.memory_window(0, GIB, True)
    assert open_fds() == before
    assert (tmp_path / "usemem").read_bytes() == b"x" * 4096  # untouched
    gpu.shutdown()


def test_backing_fds_are_cloexec(tmp_path: Path) -> None:
    backing = BackingFile(tmp_path / "f", 8192)
    assert fcntl.fcntl(backing.fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
    backing.close()
    assert (tmp_path / "f").stat().st_size == 8192


@pytest.mark.parametrize(
    ("start", "length", "cacheable"),
    [
        (0, 8 * GIB, True),  # beyond memlength
        (-4096, 4096, True),
        (0, 0, True),
        (0, 2 * GIB, True),  # a second, different cacheable window
        (GIB, GIB, False),  # overlaps the cacheable window
    ],
)
def test_bad_windows(gpu: SyntheticGpu, start: int, length: int, cacheable: bool) -> None:
    gpu.memory_window(0, 3 * GIB, True)
    with pytest.raises(DeviceError) as err:
        gpu.memory_window(start, length, cacheable)
    assert err.value.errno == errno.EINVAL


def test_same_window_twice_is_the_same_object(gpu: SyntheticGpu) -> None:
    window = gpu.memory_window(0, 3 * GIB, True)
    assert gpu.memory_window(0, 3 * GIB, True) is window
    resmem = gpu.memory_window(3 * GIB, GIB, False)
    assert (resmem.fd, resmem.offset, resmem.length, resmem.cacheable) == (
        resmem.fd,
        0,
        GIB,
        False,
    )


def test_window_view_is_shared_with_the_file(gpu: SyntheticGpu, tmp_path: Path) -> None:
    window = gpu.memory_window(3 * GIB, GIB, False)
    window.view[0x1000:0x1004] = b"abcd"
    with open(tmp_path / "mem" / "resmem", "rb") as f:
        f.seek(0x1000)
        assert f.read(4) == b"abcd"
    os.pwrite(window.fd, b"wxyz", 0x2000)
    assert bytes(window.view[0x2000:0x2004]) == b"wxyz"


def test_bar1_region_is_mmappable_file(gpu: SyntheticGpu, tmp_path: Path) -> None:
    info = gpu.region_info(BAR2_REGION_INDEX)
    assert info.size == 64 << 20
    assert info.flags == RegionFlags.READ | RegionFlags.WRITE | RegionFlags.MMAP
    assert info.mmap is not None and info.sparse_areas == ()
    gpu.region_write(BAR2_REGION_INDEX, 0x10, b"bar1")
    assert os.pread(info.mmap.fd, 4, 0x10) == b"bar1"
    assert (tmp_path / "mem" / "bar1").stat().st_size == 64 << 20


def test_shutdown_closes_files(tmp_path: Path) -> None:
    before = open_fds()
    gpu = SyntheticGpu(get_profile("gh200"), tmp_path)
    gpu.memory_window(0, 95 * GIB, True).view[0] = 1
    gpu.memory_window(95 * GIB, GIB, False)
    gpu.region_info(BAR2_REGION_INDEX)
    assert len(open_fds() - before) >= 3  # plus the dup mmap keeps
    gpu.shutdown()
    assert open_fds() == before
