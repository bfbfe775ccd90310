"""A real PCI device opened through ``/dev/vfio``: the passthrough backend.

The host kernel's VFIO driver owns the device (bound to ``vfio-pci``, or to
``nvgrace-gpu-vfio-pci`` on a Grace host); this backend forwards every ``VfioDevice`` call to
the matching VFIO ioctl or to ``pread``/``pwrite`` on the device fd, and hands the VMM that
same fd at each region's offset to mmap (spec nvgrace-gpu.md §14: only a kernel-backed fd
gives the mapping the right memory attributes).

What it does not do: describe coherent device memory. A device bound to
``nvgrace-gpu-vfio-pci`` already presents the fake BAR2/BAR4 (the kernel ran the variant), so
:meth:`device_memory` is ``None`` and the daemon serves the device as it is (spec
nvgrace-gpu.md §8). Plain ``vfio-pci`` does not expose the coherent memory at all, and a
``/dev/mem`` mapping of it would have the wrong attributes (§14), so running the variant in
userspace over real hardware is not offered.

Access path: the legacy group/container interface with the type1 IOMMU (``/dev/vfio/<group>``
plus ``/dev/vfio/vfio``), which every kernel with VFIO has. DMA: each client mapping with an
fd (its guest RAM) is mapped into the IOMMU at the client's IOVA with
``VFIO_IOMMU_MAP_DMA``; the kernel pins those pages, so the daemon needs ``RLIMIT_MEMLOCK``
(or ``CAP_IPC_LOCK``) for the guest's RAM, as QEMU does for plain VFIO. A mapping without an
fd cannot be put in the IOMMU; the device simply cannot reach it (it faults there, as on
hardware). Interrupts: the VMM's eventfds go straight to the kernel (``VFIO_DEVICE_SET_IRQS``),
which signals them itself; the daemon is not on the interrupt path.
"""

from __future__ import annotations

import errno
import fcntl
import functools
import os
import re
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cffi  # type: ignore[import-untyped]

from backends.backend import DeviceMemory, MemoryWindow
from backends.device import (
    CONFIG_REGION_INDEX,
    NUM_PCI_REGIONS,
    DeviceError,
    DeviceFlags,
    DeviceInfo,
    DmaRegion,
    IrqAction,
    IrqInfo,
    IrqInfoFlags,
    MmapTarget,
    RegionFlags,
    RegionInfo,
    SparseArea,
)
from backends.irq import EventfdTable, adopt_eventfds, close_fds, validate_set_irqs
from backends.vfio import uapi

SYSFS_PCI_DEVICES = Path("/sys/bus/pci/devices")
DEV_VFIO = Path("/dev/vfio")
_PCI_ADDRESS = re.compile(r"(?:([0-9a-fA-F]{4}):)?([0-9a-fA-F]{2}):([0-9a-fA-F]{2})\.([0-7])")
# The config space's command register and its bus-master bit (PCI Local Bus spec).
_PCI_COMMAND = 0x04
_PCI_COMMAND_MASTER = 0x4
_ACTION_FLAGS = {
    IrqAction.MASK: uapi.VFIO_IRQ_SET_ACTION_MASK,
    IrqAction.UNMASK: uapi.VFIO_IRQ_SET_ACTION_UNMASK,
    IrqAction.TRIGGER: uapi.VFIO_IRQ_SET_ACTION_TRIGGER,
}


@functools.cache
def _ffi() -> Any:
    """Only to learn the address of the client's guest RAM that the engine mmapped (MAP_DMA
    takes a virtual address); cffi accepts read-only buffers too, which ctypes does not.
    Made on first use: an FFI loads cffi's C parser, about 15 ms of every start and every
    live upgrade's stall (benchmarks.upgrade), and only a passthrough device needs it."""
    return cffi.FFI()


def normalize_pci_address(address: str) -> str:
    """``01:00.0`` or ``0000:01:00.0`` → ``0000:01:00.0``; ValueError for anything else."""
    match = _PCI_ADDRESS.fullmatch(address.strip())
    if match is None:
        raise ValueError(f"{address!r} is not a PCI address (DDDD:BB:DD.F)")
    domain, bus, slot, function = match.groups()
    return f"{(domain or '0000').lower()}:{bus.lower()}:{slot.lower()}.{function}"


