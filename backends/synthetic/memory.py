"""Device memory of the synthetic GPU, in sparse shared-memory files.

Each window of device memory the variant asks for is one file in the backing directory,
named after its memory attribute: ``usemem`` (cacheable, the write-back stand-in) and
``resmem`` (non-cached, the write-combine stand-in) -- spec nvgrace-gpu.md §6.1, §10. The
GPU's real BAR1 (region 2 of the raw device) is a third file, ``bar1``.

Files are grown with ``ftruncate`` so they are sparse: a 144 GiB device costs no memory or
disk until the guest touches it. An existing file of the right size is reopened as is, never
truncated, so memory survives a daemon restart (DESIGN.md "Device memory and backing
files"). An existing file of another size is an error rather than silently resized, because
resizing would either lose the tail or hide a configuration mistake. An empty existing file
is treated as new (a creation that was interrupted before ``ftruncate``).

While the daemon runs, the VMM holds writable duplicates of the fds (it mmaps them) and can
resize a file. The daemon reads and writes through the fd, never a mapping of its own, so a
shrunk file costs an access an EIO instead of killing the daemon with SIGBUS; the file's size
is restored when an access finds it short and whenever a client attaches or leaves
(docs/security.md).

A device holds an exclusive lock (``flock``) on its backing directory while its files are
open, so two devices can never share memory: not through two spellings of one path
(``a/../m``, a symlink) in one config file, nor from two daemons. A live upgrade hands the
locked fd itself to the next process (``directory_lock``), so the directory stays locked
throughout: the lock belongs to the open file description, which the fd carries.
"""

from __future__ import annotations

import errno
import fcntl
import os
from dataclasses import dataclass
from pathlib import Path

import structlog

from backends.backend import MemoryWindow
from backends.device import DeviceError
from backends.trusted_dirs import untrusted_directory

_log = structlog.get_logger("vgpud")

USEMEM_FILE = "usemem"
RESMEM_FILE = "resmem"
BAR1_FILE = "bar1"


@dataclass(frozen=True, slots=True)
class Unbacked:
    """How much of a device's memory its filesystem has yet to provide, and what it has free.

    The files are sparse: a page costs the filesystem something only once written. What is
    not yet written can still be, by the guest through QEMU's mapping, and a page the
    filesystem then cannot provide is a SIGBUS that kills the VM (docs/operations.md).
    """

    filesystem: int  # st_dev of the backing directory: devices on one filesystem share ``free``
    directory: Path
    size: int
    free: int


class BackingFileError(Exception):
    """A backing file exists with the wrong size or cannot be created."""


