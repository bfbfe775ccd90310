"""Device memory in sparse backing files: creation, persistence, windows."""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from backends.backend import MemoryWindow
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
    usemem.write(5 * GIB, b"\x42")  # touch one page
    elapsed = time.monotonic() - start
    assert elapsed < 0.5
    st = os.stat(tmp_path / "usemem")
    assert st.st_size == 143 * GIB
    assert st.st_blocks * 512 <= 1 << 20
    assert resmem.read(0, 4096) == bytes(4096)  # a hole reads as zeros and stays a hole
    assert os.stat(tmp_path / "resmem").st_blocks == 0
    gpu.shutdown()


def test_contents_survive_recreation(tmp_path: Path) -> None:
    profile = get_profile("gh200").with_overrides(memory_size=2 * GIB)
    gpu = SyntheticGpu(profile, tmp_path)
    gpu.memory_window(0, GIB, True).write(100, b"keep")
    gpu.shutdown()
    again = SyntheticGpu(profile, tmp_path)
    assert again.memory_window(0, GIB, True).read(100, 4) == b"keep"
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


def test_window_is_coherent_with_a_mapping_of_its_fd(gpu: SyntheticGpu, tmp_path: Path) -> None:
    window = gpu.memory_window(3 * GIB, GIB, False)
    window.write(0x1000, b"abcd")
    with open(tmp_path / "mem" / "resmem", "rb") as f:
        f.seek(0x1000)
        assert f.read(4) == b"abcd"
    # What QEMU does with the fd it is given: map it shared and store through the mapping.
    with mmap.mmap(window.fd, 0x3000, mmap.MAP_SHARED) as vmm:
        vmm[0x2000:0x2004] = b"wxyz"
        assert window.read(0x2000, 4) == b"wxyz"
        window.write(0x2004, b"1234")
        assert vmm[0x2004:0x2008] == b"1234"


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
    gpu.memory_window(0, 95 * GIB, True).write(0, b"\1")
    gpu.memory_window(95 * GIB, GIB, False)
    gpu.region_info(BAR2_REGION_INDEX)
    assert len(open_fds() - before) == 4  # usemem, resmem, bar1 and the directory's lock
    gpu.shutdown()
    assert open_fds() == before


@pytest.mark.parametrize(
    ("start", "count"), [(-1, 4), (0, -1), (GIB - 2, 4), (GIB, 1), (1 << 64, 4)]
)
def test_access_outside_the_window_is_refused(gpu: SyntheticGpu, start: int, count: int) -> None:
    window = gpu.memory_window(3 * GIB, GIB, False)
    accesses: list[Callable[[], object]] = [lambda: window.read(start, count)]
    if count >= 0:
        accesses.append(lambda: window.write(start, b"x" * count))
    for access in accesses:
        with pytest.raises(DeviceError) as err:
            access()
        assert err.value.errno == errno.EINVAL


def test_truncated_file_is_an_error_then_restored(gpu: SyntheticGpu, tmp_path: Path) -> None:
    """What a VMM holding the fd can do: the access fails (no SIGBUS: no mapping), the size
    comes back, and the part that was cut off reads as zeros."""
    window = gpu.memory_window(0, 3 * GIB, True)
    window.write(0x1000, b"kept")
    window.write(0x5000, b"lost")
    os.ftruncate(window.fd, 0x2000)
    with pytest.raises(DeviceError) as err:
        window.read(0x4FFE, 8)
    assert err.value.errno == errno.EIO and "truncated" in str(err.value)
    assert os.fstat(window.fd).st_size == 3 * GIB
    assert window.read(0x1000, 4) == b"kept"
    assert window.read(0x5000, 4) == bytes(4)


@pytest.mark.parametrize("size", [0, 4096, 4 * GIB])
def test_client_attach_and_detach_restore_the_file_size(gpu: SyntheticGpu, size: int) -> None:
    window = gpu.memory_window(0, 3 * GIB, True)
    for hook in (gpu.open, gpu.close):
        os.ftruncate(window.fd, size)
        hook()
        assert os.fstat(window.fd).st_size == 3 * GIB