def iommu_group(address: str, sysfs: Path = SYSFS_PCI_DEVICES) -> int:
    """The IOMMU group of a PCI device, from sysfs; DeviceError(ENODEV) with the fix."""
    device = sysfs / address
    if not device.exists():
        raise DeviceError(errno.ENODEV, f"no PCI device {address} (looked in {sysfs})")
    try:
        group = os.readlink(device / "iommu_group")
    except FileNotFoundError:
        raise DeviceError(
            errno.ENODEV,
            f"PCI device {address} has no IOMMU group: enable the IOMMU (e.g. intel_iommu=on)",
        ) from None
    return int(Path(group).name)


# Resource flags in sysfs "resource" lines (include/linux/ioport.h).
IORESOURCE_IO = 0x100
IORESOURCE_PREFETCH = 0x2000


def sysfs_bars(address: str, sysfs: Path = SYSFS_PCI_DEVICES) -> list[tuple[int, int]]:
    """(size, resource flags) of BARs 0-5 from the device's sysfs ``resource`` file; an unused
    BAR is (0, 0)."""
    try:
        lines = (sysfs / address / "resource").read_text().splitlines()
    except OSError as exc:
        raise ValueError(f"PCI device {address}: cannot read its BARs: {exc.strerror}") from None
    bars = []
    for line in lines[:6]:
        start, end, flags = (int(field, 16) for field in line.split())
        bars.append((end - start + 1, flags) if end else (0, 0))
    return bars


def sysfs_bar_sizes(address: str, sysfs: Path = SYSFS_PCI_DEVICES) -> list[int]:
    """Sizes of BARs 0-5 from the device's sysfs ``resource`` file (0 for an unused BAR)."""
    return [size for size, _flags in sysfs_bars(address, sysfs)]


def sysfs_ids(address: str, sysfs: Path = SYSFS_PCI_DEVICES) -> tuple[int, int]:
    """(vendor ID, device ID) from the device's sysfs ``vendor`` and ``device`` files."""
    try:
        return (
            int((sysfs / address / "vendor").read_text(), 16),
            int((sysfs / address / "device").read_text(), 16),
        )
    except (OSError, ValueError) as exc:
        raise ValueError(f"PCI device {address}: cannot read its IDs: {exc}") from None


def bound_driver(address: str, sysfs: Path = SYSFS_PCI_DEVICES) -> str | None:
    """The driver a PCI device is bound to, or None."""
    try:
        return Path(os.readlink(sysfs / address / "driver")).name
    except OSError:
        return None


@dataclass
class _IommuMap:
    """A client's mapping in the IOMMU. ``vaddr`` is where this process has its memory; None
    while the kernel holds the mapping without one (invalidated for a live upgrade: the
    address it had is ``released``, or, in the next process, not mapped here yet)."""

    size: int
    vaddr: int | None
    released: int | None = None