class BackingFile:
    """One sparse shared-memory file, opened O_CLOEXEC.

    The daemon never maps it (see :class:`~backends.backend.MemoryWindow`); the VMM does,
    through the duplicates of :attr:`fd` it is given, and so can also resize it.
    """

    __slots__ = ("fd", "path", "size")

    def __init__(self, path: Path, size: int) -> None:
        if size <= 0:
            raise ValueError(f"backing file {path} needs a positive size, got {size}")
        self.path = path
        self.size = size
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            existing = os.fstat(fd).st_size
            _check_writable(fd, path, created=existing == 0)
            if existing == 0:
                try:
                    os.ftruncate(fd, size)
                except OSError as exc:
                    # Too large for the filesystem (EFBIG), or no room: the empty file is
                    # ours and of no use, and the message names it.
                    os.unlink(path)
                    raise BackingFileError(
                        f"cannot make backing file {path} {size} bytes: {exc.strerror}"
                    ) from exc
            elif existing != size:
                raise _another_size(path, existing, size)
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd

    def window(self, cacheable: bool) -> MemoryWindow:
        """The whole file as a window that repairs the file when it finds it short."""
        return MemoryWindow(self.fd, 0, self.size, cacheable=cacheable, restore=self.restore_size)

    def restore_size(self) -> bool:
        """Give the file back its size if someone holding its fd changed it; ``True`` if so.

        A shrunk file's lost tail comes back as zeros; a grown file loses what lies beyond the
        device's memory (never device memory). Either way the device is whole again, and a
        restarted daemon accepts the file instead of refusing it as another device's.
        """
        if self.fd < 0:
            return False
        try:
            found = os.fstat(self.fd).st_size
            if found == self.size:
                return False
            os.ftruncate(self.fd, self.size)
        except OSError as exc:
            # Reported, not raised: this runs while a client attaches or leaves, and the
            # accesses that meet the short file get their own EIO anyway.
            _log.error("cannot restore a device memory file", path=str(self.path), error=str(exc))
            return False
        _log.warning(
            "device memory file was resized behind vgpud's back; size restored",
            path=str(self.path),
            found=found,
            size=self.size,
            lost=max(0, self.size - found),
        )
        return True

    def close(self) -> None:
        """Close the file; it and its contents stay."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _check_writable(fd: int, path: Path, created: bool) -> None:
    """Refuse a file the daemon cannot write with ``pwrite``: it writes device memory that
    way for every REGION_WRITE to BAR2/BAR4 (a VMM that did not or could not mmap them,
    ``no_mmap``).

    A write of no bytes is the probe: the kernel refuses a file without write support
    (``FMODE_CAN_WRITE``) before it looks at the count, and writes nothing otherwise. The
    case met in practice is hugetlbfs, which has no ``write(2)`` at all: a device served from
    it started, then failed every guest write that did not go through QEMU's mapping (and a
    96 GiB mapping would need all its huge pages reserved up front).
    """
    try:
        os.pwrite(fd, b"", 0)
    except OSError as exc:
        if created:
            os.unlink(path)  # empty and ours: leave nothing behind
        raise BackingFileError(
            f"backing file {path} cannot be written with write(2) ({exc.strerror}; a "
            "hugetlbfs mount?): put backing_dir on tmpfs, or for huge pages on a tmpfs "
            "mounted with huge=within_size"
        ) from exc


def _another_size(path: Path, existing: int, size: int) -> BackingFileError:
    return BackingFileError(
        f"backing file {path} holds {existing} bytes but the device needs {size}; it "
        "belongs to a device of another size. Remove it (its contents are lost) or "
        "configure the original memory size."
    )


class MemoryBacking:
    """The windows of one device's memory, each a :class:`BackingFile`."""

    __slots__ = ("_files", "_lock_fd", "_windows", "directory", "memlength")

    def __init__(
        self, directory: Path, memlength: int, *, directory_lock: int | None = None
    ) -> None:
        """``directory_lock``: an fd of ``directory`` that holds its lock already (handed
        over by the previous process), owned from now on, closed if refused."""
        self.directory = directory
        self.memlength = memlength
        self._files: dict[str, BackingFile] = {}
        self._windows: dict[bool, tuple[int, MemoryWindow]] = {}
        self._lock_fd = -1
        if directory_lock is not None:
            self._adopt_lock(directory_lock)

    @property
    def directory_lock(self) -> int | None:
        """The fd holding the directory's lock (None while no file is open)."""
        return self._lock_fd if self._lock_fd >= 0 else None

    def file(self, name: str, size: int) -> BackingFile:
        """The backing file ``name`` (created on first request)."""
        backing = self._files.get(name)
        if backing is None:
            self._lock_directory()
            try:
                backing = BackingFile(self.directory / name, size)
            except BaseException:
                if not self._files:
                    self._unlock_directory()  # nothing of this device is open: as before
                raise
            self._files[name] = backing
        elif backing.size != size:
            raise BackingFileError(f"{name} already open with {backing.size} bytes, not {size}")
        return backing

    def check_existing(self, name: str, size: int) -> None:
        """Refuse at start-up a file ``name`` that exists with another size, rather than when
        a client first needs it (a config audit: every client was then cut off)."""
        try:
            existing = os.stat(self.directory / name, follow_symlinks=False).st_size
        except FileNotFoundError:
            return
        if existing not in (0, size):
            raise _another_size(self.directory / name, existing, size)

    def window(self, start: int, length: int, cacheable: bool) -> MemoryWindow:
        """The window ``[start, start+length)`` of device memory with one attribute.

        One window per attribute: a second request for a different range of the same
        attribute, or windows of different attributes that overlap, are refused -- the same
        bytes cannot live in two files.
        """
        if start < 0 or length <= 0 or start + length > self.memlength:
            raise DeviceError(
                errno.EINVAL,
                f"window [{start:#x}, +{length:#x}) outside device memory {self.memlength:#x}",
            )
        known = self._windows.get(cacheable)
        if known is not None:
            known_start, window = known
            if (known_start, window.length) != (start, length):
                raise DeviceError(
                    errno.EINVAL,
                    f"a {'cacheable' if cacheable else 'non-cached'} window already exists at "
                    f"[{known_start:#x}, +{window.length:#x})",
                )
            return window
        other = self._windows.get(not cacheable)
        if other is not None:
            other_start, other_window = other
            if start < other_start + other_window.length and other_start < start + length:
                raise DeviceError(errno.EINVAL, "cacheable and non-cached windows overlap")
        backing = self.file(USEMEM_FILE if cacheable else RESMEM_FILE, length)
        window = backing.window(cacheable)
        self._windows[cacheable] = (start, window)
        return window

    def unbacked(self) -> Unbacked | None:
        """The open files' pages not yet provided, next to the free space of their filesystem
        (what an unprivileged writer may still use: ``f_bavail``); None with no file open."""
        if self._lock_fd < 0:
            return None
        size = 0
        for backing in self._files.values():
            # st_blocks counts 512-byte units whatever the filesystem's block size.
            size += max(0, backing.size - os.fstat(backing.fd).st_blocks * 512)
        vfs = os.fstatvfs(self._lock_fd)
        return Unbacked(
            filesystem=os.fstat(self._lock_fd).st_dev,
            directory=self.directory,
            size=size,
            free=vfs.f_bavail * vfs.f_frsize,
        )

    def restore_sizes(self) -> list[str]:
        """:meth:`BackingFile.restore_size` for every open file; the names it repaired."""
        return [name for name, backing in self._files.items() if backing.restore_size()]

    def close(self) -> None:
        """Close every file; contents persist on disk."""
        self._windows.clear()
        for backing in self._files.values():
            backing.close()
        self._files.clear()
        self._unlock_directory()

    def _unlock_directory(self) -> None:
        if self._lock_fd >= 0:
            os.close(self._lock_fd)  # releases the lock
            self._lock_fd = -1

    def _adopt_lock(self, fd: int) -> None:
        try:
            held = os.fstat(fd)
            try:
                here = os.stat(self.directory)
            except OSError as exc:
                raise BackingFileError(
                    f"the lock handed over is not on backing directory {self.directory} "
                    f"({exc.strerror})"
                ) from None
            if (held.st_dev, held.st_ino) != (here.st_dev, here.st_ino):
                raise BackingFileError(
                    f"the lock handed over is not on backing directory {self.directory}"
                )
            # The open file description holds the lock already: this only confirms it.
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise BackingFileError(
                f"backing directory {self.directory} is locked by another process"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        self._lock_fd = fd

    def _lock_directory(self) -> None:
        if self._lock_fd >= 0:
            return
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        reason = untrusted_directory(self.directory)
        if reason is not None:
            raise BackingFileError(
                f"backing directory {self.directory} refused: {reason} "
                "(docs/security.md; choose another backing_dir or fix the owner/mode)"
            )
        fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            # A lock belongs to the open file description, so a second device of this very
            # process is refused as surely as another daemon.
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise BackingFileError(
                f"backing directory {self.directory} is in use by another device (of this "
                "daemon or another vgpud); each device needs a directory of its own"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        self._lock_fd = fd