def test_restored_file_is_accepted_by_a_restarted_daemon(tmp_path: Path) -> None:
    profile = get_profile("gh200").with_overrides(memory_size=2 * GIB)
    gpu = SyntheticGpu(profile, tmp_path)
    window = gpu.memory_window(0, GIB, True)
    window.write(0, b"data")
    os.ftruncate(window.fd, 3 * GIB)  # grown: next start would refuse the file
    gpu.close()
    gpu.shutdown()
    again = SyntheticGpu(profile, tmp_path)
    assert again.memory_window(0, GIB, True).read(0, 4) == b"data"
    again.shutdown()


def test_io_errors_become_device_errors(tmp_path: Path) -> None:
    read_end, write_end = os.pipe()
    try:
        window = MemoryWindow(read_end, 0, 4096, cacheable=True)
        for access in (lambda: window.read(0, 4), lambda: window.write(0, b"x")):
            with pytest.raises(DeviceError) as err:
                access()
            assert err.value.errno == errno.ESPIPE  # the errno of the failed pread/pwrite
    finally:
        os.close(read_end)
        os.close(write_end)


def test_a_file_that_cannot_be_restored_still_costs_only_the_access(
    gpu: SyntheticGpu, monkeypatch: pytest.MonkeyPatch
) -> None:
    window = gpu.memory_window(0, 3 * GIB, True)
    os.ftruncate(window.fd, 0x1000)

    def refuse(fd: int, size: int) -> None:
        raise PermissionError(errno.EPERM, "sealed")

    monkeypatch.setattr("backends.synthetic.memory.os.ftruncate", refuse)
    gpu.open()  # reports, does not raise: a client is attaching
    with pytest.raises(DeviceError) as err:
        window.read(0x2000, 4)
    assert err.value.errno == errno.EIO
    gpu.close()
    assert os.fstat(window.fd).st_size == 0x1000


@pytest.mark.parametrize("alias", ["dotdot", "symlink"])
def test_two_devices_never_share_a_backing_directory(tmp_path: Path, alias: str) -> None:
    """Two spellings of one directory (found in an audit: both devices served, on the same
    files) are one directory: the second device is refused until the first lets go."""
    memory = tmp_path / "m"
    if alias == "dotdot":
        (tmp_path / "q").mkdir()
        other = tmp_path / "q" / ".." / "m"
    else:
        memory.mkdir()
        other = tmp_path / "link"
        other.symlink_to(memory)
    first = SyntheticGpu(get_profile("gh200"), memory)
    first.memory_window(0, GIB, True)
    second = SyntheticGpu(get_profile("gh200"), other)
    before = open_fds()
    with pytest.raises(BackingFileError, match="in use by another device"):
        second.memory_window(0, GIB, True)
    assert open_fds() == before
    first.shutdown()
    second.memory_window(0, GIB, True)  # free now
    second.shutdown()


def test_the_locked_directory_is_handed_to_the_next_device_while_the_first_holds_it(
    tmp_path: Path,
) -> None:
    """A live upgrade's stand-in still holds the lock when the next process builds the
    device (it exits after handing over): the lock travels as the fd itself, so the next
    device carries on under it, and the directory is never free meanwhile."""
    before = open_fds()
    first = SyntheticGpu(get_profile("gh200"), tmp_path)
    first.memory_window(0, GIB, True).write(0, b"kept")
    state, fds = first.handover()
    lock = state["directory_lock"]
    assert lock in fds
    handed = os.dup(lock)  # what SCM_RIGHTS gives the next process: the same lock
    second = SyntheticGpu(get_profile("gh200"), tmp_path, directory_lock=handed)
    assert second.memory_window(0, GIB, True).read(0, 4) == b"kept"
    first.shutdown()  # the stand-in exits
    other = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    with pytest.raises(BlockingIOError):  # still locked
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.close(other)
    assert second.handover()[0]["directory_lock"] == handed
    second.shutdown()
    assert open_fds() == before


