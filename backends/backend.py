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
§14) and mmap that fd for its ``view``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from backends.device import VfioDevice


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
    """An mmappable window of device memory: ``length`` bytes at ``offset`` of ``fd``.

    ``fd`` stays owned by the backend (the engine only sends duplicates of it to the VMM).
    ``view`` is a writable byte view of the same memory, created on first use so that a
    window nobody reads through costs no address space.
    """

    __slots__ = ("_mapper", "_view", "cacheable", "fd", "length", "offset")

    def __init__(
        self,
        fd: int,
        offset: int,
        length: int,
        *,
        cacheable: bool,
        mapper: Callable[[], memoryview],
    ) -> None:
        self.fd = fd
        self.offset = offset
        self.length = length
        self.cacheable = cacheable
        self._mapper = mapper
        self._view: memoryview | None = None

    @property
    def view(self) -> memoryview:
        """The window's bytes (``length`` long), mapped lazily."""
        if self._view is None:
            view = self._mapper()
            if len(view) != self.length:
                raise ValueError(f"window view has {len(view)} bytes, expected {self.length}")
            self._view = view
        return self._view

    @property
    def mapped(self) -> bool:
        """Whether :attr:`view` has been created."""
        return self._view is not None

    def release(self) -> None:
        """Drop this window's reference to the view (the backend unmaps on shutdown)."""
        if self._view is not None:
            self._view.release()
            self._view = None

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
        """The daemon is stopping: unmap and close backing. Memory contents persist."""
        ...
