"""The Backend trait: what the nvgrace variant needs from a raw device.

A backend is the raw GPU as vfio-pci-core sees it in the kernel: its real BARs, its config
space (region 7), its interrupts. On top of :class:`~backends.device.VfioDevice` the variant
needs two things the kernel gets from elsewhere:

* where the coherent device memory is -- on a real host the ACPI ``_DSD`` properties
  ``nvidia,gpu-mem-base-pa`` / ``nvidia,gpu-mem-size`` (spec nvgrace-gpu.md §2.1);
* something to mmap for a window of that memory, with the right cacheability -- the kernel
  maps ``memphys + offset`` write-back for usemem and write-combine for resmem (spec
  nvgrace-gpu.md §6.1, §10). A vfio-user daemon hands QEMU an fd + offset instead.

The synthetic backend backs windows with sparse shared-memory files; a future /dev/vfio
backend can hand out the host vfio device fd at the host region's offset (spec nvgrace-gpu.md
§14), which serves ``pread``/``pwrite`` as well as mmap.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from backends.device import DeviceError, VfioDevice


@dataclass(frozen=True, slots=True)
class DeviceMemory:
    """The coherent device memory as firmware describes it (spec nvgrace-gpu.md §2.1).

    ``memphys`` is the system physical base address, ``memlength`` the size in bytes.
    """

    memphys: int
    memlength: int

    def __post_init__(self) -> None:
        if self.memphys < 0 or self.memlength < 0:
            raise ValueError(f"negative device memory {self.memphys:#x}+{self.memlength:#x}")


class MemoryWindow:
    """A window of device memory: ``length`` bytes at ``offset`` of ``fd``.

    ``fd`` stays owned by the backend (the engine only sends duplicates of it to the VMM,
    which mmaps them). The daemon itself reads and writes the window with ``pread``/``pwrite``
    and never through a mapping of its own: the VMM holds a writable duplicate of ``fd`` and
    can truncate the file under us, and a full disk cannot back a page. Through a mapping
    either would be a SIGBUS that kills the daemon and every device it serves; through the
    fd it is a short read or an errno, which costs the one access an error reply
    (docs/security.md).

    ``restore`` is the backend's repair for a window found shorter than it should be (it
    restores the size; the lost contents read as zeros).
    """

    __slots__ = ("_restore", "cacheable", "fd", "length", "offset")

    def __init__(
        self,
        fd: int,
        offset: int,
        length: int,
        *,
        cacheable: bool,
        restore: Callable[[], object] | None = None,
    ) -> None:
        self.fd = fd
        self.offset = offset
        self.length = length
        self.cacheable = cacheable
        self._restore = restore

    def read(self, start: int, count: int) -> bytes:
        """``count`` bytes at ``start`` of the window.

        Raises :class:`DeviceError`: EINVAL outside the window, EIO when the backing ends
        early (then restored, see the class docstring), or the errno of a failed read.
        """
        self._check(start, count)
        data = self._pread(count, start)
        while len(data) < count:  # regular files and device fds come up short only at EOF
            more = self._pread(count - len(data), start + len(data))
            if not more:
                self._shrunk(start + len(data))
            data += more
        return data

    def write(self, start: int, data: bytes) -> None:
        """Store ``data`` at ``start`` of the window (errors as :meth:`read`)."""
        self._check(start, len(data))
        done = 0
        while done < len(data):
            try:
                done += os.pwrite(self.fd, data[done:], self.offset + start + done)
            except OSError as exc:
                raise DeviceError(exc.errno or errno.EIO, f"device memory write: {exc}") from exc

    def _check(self, start: int, count: int) -> None:
        if start < 0 or count < 0 or start + count > self.length:
            raise DeviceError(
                errno.EINVAL,
                f"access [{start:#x}, +{count:#x}) outside the window of {self.length:#x} bytes",
            )

    def _pread(self, count: int, start: int) -> bytes:
        try:
            return os.pread(self.fd, count, self.offset + start)
        except OSError as exc:
            raise DeviceError(exc.errno or errno.EIO, f"device memory read: {exc}") from exc

    def _shrunk(self, at: int) -> None:
        if self._restore is not None:
            self._restore()
        raise DeviceError(
            errno.EIO,
            f"device memory ends at window offset {at:#x} of {self.length:#x}: its backing "
            "was truncated by another holder of its fd"
            + ("; size restored, the lost part reads as zeros" if self._restore else ""),
        )

    def __repr__(self) -> str:
        kind = "cacheable" if self.cacheable else "non-cached"
        return (
            f"MemoryWindow(fd={self.fd}, offset={self.offset:#x}, length={self.length:#x}, {kind})"
        )


@runtime_checkable
class Backend(VfioDevice, Protocol):
    """A raw device under the variant (the kernel's vfio-pci-core + firmware facts).

    Config space is region 7 (:data:`backends.device.CONFIG_REGION_INDEX`) of the device
    itself; the BAR0 readiness registers are region 0.
    """

    def device_memory(self) -> DeviceMemory | None:
        """The coherent memory, or ``None`` when firmware reports none.

        ``None`` makes the daemon serve the backend as it is (the kernel's fallback to plain
        vfio-pci-core ops, spec nvgrace-gpu.md §8).
        """
        ...

    def memory_window(self, start: int, length: int, cacheable: bool) -> MemoryWindow:
        """Mmappable backing for device memory ``[start, start+length)``.

        ``start`` is an offset from :attr:`DeviceMemory.memphys`. ``cacheable`` selects the
        memory attribute: write-back for usemem, non-cached (write-combine) for resmem (spec
        nvgrace-gpu.md §6.1). Asking twice for the same window returns the same object.
        Raises :class:`backends.device.DeviceError` (EINVAL) for a window outside device
        memory or one the backend cannot provide.
        """
        ...

    def shutdown(self) -> None:
        """The daemon is stopping: close the backing. Memory contents persist."""
        ...

    @property
    def reset_count(self) -> int:
        """Function resets the device has completed: :meth:`reset` and any the guest starts
        itself (an FLR written to config space). The variant re-arms its post-reset readiness
        gate when this changes, as the kernel's ``err_handler.reset_done`` callback does (spec
        nvgrace-gpu.md §7.4)."""
        ...