def test_a_handed_lock_on_another_directory_is_refused_and_closed(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    before = open_fds()
    wrong = os.open(tmp_path / "a", os.O_RDONLY | os.O_DIRECTORY)
    also_wrong = os.dup(wrong)
    with pytest.raises(BackingFileError, match="not on backing directory"):
        SyntheticGpu(get_profile("gh200"), tmp_path / "b", directory_lock=wrong)
    with pytest.raises(BackingFileError, match=r"not on backing directory .*No such file"):
        SyntheticGpu(get_profile("gh200"), tmp_path / "c", directory_lock=also_wrong)
    assert open_fds() == before


def test_a_handed_fd_whose_directory_another_device_locked_is_refused(tmp_path: Path) -> None:
    """An fd of the right directory that does not hold the lock: the holder keeps it."""
    holder = SyntheticGpu(get_profile("gh200"), tmp_path)
    holder.memory_window(0, GIB, True)
    unlocked = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    with pytest.raises(BackingFileError, match="locked by another process"):
        SyntheticGpu(get_profile("gh200"), tmp_path, directory_lock=unlocked)
    with pytest.raises(OSError):  # closed
        os.fstat(unlocked)
    holder.shutdown()


def test_a_bar1_file_of_another_size_is_refused_when_the_device_is_made(tmp_path: Path) -> None:
    (tmp_path / "bar1").write_bytes(b"x" * 4096)
    with pytest.raises(BackingFileError, match="bar1 holds 4096 bytes"):
        SyntheticGpu(get_profile("gb200"), tmp_path)
    assert (tmp_path / "bar1").read_bytes() == b"x" * 4096  # untouched


@pytest.fixture
def hugetlbfs(tmp_path: Path) -> Iterator[Path]:
    """A hugetlbfs mount of its own (needs root); unmounted afterwards."""
    mount_point = tmp_path / "hugetlbfs"
    mount_point.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "hugetlbfs", "-o", "pagesize=2M", "none", str(mount_point)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount hugetlbfs here (needs root): {mounted.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", str(mount_point)], check=True)


def test_a_backing_dir_on_hugetlbfs_is_refused_and_left_empty(hugetlbfs: Path) -> None:
    """hugetlbfs has no write(2): a device on it used to start and then fail every
    REGION_WRITE to its memory with EINVAL."""
    gpu = SyntheticGpu(get_profile("gb200").with_overrides(memory_size=GIB), hugetlbfs / "gpu0")
    before = open_fds()
    try:
        with pytest.raises(BackingFileError, match=r"cannot be written with write\(2\).*huge="):
            gpu.memory_window(0, GIB, True)
        assert open_fds() == before
    finally:
        gpu.shutdown()
    assert list((hugetlbfs / "gpu0").iterdir()) == []


def test_unbacked_memory_is_what_the_guest_has_not_written(tmp_path: Path) -> None:
    gpu = SyntheticGpu(get_profile("gh200").with_overrides(memory_size=4 * GIB), tmp_path)
    assert gpu.unbacked_memory() is None  # no window asked for yet: no file open
    usemem = gpu.memory_window(0, 3 * GIB, True)
    gpu.memory_window(3 * GIB, GIB, False)
    unbacked = gpu.unbacked_memory()
    assert unbacked is not None
    assert (unbacked.size, unbacked.directory) == (4 * GIB, tmp_path)
    assert unbacked.filesystem == os.stat(tmp_path).st_dev
    vfs = os.statvfs(tmp_path)
    assert 0 < unbacked.free <= vfs.f_blocks * vfs.f_frsize
    usemem.write(GIB, b"\x01" * (1 << 20))
    allocated = os.stat(tmp_path / "usemem").st_blocks * 512
    assert allocated >= 1 << 20
    after = gpu.unbacked_memory()
    assert after is not None
    assert after.size == 4 * GIB - allocated
    gpu.shutdown()
    assert gpu.unbacked_memory() is None
