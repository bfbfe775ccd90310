"""The seam: one small synchronous device interface that every engine drives.

``VfioDevice`` is what vfio-pci-core's ``vfio_device_ops`` are in the kernel: the engine
(pure-Python trio server, or libvfio-user's C callbacks) turns vfio-user messages into these
calls and never sees anything device-specific. A Backend implements it for the raw device;
``vgpud.variant.NvgraceVariant`` implements it over a backend by overriding only what the
kernel's nvgrace-gpu variant overrides (spec nvgrace-gpu.md §3-§5).

Being synchronous is deliberate (DESIGN.md "Layers"): the same object is driven from a trio
task and from C callbacks. Nothing here may block for long; anything slow (readiness waits)
is surfaced as an errno the engine can reply with.

Errors: every method raises :class:`DeviceError` carrying a positive errno for a request the
device refuses. Any other exception is a bug in vgpud.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

# VFIO PCI region indexes (linux/vfio.h, spec vfio-user.md §4).
BAR0_REGION_INDEX = 0
BAR2_REGION_INDEX = 2
BAR4_REGION_INDEX = 4
ROM_REGION_INDEX = 6
CONFIG_REGION_INDEX = 7
VGA_REGION_INDEX = 8
NUM_PCI_REGIONS = 9

# VFIO PCI irq indexes.
INTX_IRQ_INDEX = 0
MSI_IRQ_INDEX = 1
MSIX_IRQ_INDEX = 2
ERR_IRQ_INDEX = 3
REQ_IRQ_INDEX = 4
NUM_PCI_IRQS = 5


class DeviceFlags(enum.IntFlag):
    """``vfio_device_info.flags``."""

    RESET = 1 << 0
    PCI = 1 << 1


class RegionFlags(enum.IntFlag):
    """``vfio_region_info.flags``."""

    READ = 1 << 0
    WRITE = 1 << 1
    MMAP = 1 << 2
    CAPS = 1 << 3


class IrqInfoFlags(enum.IntFlag):
    """``vfio_irq_info.flags``."""

    EVENTFD = 1 << 0
    MASKABLE = 1 << 1
    AUTOMASKED = 1 << 2
    NORESIZE = 1 << 3


class IrqAction(enum.Enum):
    """The action half of ``VFIO_IRQ_SET_ACTION_*``."""

    MASK = "mask"
    UNMASK = "unmask"
    TRIGGER = "trigger"


class DeviceError(Exception):
    """The device refuses a request; ``errno`` (positive) goes back to the VMM."""

    def __init__(self, errno: int, message: str) -> None:
        super().__init__(message)
        self.errno = errno
        self.message = message


@dataclass(frozen=True, slots=True)
class DeviceInfo:
    """``VFIO_DEVICE_GET_INFO`` (spec vfio-user.md §3.4)."""

    flags: DeviceFlags
    num_regions: int
    num_irqs: int


@dataclass(frozen=True, slots=True)
class SparseArea:
    """One mmappable window of a region, relative to the region start."""

    offset: int
    size: int


@dataclass(frozen=True, slots=True)
class MmapTarget:
    """What the VMM mmaps for a region: ``fd`` at ``offset``.

    The fd stays owned by the device; the engine sends a copy of it (SCM_RIGHTS duplicates)
    and must not close it.
    """

    fd: int
    offset: int


@dataclass(frozen=True, slots=True)
class RegionInfo:
    """``VFIO_DEVICE_GET_REGION_INFO`` for one index (spec vfio-user.md §3.5).

    ``size`` 0 means the region does not exist. When ``mmap`` is set, ``sparse_areas`` (if
    not empty) lists the only parts that may be mapped; an empty tuple with ``mmap`` set
    means the whole region is mappable.
    """

    index: int
    size: int
    flags: RegionFlags
    mmap: MmapTarget | None = None
    sparse_areas: tuple[SparseArea, ...] = ()
    # VFIO_REGION_INFO_CAP_TYPE (type, subtype) for device-specific regions (index >= 9).
    type_cap: tuple[int, int] | None = None
    msix_mappable: bool = False


@dataclass(frozen=True, slots=True)
class IrqInfo:
    """``VFIO_DEVICE_GET_IRQ_INFO`` for one index (spec vfio-user.md §3.7)."""

    index: int
    flags: IrqInfoFlags
    count: int


@dataclass(frozen=True, slots=True)
class DmaRegion:
    """A client DMA mapping the device is told about (the engine owns fd and mapping).

    ``memory`` is a writable view of the mapped guest memory when the client passed an fd,
    ``None`` for fd-less maps (reachable only through message DMA).
    """

    iova: int
    size: int
    readable: bool
    writable: bool
    memory: memoryview | None = field(default=None, compare=False)


@runtime_checkable
class VfioDevice(Protocol):
    """The synchronous device interface (DESIGN.md "Layers"). See the module docstring."""

    def device_info(self) -> DeviceInfo:
        """Flags and region/irq counts."""
        ...

    def region_info(self, index: int) -> RegionInfo:
        """Size, flags, mmap target and sparse areas of region ``index``."""
        ...

    def region_read(self, index: int, offset: int, count: int) -> bytes:
        """Read ``count`` bytes at ``offset``; returns exactly ``count`` bytes."""
        ...

    def region_write(self, index: int, offset: int, data: bytes) -> None:
        """Write ``data`` at ``offset``. Writes to read-only registers are ignored."""
        ...

    def irq_info(self, index: int) -> IrqInfo:
        """Flags and vector count of irq ``index``."""
        ...

    def set_irqs(
        self,
        index: int,
        action: IrqAction,
        start: int,
        count: int,
        *,
        eventfds: Sequence[int] | None = None,
        data_bool: Sequence[bool] | None = None,
    ) -> None:
        """``VFIO_DEVICE_SET_IRQS``.

        Exactly one of: ``eventfds`` (DATA_EVENTFD; ``-1`` entries or an empty sequence
        de-assign), ``data_bool`` (DATA_BOOL), neither (DATA_NONE). Ownership of every fd in
        ``eventfds`` passes to the device, which closes it when it is replaced, de-assigned,
        disabled or on :meth:`close` -- also when this call raises.
        """
        ...

    def dma_map(self, region: DmaRegion) -> None:
        """The client mapped ``region``; the engine has already validated it."""
        ...

    def dma_unmap(self, iova: int, size: int) -> None:
        """The client unmapped a region previously passed to :meth:`dma_map`."""
        ...

    def reset(self) -> None:
        """``VFIO_DEVICE_RESET``: device reset, device memory kept."""
        ...

    def open(self) -> None:
        """A client attached (the kernel's ``open_device``)."""
        ...

    def close(self) -> None:
        """The client went away: release every eventfd; device state and memory stay."""
        ...


@runtime_checkable
class WatchesFds(Protocol):
    """Optional part of a device: eventfds the VMM signals to it (INTx resample).

    A synchronous device cannot wait on them, so the engine does: it waits for any fd in
    :meth:`watched_fds` to become readable and calls :meth:`fd_readable`. The set changes
    only inside ``set_irqs``, ``reset`` and ``close``; the engine re-reads it after each.
    """

    def watched_fds(self) -> Sequence[int]:
        """The fds to wait on now (owned by the device)."""
        ...

    def fd_readable(self, fd: int) -> None:
        """``fd`` became readable: consume the signal and act on it."""
        ...


@dataclass(frozen=True, slots=True)
class ConfigView:
    """Config space as a read returns it, in memory the device keeps current: ``data``
    (the region's size) is what ``region_read(CONFIG_REGION_INDEX, ...)`` gives, except in
    the ``computed`` ranges (offset, length), whose bytes are worked out at read time (a
    clock, an emulated register) and must be read through ``region_read``."""

    data: bytearray
    computed: tuple[tuple[int, int], ...] = ()


@runtime_checkable
class ExposesConfig(Protocol):
    """Optional part of a device: its config space can be read straight from memory
    (:class:`ConfigView`), so the engine may answer config reads without calling it
    (vgpud/server/fast_reads.py). For that the device promises that such reads have no
    side effects, that ``data`` changes only inside its own methods (never in another
    thread), and that it is never resized."""

    def config_view(self) -> ConfigView | None:
        """The view, or None while config reads must go through ``region_read``."""
        ...


@runtime_checkable
class HandsOver(Protocol):
    """Optional part of a device: its state can be carried into another process, for a live
    upgrade of the daemon (vgpud/upgrade.py) that the VM attached to it must not notice.

    :meth:`handover` describes the state as JSON-able data, with the fds it holds (the
    client's eventfds; a passthrough device's VFIO fds) named by number: the daemon keeps
    them open across ``exec``, where they keep their numbers. In the next process
    :meth:`take_over` is called on a device made afresh from the same settings, before any
    client, and takes those fds over (a passthrough device is made *from* the state
    instead: its VFIO group can be open only once). What the client mapped (DMA) is not part
    of it: the engine maps it again and tells the device with ``dma_map``.

    Between :meth:`handover` and the exec nothing else is asked of the device; if the exec
    does not happen, :meth:`handover_abandoned` gives back what :meth:`handover` let go of.
    """

    def handover_refusal(self) -> str | None:
        """Why the device cannot be handed over now (for the log), or None."""
        ...

    def stand_in_refusal(self) -> str | None:
        """Why a fork of the daemon cannot serve the device while the next process starts
        (the upgrade's stand-in), or None: then the fork's copy of the device state, as it
        stands when the next process asks for it, is what gets handed over."""
        ...

    def handover(self) -> tuple[dict[str, Any], list[int]]:
        """The device's state, and the fds it names (still the device's). It may let go of
        what the exec takes away (a passthrough device: its DMA mappings' addresses)."""
        ...

    def handover_abandoned(self) -> None:
        """The exec did not happen: serve on as before :meth:`handover` (safe to call when
        it did not run)."""
        ...

    def take_over(self, state: Mapping[str, Any]) -> None:
        """Carry on from ``state`` (:meth:`handover`'s, in the previous process); raises
        ValueError, KeyError or TypeError for a state it cannot take, having taken none of
        its fds."""
        ...