class VfioPciDevice:
    """A host PCI device behind VFIO, as a :class:`backends.backend.Backend`."""

    def __init__(
        self,
        address: str,
        *,
        sysfs: Path = SYSFS_PCI_DEVICES,
        dev_vfio: Path = DEV_VFIO,
        handed: Mapping[str, Any] | None = None,
    ) -> None:
        """Open the device through ``dev_vfio``; or, with ``handed`` (:meth:`handover`'s
        state, from the process before a live upgrade), carry on with the VFIO fds it names:
        a group is open only once, so the next process cannot open it again."""
        self.address = normalize_pci_address(address)
        self.group = iommu_group(self.address, sysfs)
        self.driver = bound_driver(self.address, sysfs)
        self._fds: list[int] = []  # container, group, device: closed in reverse
        self._regions: dict[int, uapi.RawRegionInfo] = {}
        self._irq_counts: dict[int, int] = {}
        # (irq index, action) -> that index's eventfds for that action (trigger, or INTx
        # unmask); we keep our copies so an fd stays valid for the kernel's virqfd even if
        # the VMM closes its own (see set_irqs).
        self._eventfds: dict[tuple[int, IrqAction], EventfdTable] = {}
        self._iommu_maps: dict[int, _IommuMap] = {}  # by iova, in the IOMMU
        # The resets asked of the kernel. An FLR the guest writes to config space happens in
        # the kernel, whose own variant driver (if bound) gates on it; vgpud's variant never
        # runs over this backend (device_memory() is None).
        self.reset_count = 0
        try:
            if handed is None:
                self._container = self._open(dev_vfio / "vfio", "the VFIO container")
                self._group = self._open(dev_vfio / str(self.group), f"IOMMU group {self.group}")
                self._attach()
                self._device = self._ioctl(
                    self._group,
                    uapi.VFIO_GROUP_GET_DEVICE_FD,
                    self.address.encode() + b"\0",
                    "get the device fd",
                )
                self._fds.append(self._device)
            else:
                self.take_over(handed)
            self._info = self._device_info()
        except BaseException:
            self._drop_all_eventfds()
            self._close_fds()
            raise

    # -- opening ---------------------------------------------------------------------------

    def _open(self, path: Path, what: str) -> int:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            hint = ": load the VFIO modules (modprobe vfio-pci)"
            if path.name != "vfio":
                hint = (
                    f": bind {self.address} to vfio-pci first (driver now: "
                    f"{self.driver or 'none'}), e.g. echo vfio-pci > "
                    f"/sys/bus/pci/devices/{self.address}/driver_override; echo "
                    f"{self.address} > /sys/bus/pci/drivers_probe"
                )
            raise DeviceError(errno.ENODEV, f"cannot open {what} {path}{hint}") from None
        except OSError as exc:
            raise DeviceError(
                exc.errno or errno.EIO, f"cannot open {what} {path}: {exc.strerror}"
            ) from None
        self._fds.append(fd)
        return fd

    def _attach(self) -> None:
        version = self._ioctl(self._container, uapi.VFIO_GET_API_VERSION, 0, "get the API version")
        if version != uapi.VFIO_API_VERSION:
            raise DeviceError(errno.ENOTSUP, f"VFIO API version {version}, expected 0")
        if not self._ioctl(
            self._container, uapi.VFIO_CHECK_EXTENSION, uapi.VFIO_TYPE1v2_IOMMU, "check type1v2"
        ):
            raise DeviceError(errno.ENOTSUP, "the kernel's VFIO has no type1v2 IOMMU")
        status = bytearray(uapi.GROUP_STATUS.pack(uapi.GROUP_STATUS.size, 0))
        self._ioctl(self._group, uapi.VFIO_GROUP_GET_STATUS, status, "get the group status")
        flags = uapi.GROUP_STATUS.unpack(status)[1]
        if not flags & uapi.VFIO_GROUP_FLAGS_VIABLE:
            raise DeviceError(
                errno.EBUSY,
                f"IOMMU group {self.group} is not viable: bind every device in "
                f"/sys/kernel/iommu_groups/{self.group}/devices to vfio-pci",
            )
        container = struct.pack("<i", self._container)
        self._ioctl(self._group, uapi.VFIO_GROUP_SET_CONTAINER, container, "set the container")
        try:
            self._ioctl(
                self._container,
                uapi.VFIO_SET_IOMMU,
                uapi.VFIO_TYPE1v2_IOMMU,
                "set the type1v2 IOMMU",
            )
        except DeviceError as exc:
            if exc.errno != errno.EPERM:
                raise
            # vfio_iommu_type1 refuses a platform without interrupt remapping.
            raise DeviceError(
                exc.errno,
                f"{exc.message} (the IOMMU has no interrupt remapping: enable it, or load "
                "vfio_iommu_type1 with allow_unsafe_interrupts=1)",
            ) from None

    def _device_info(self) -> DeviceInfo:
        buf = bytearray(uapi.DEVICE_INFO.pack(uapi.DEVICE_INFO.size, 0, 0, 0))
        self._ioctl(self._device, uapi.VFIO_DEVICE_GET_INFO, buf, "get the device info")
        _, flags, num_regions, num_irqs = uapi.DEVICE_INFO.unpack(buf)
        if not flags & uapi.VFIO_DEVICE_FLAGS_PCI:
            raise DeviceError(errno.ENODEV, f"{self.address} is not a VFIO PCI device")
        # Only RESET and PCI mean anything to a vfio-user client (spec vfio-user.md §3.4).
        served = DeviceFlags.PCI | (
            DeviceFlags.RESET if flags & uapi.VFIO_DEVICE_FLAGS_RESET else DeviceFlags(0)
        )
        return DeviceInfo(served, num_regions, num_irqs)

    def _ioctl(self, fd: int, request: int, arg: int | bytes | bytearray, what: str) -> int:
        try:
            if isinstance(arg, int):
                return int(fcntl.ioctl(fd, request, arg))
            # Always a mutable buffer: with bytes, fcntl.ioctl returns a copy of the buffer
            # instead of the ioctl's result (which is the device fd for GET_DEVICE_FD).
            buffer = arg if isinstance(arg, bytearray) else bytearray(arg)
            return int(fcntl.ioctl(fd, request, buffer, True))
        except OSError as exc:
            code = exc.errno or errno.EIO
            raise DeviceError(code, f"{self.address}: {what}: {os.strerror(code)}") from None

    # -- Backend ---------------------------------------------------------------------------

    def device_memory(self) -> DeviceMemory | None:
        """None: the device is served as the host's VFIO driver presents it (module doc)."""
        return None

    def memory_window(self, start: int, length: int, cacheable: bool) -> MemoryWindow:
        """Never asked for, as :meth:`device_memory` is None."""
        raise DeviceError(errno.EINVAL, "the vfio backend describes no coherent memory")

    def shutdown(self) -> None:
        """Release the client's state and close the device, group and container."""
        self.close()
        self._close_fds()

    def _close_fds(self) -> None:
        fds, self._fds = self._fds, []
        close_fds(reversed(fds))

    # -- VfioDevice ------------------------------------------------------------------------

    def device_info(self) -> DeviceInfo:
        """The kernel's flags (RESET, PCI) and counts."""
        return self._info

    def region_info(self, index: int) -> RegionInfo:
        """The kernel's region: size, flags, the device fd at its offset, sparse areas."""
        raw = self._region(index)
        flags = RegionFlags(
            raw.flags
            & (
                uapi.VFIO_REGION_INFO_FLAG_READ
                | uapi.VFIO_REGION_INFO_FLAG_WRITE
                | uapi.VFIO_REGION_INFO_FLAG_MMAP
            )
        )
        areas = tuple(SparseArea(o, s) for o, s in raw.sparse_areas or ())
        if raw.sparse_areas is not None and not areas:
            # A sparse-mmap capability listing no area: nothing may be mapped.
            flags &= ~RegionFlags.MMAP
        mmap = MmapTarget(self._device, raw.offset) if flags & RegionFlags.MMAP else None
        return RegionInfo(
            index,
            raw.size,
            flags,
            mmap,
            areas,
            type_cap=raw.type_cap,
            msix_mappable=raw.msix_mappable,
        )

    def region_read(self, index: int, offset: int, count: int) -> bytes:
        """``pread`` on the device fd; the kernel applies its own access rules."""
        raw = self._accessible(index, offset, count, uapi.VFIO_REGION_INFO_FLAG_READ)
        try:
            data = os.pread(self._device, count, raw.offset + offset)
        except OSError as exc:
            raise DeviceError(exc.errno or errno.EIO, f"region {index} read: {exc}") from None
        if len(data) != count:
            raise DeviceError(errno.EIO, f"region {index}: short read {len(data)} of {count}")
        return data

    def region_write(self, index: int, offset: int, data: bytes) -> None:
        """``pwrite`` on the device fd."""
        raw = self._accessible(index, offset, len(data), uapi.VFIO_REGION_INFO_FLAG_WRITE)
        try:
            done = os.pwrite(self._device, data, raw.offset + offset)
        except OSError as exc:
            raise DeviceError(exc.errno or errno.EIO, f"region {index} write: {exc}") from None
        if done != len(data):
            raise DeviceError(errno.EIO, f"region {index}: short write {done} of {len(data)}")

    def irq_info(self, index: int) -> IrqInfo:
        """``VFIO_DEVICE_GET_IRQ_INFO``."""
        if not 0 <= index < self._info.num_irqs:
            raise DeviceError(errno.EINVAL, f"irq index {index} out of range")
        buf = bytearray(uapi.IRQ_INFO.pack(uapi.IRQ_INFO.size, 0, index, 0))
        self._ioctl(self._device, uapi.VFIO_DEVICE_GET_IRQ_INFO, buf, f"get irq {index} info")
        _, flags, _, count = uapi.IRQ_INFO.unpack(buf)
        self._irq_counts[index] = count
        return IrqInfo(index, IrqInfoFlags(flags & 0xF), count)

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
        """``VFIO_DEVICE_SET_IRQS`` with the VMM's eventfds (owned here on every path).

        The kernel takes its own reference to each eventfd, but an INTx unmask eventfd is
        torn down by the kernel when its file is closed for good, so we keep our copies
        until they are replaced, de-assigned or the client leaves.
        """
        fds = list(eventfds) if eventfds is not None else []
        try:
            irq_count = self._irq_counts.get(index)
            if irq_count is None:
                irq_count = self.irq_info(index).count
            validate_set_irqs(
                index, action, start, count, irq_count, eventfds=eventfds, data_bool=data_bool
            )
            if eventfds is not None:
                adopt_eventfds(fds)
                if not fds:
                    fds = [-1] * count  # an empty list de-assigns the whole range
                flags = uapi.VFIO_IRQ_SET_DATA_EVENTFD
            elif data_bool is not None:
                flags = uapi.VFIO_IRQ_SET_DATA_BOOL
            else:
                flags = uapi.VFIO_IRQ_SET_DATA_NONE
            request = uapi.irq_set(
                index,
                flags | _ACTION_FLAGS[action],
                start,
                count,
                eventfds=fds,
                data_bool=data_bool or (),
            )
            self._ioctl(self._device, uapi.VFIO_DEVICE_SET_IRQS, request, f"set irq {index}")
        except BaseException:
            close_fds(fds)
            raise
        if eventfds is not None:
            table = self._eventfds.setdefault((index, action), EventfdTable(irq_count))
            table.assign(start, fds)
        elif count == 0:
            # DATA_NONE|TRIGGER with count 0 disabled the index, its unmask eventfd with it.
            self._drop_eventfds(index)

    def dma_map(self, region: DmaRegion) -> None:
        """Put the client's memory into the IOMMU at its IOVA (module docstring). A mapping
        handed over by the previous process is in the IOMMU already, without an address:
        it gets this process's (:meth:`handover`)."""
        if region.memory is None:
            return
        ffi = _ffi()
        with ffi.from_buffer(region.memory) as pointer:
            vaddr = int(ffi.cast("uintptr_t", pointer))
        handed = self._iommu_maps.get(region.iova)
        if handed is not None and handed.vaddr is None and handed.size == region.size:
            self._update_vaddr(region.iova, handed, vaddr)
            return
        flags = (uapi.VFIO_DMA_MAP_FLAG_READ if region.readable else 0) | (
            uapi.VFIO_DMA_MAP_FLAG_WRITE if region.writable else 0
        )
        what = f"IOMMU map [{region.iova:#x}, +{region.size:#x})"
        self._iommu_map(flags, vaddr, region.iova, region.size, what)
        self._iommu_maps[region.iova] = _IommuMap(region.size, vaddr)

    def dma_unmap(self, iova: int, size: int) -> None:
        """Remove a mapping from the IOMMU (a no-op for one that had no fd)."""
        mapped = self._iommu_maps.get(iova)
        if mapped is None or mapped.size != size:
            return
        del self._iommu_maps[iova]
        self._iommu_unmap(0, iova, size, f"IOMMU unmap {iova:#x}")

    def reset(self) -> None:
        """``VFIO_DEVICE_RESET`` (EINVAL-ish from the kernel when the device has none)."""
        self._ioctl(self._device, uapi.VFIO_DEVICE_RESET, 0, "reset")
        self.reset_count += 1

    def open(self) -> None:
        """Nothing to do: the device fd stays open between clients."""

    def close(self) -> None:
        """Stop the device's DMA, disable the client's interrupts and drop its IOMMU mappings;
        the device stays open, its state kept (spec vfio-user.md R19)."""
        self._stop_bus_master()
        for index in sorted({index for index, _ in self._eventfds}):
            disable = uapi.irq_set(
                index, uapi.VFIO_IRQ_SET_DATA_NONE | uapi.VFIO_IRQ_SET_ACTION_TRIGGER, 0, 0
            )
            try:
                self._ioctl(self._device, uapi.VFIO_DEVICE_SET_IRQS, disable, "disable irqs")
            except DeviceError:
                pass  # not enabled in the kernel (only masked or de-assigned): nothing to undo
            self._drop_eventfds(index)
        for iova, mapped in list(self._iommu_maps.items()):
            try:
                self.dma_unmap(iova, mapped.size)
            except DeviceError:
                pass  # the container is gone with the group; the kernel unpins on close

    def _stop_bus_master(self) -> None:
        """Clear the command register's bus-master bit, as the kernel's vfio-pci does first
        when the last user of a device goes (``vfio_pci_core_disable``: ``pci_clear_master``).

        The kernel would then reset the device; vgpud keeps the device fd open between
        clients, so it never does, and a device the last guest left running would go on
        with the DMA that guest programmed. Once that client's mappings are out of the
        IOMMU such DMA faults, until the next client maps its guest RAM at the same IOVAs
        (every q35 guest's RAM starts at the same addresses): then it lands in another VM's
        memory. Without bus mastering a PCI function issues no DMA (and no MSI); the next
        guest's driver sets the bit again when it takes the device, and nothing else of
        the device's state changes."""
        try:
            command = int.from_bytes(
                self.region_read(CONFIG_REGION_INDEX, _PCI_COMMAND, 2), "little"
            )
            if command & _PCI_COMMAND_MASTER:
                cleared = command & ~_PCI_COMMAND_MASTER
                self.region_write(CONFIG_REGION_INDEX, _PCI_COMMAND, cleared.to_bytes(2, "little"))
        except DeviceError:
            pass  # refused (the device gone, say): nothing more to do here; close the rest

    # -- HandsOver (a live upgrade, vgpud/upgrade.py) -------------------------------------

    def handover_refusal(self) -> str | None:
        """Why the device cannot be handed over: only where the kernel can give its DMA
        mappings the next process's addresses (VFIO_UPDATE_VADDR)."""
        try:
            updates = self._ioctl(
                self._container,
                uapi.VFIO_CHECK_EXTENSION,
                uapi.VFIO_UPDATE_VADDR,
                "check VFIO_UPDATE_VADDR",
            )
        except DeviceError as exc:
            return exc.message
        if not updates:
            return (
                f"{self.address}: the kernel's VFIO container cannot update DMA addresses "
                "(no VFIO_UPDATE_VADDR: an iommufd container, or a mediated device)"
            )
        return None

    def stand_in_refusal(self) -> str | None:
        """Always a reason: the kernel ties each DMA mapping's address to the process that
        made it, the daemon's pid, which the exec gives new memory while a fork would still
        be serving from the old; so the device waits frozen across the exec instead."""
        return (
            f"{self.address} is a passthrough device, whose DMA mappings the kernel ties to "
            "the daemon's own process"
        )

    def handover(self) -> tuple[dict[str, Any], list[int]]:
        """The VFIO fds, the client's eventfds and the IOMMU mappings
        (:class:`backends.device.HandsOver`). The device stays open and bound, its interrupts
        wired and its mappings in the IOMMU: the kernel holds all that for the fds, which the
        exec keeps. What the exec takes away is the process addresses of the mappings, so
        they are invalidated here (DMA goes on meanwhile; include/uapi/linux/vfio.h,
        VFIO_DMA_UNMAP_FLAG_VADDR), and the next process gives them its own as the engine
        maps the client's memory again (:meth:`dma_map`)."""
        for iova, mapped in self._iommu_maps.items():
            if mapped.vaddr is not None:
                what = f"IOMMU invalidate the address of {iova:#x}"
                self._iommu_unmap(uapi.VFIO_DMA_UNMAP_FLAG_VADDR, iova, mapped.size, what)
                mapped.released = mapped.vaddr
                mapped.vaddr = None
        eventfds = [
            [index, action.value, table.fds()] for (index, action), table in self._eventfds.items()
        ]
        state = {
            "address": self.address,
            "container": self._container,
            "group": self._group,
            "device": self._device,
            "eventfds": eventfds,
            "iommu_maps": [[iova, mapped.size] for iova, mapped in self._iommu_maps.items()],
            "reset_count": self.reset_count,
        }
        fds = [*self._fds]
        fds += [fd for table in self._eventfds.values() for fd in table.fds() if fd >= 0]
        return state, fds

    def handover_abandoned(self) -> None:
        """Give the mappings :meth:`handover` invalidated their addresses back."""
        for iova, mapped in self._iommu_maps.items():
            if mapped.vaddr is None and mapped.released is not None:
                self._update_vaddr(iova, mapped, mapped.released)

    def take_over(self, state: Mapping[str, Any]) -> None:
        """Carry on with what :meth:`handover` described; only as the device is made
        (``VfioPciDevice(address, handed=state)``). Checked whole before any fd is taken."""
        if self._fds:
            raise ValueError("a passthrough device takes a handover over only as it is made")
        if state["address"] != self.address:
            raise ValueError(f"state of device {state['address']}, this is {self.address}")
        container, group, device = (int(state[key]) for key in ("container", "group", "device"))
        eventfds = [
            ((int(index), IrqAction(action)), [int(fd) for fd in fds])
            for index, action, fds in state["eventfds"]
        ]
        maps = {int(iova): int(size) for iova, size in state["iommu_maps"]}
        reset_count = int(state["reset_count"])
        self._container, self._group, self._device = container, group, device
        self._fds = [container, group, device]
        for key, fds in eventfds:
            table = EventfdTable(len(fds))
            table.assign(0, fds)
            self._eventfds[key] = table
        self._iommu_maps = {iova: _IommuMap(size, None) for iova, size in maps.items()}
        self.reset_count = reset_count

    # -- internals -------------------------------------------------------------------------

    def _update_vaddr(self, iova: int, mapped: _IommuMap, vaddr: int) -> None:
        what = f"IOMMU give {iova:#x} its address"
        self._iommu_map(uapi.VFIO_DMA_MAP_FLAG_VADDR, vaddr, iova, mapped.size, what)
        mapped.vaddr, mapped.released = vaddr, None

    def _iommu_map(self, flags: int, vaddr: int, iova: int, size: int, what: str) -> None:
        request = bytearray(uapi.DMA_MAP.pack(uapi.DMA_MAP.size, flags, vaddr, iova, size))
        self._ioctl(self._container, uapi.VFIO_IOMMU_MAP_DMA, request, what)

    def _iommu_unmap(self, flags: int, iova: int, size: int, what: str) -> None:
        request = bytearray(uapi.DMA_UNMAP.pack(uapi.DMA_UNMAP.size, flags, iova, size))
        self._ioctl(self._container, uapi.VFIO_IOMMU_UNMAP_DMA, request, what)

    def _drop_all_eventfds(self) -> None:
        tables, self._eventfds = self._eventfds, {}
        for table in tables.values():
            table.clear()

    def _drop_eventfds(self, index: int) -> None:
        for key in [key for key in self._eventfds if key[0] == index]:
            self._eventfds.pop(key).clear()

    def _region(self, index: int) -> uapi.RawRegionInfo:
        cached = self._regions.get(index)
        if cached is not None:
            return cached
        if not 0 <= index < self._info.num_regions:
            raise DeviceError(errno.EINVAL, f"region {index} out of range")
        buf = uapi.region_info_request(index)
        what = f"get region {index} info"
        try:
            self._ioctl(self._device, uapi.VFIO_DEVICE_GET_REGION_INFO, buf, what)
        except DeviceError as exc:
            if exc.errno != errno.EINVAL or index >= NUM_PCI_REGIONS:
                raise
            # vfio-pci answers EINVAL for a fixed PCI region the device lacks (the VGA
            # region of a non-VGA device); vfio-user says "absent" with size 0 (spec
            # vfio-user.md §3.5).
            absent = uapi.RawRegionInfo(index, 0, 0, 0)
            self._regions[index] = absent
            return absent
        needed = uapi.region_info_needs(buf)
        if needed > len(buf):  # the capability chain did not fit: ask again with room
            buf = uapi.region_info_request(index, needed)
            self._ioctl(self._device, uapi.VFIO_DEVICE_GET_REGION_INFO, buf, what)
        try:
            raw = uapi.parse_region_info(buf)
        except uapi.UapiError as exc:
            raise DeviceError(errno.EIO, f"{self.address}: {exc}") from None
        self._regions[index] = raw
        return raw

    def _accessible(self, index: int, offset: int, count: int, flag: int) -> uapi.RawRegionInfo:
        raw = self._region(index)
        if not raw.flags & flag:
            kind = "read" if flag == uapi.VFIO_REGION_INFO_FLAG_READ else "written"
            raise DeviceError(errno.EINVAL, f"region {index} cannot be {kind}")
        if offset < 0 or count < 0 or offset + count > raw.size:
            raise DeviceError(
                errno.EINVAL,
                f"access [{offset:#x}, +{count:#x}) outside region {index} of {raw.size:#x}",
            )
        return raw
