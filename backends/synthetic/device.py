"""The synthetic Grace GPU as the host sees it: a raw device that implements ``Backend``.

Regions (spec vfio-user.md §4, R12-R14)::

    0  BAR0   16 MiB, 64-bit non-prefetchable, trapped (registers, MSI-X table and PBA)
    1         upper half of BAR0 (size 0)
    2  BAR1   the GPU's real BAR1 at BAR2/3: 64-bit prefetchable, mmappable (file ``bar1``)
    3         upper half (size 0)
    4, 5      absent on the raw device; the variant fakes usemem there (nvgrace-gpu.md §3.4)
    6  ROM    absent (ROM BAR reads 0 after sizing)
    7  config 4 KiB PCIe config space
    8  VGA    absent

Device memory is described like firmware does (``memphys``/``memlength``, spec nvgrace-gpu.md
§2.1) and backed by sparse files in ``backing_dir`` (see :mod:`backends.synthetic.memory`).
A profile with ``memory_size`` 0 is a GPU whose C2C link failed: firmware reports size 0
and the daemon falls back to plain passthrough (spec nvgrace-gpu.md §2.1, §8).

Readiness (spec nvgrace-gpu.md §7): one :class:`~backends.synthetic.bar0.Readiness`, armed at
creation and by every reset, drives both the BAR0 registers (§7.1) and, with
``Profile.cxl_dvsec``, the CXL DVSEC's MEM_ACTIVE (after ``ready_delay``) and MEM_INFO_VALID
(after ``valid_delay``, default min(ready_delay, 0.25 s)) bits (§7.3).
"""

from __future__ import annotations

import errno
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from backends.backend import DeviceMemory, MemoryWindow
from backends.device import (
    BAR0_REGION_INDEX,
    BAR2_REGION_INDEX,
    CONFIG_REGION_INDEX,
    NUM_PCI_IRQS,
    NUM_PCI_REGIONS,
    ConfigView,
    DeviceError,
    DeviceFlags,
    DeviceInfo,
    DmaRegion,
    IrqAction,
    IrqInfo,
    MmapTarget,
    RegionFlags,
    RegionInfo,
)
from backends.synthetic.bar0 import BAR0_SIZE, Bar0, Clock, Readiness
from backends.synthetic.capabilities import (
    CXL_DVSEC_OFFSET,
    CXL_DVSEC_RANGE_SIZE_LOW1,
    CXL_MEM_ACTIVE,
    CXL_MEM_INFO_VALID,
    MSI_OFFSET,
    MSI_PENDING,
    PCI_EXP_DEVCTL,
    PCI_EXP_DEVCTL_BCR_FLR,
    PCI_EXP_DEVSTA,
    PCIE_OFFSET,
    PM_CTRL,
    PM_OFFSET,
    CapabilityParams,
    build_capabilities,
)
from backends.synthetic.config_space import (
    CONFIG_SPACE_SIZE,
    PCI_BASE_ADDRESS_MEM_PREFETCH,
    PCI_BASE_ADDRESS_MEM_TYPE_64,
    PCI_CACHE_LINE_SIZE,
    PCI_CLASS_PROG,
    PCI_COMMAND,
    PCI_COMMAND_MEMORY,
    PCI_DEVICE_ID,
    PCI_HEADER_TYPE,
    PCI_INTERRUPT_LINE,
    PCI_INTERRUPT_PIN,
    PCI_LATENCY_TIMER,
    PCI_REVISION_ID,
    PCI_ROM_ADDRESS,
    PCI_STATUS,
    PCI_STATUS_RW1C,
    PCI_SUBSYSTEM_ID,
    PCI_SUBSYSTEM_VENDOR_ID,
    PCI_VENDOR_ID,
    ConfigSpace,
    intersects,
)
from backends.synthetic.irq import InterruptController
from backends.synthetic.memory import BAR1_FILE, MemoryBacking, Unbacked
from backends.synthetic.profiles import NVIDIA_VENDOR_ID, Profile

CLASS_3D_CONTROLLER = 0x030200
# COMMAND bits software may set: MEM, MASTER, PARITY, SERR, INTX_DISABLE (no I/O BARs).
COMMAND_WMASK = 0x0546
# The CXL readiness register (spec nvgrace-gpu.md §7.3), when the profile has the DVSEC.
CXL_READY_REGISTER = CXL_DVSEC_OFFSET + CXL_DVSEC_RANGE_SIZE_LOW1
PMCSR = PM_OFFSET + PM_CTRL
PM_STATE_MASK, PM_STATE_D3HOT = 0x3, 0x3
PM_STATES_UNSUPPORTED = (0x1, 0x2)  # D1, D2: the PMC built here supports neither
# What vfio-pci-core's save/restore around a function reset does not bring back: status
# bits (the RW1C error bits the restore's write clears; INTx status and MSI pending bits,
# which the reset cleared with the interrupt state) and the power state (the reset ioctl
# puts the function in D0 first).
NOT_RESTORED = (
    (PCI_STATUS, 2),
    (PMCSR, 2),
    (MSI_OFFSET + MSI_PENDING, 4),
    (PCIE_OFFSET + PCI_EXP_DEVSTA, 2),
)


class SyntheticGpu:
    """An emulated Grace GPU; see the module docstring for its regions."""

    def __init__(
        self,
        profile: Profile,
        backing_dir: Path | str,
        *,
        ready_delay: float = 0.0,
        clock: Clock = time.monotonic,
        serial_number: int | None = None,
        valid_delay: float | None = None,
        directory_lock: int | None = None,
    ) -> None:
        """``directory_lock``: the locked backing directory's fd, from :meth:`handover`
        in the process before a live upgrade (see :class:`MemoryBacking`)."""
        self.profile = profile
        self.backing_dir = Path(backing_dir)
        self._region_sizes = {
            BAR0_REGION_INDEX: BAR0_SIZE,
            BAR2_REGION_INDEX: profile.bar1_size,
            CONFIG_REGION_INDEX: CONFIG_SPACE_SIZE,
        }
        self.config = _build_config(profile, serial_number)
        self._config_view: ConfigView | None = None
        self.irqs = InterruptController(self.config, profile.msi_vectors, profile.msix_vectors)
        self.readiness = Readiness(clock, ready_delay, valid_delay)
        self.bar0 = Bar0(profile.boot0, self.readiness, self.irqs, profile.msix_vectors)
        self._memory = MemoryBacking(
            self.backing_dir, profile.memory_size, directory_lock=directory_lock
        )
        # BAR1's file is made when first used; one left by a device of another size is
        # refused now, while the daemon starts, not at the first client's REGION_INFO.
        self._memory.check_existing(BAR1_FILE, profile.bar1_size)
        self._bar1_window: MemoryWindow | None = None
        self._dma: dict[int, DmaRegion] = {}
        self.reset_count = 0
        # __vfio_pci_memory_enabled for BAR0/BAR1 accesses, kept up to date on config writes
        # rather than read from config space on every trapped access.
        self._memory_enabled = False
        self._enable()

    # -- Backend ---------------------------------------------------------------------------

    def device_memory(self) -> DeviceMemory | None:
        """``memphys``/``memlength`` from the profile; None when the size is 0 (§2.1)."""
        if self.profile.memory_size == 0:
            return None
        return DeviceMemory(self.profile.memphys, self.profile.memory_size)

    def memory_window(self, start: int, length: int, cacheable: bool) -> MemoryWindow:
        """A window backed by the ``usemem`` (cacheable) or ``resmem`` (non-cached) file."""
        if self.profile.memory_size == 0:
            raise DeviceError(errno.EINVAL, "device has no coherent memory")
        return self._memory.window(start, length, cacheable)

    def unbacked_memory(self) -> Unbacked | None:
        """What of the device memory files the filesystem has yet to provide
        (:meth:`MemoryBacking.unbacked`)."""
        return self._memory.unbacked()

    def shutdown(self) -> None:
        """Close eventfds and the backing files (their contents stay)."""
        self.irqs.close()
        self._bar1_window = None
        self._memory.close()

    # -- VfioDevice ------------------------------------------------------------------------

    def device_info(self) -> DeviceInfo:
        """RESET|PCI, 9 regions, 5 irqs (spec vfio-user.md R13)."""
        return DeviceInfo(DeviceFlags.RESET | DeviceFlags.PCI, NUM_PCI_REGIONS, NUM_PCI_IRQS)

    def region_info(self, index: int) -> RegionInfo:
        """See the module docstring."""
        rw = RegionFlags.READ | RegionFlags.WRITE
        if index == BAR0_REGION_INDEX:
            return RegionInfo(index, BAR0_SIZE, rw)
        if index == BAR2_REGION_INDEX:
            bar1 = self._bar1()
            return RegionInfo(index, bar1.length, rw | RegionFlags.MMAP, MmapTarget(bar1.fd, 0))
        if index == CONFIG_REGION_INDEX:
            return RegionInfo(index, CONFIG_SPACE_SIZE, rw)
        if 0 <= index < NUM_PCI_REGIONS:
            return RegionInfo(index, 0, RegionFlags(0))
        raise DeviceError(errno.EINVAL, f"region {index} out of range")

    def region_read(self, index: int, offset: int, count: int) -> bytes:
        """Read through the region's model; EINVAL outside the region, EIO for a BAR while
        memory decoding is off."""
        self._check_access(index, offset, count)
        if index == CONFIG_REGION_INDEX:
            if self.profile.cxl_dvsec and intersects(offset, count, CXL_READY_REGISTER, 4):
                self._update_cxl_status()
            return self.config.read(offset, count)
        if not self._memory_enabled:  # a flag, not a method: BAR0 reads are the hot path
            raise _memory_disabled()
        if index == BAR0_REGION_INDEX:
            return self.bar0.read(offset, count)
        return self._bar1().read(offset, count)

    def config_view(self) -> ConfigView:
        """See :class:`backends.device.ExposesConfig`: the config bytes themselves (every
        owner of a dynamic bit stores it there as it changes), less the CXL ready register,
        whose bits follow the clock and are brought up to date when read."""
        view = self._config_view
        if view is None:
            computed = ((CXL_READY_REGISTER, 4),) if self.profile.cxl_dvsec else ()
            view = self._config_view = ConfigView(self.config.data, computed)
        return view

    def region_write(self, index: int, offset: int, data: bytes) -> None:
        """Write through the region's model; EINVAL outside the region, EIO for a BAR while
        memory decoding is off."""
        self._check_access(index, offset, len(data))
        if index == CONFIG_REGION_INDEX:
            self._config_write(offset, data)
            return
        if not self._memory_enabled:
            raise _memory_disabled()
        if index == BAR0_REGION_INDEX:
            self.bar0.write(offset, data)
        else:
            self._bar1().write(offset, data)

    def watched_fds(self) -> tuple[int, ...]:
        """See :class:`backends.device.WatchesFds`: the INTx resample eventfd."""
        return self.irqs.watched_fds()

    def fd_readable(self, fd: int) -> None:
        """See :class:`backends.device.WatchesFds`."""
        self.irqs.fd_readable(fd)

    def irq_info(self, index: int) -> IrqInfo:
        """See :meth:`InterruptController.irq_info`."""
        return self.irqs.irq_info(index)

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
        """See :meth:`InterruptController.set_irqs` (owns ``eventfds`` on every path)."""
        self.irqs.set_irqs(index, action, start, count, eventfds=eventfds, data_bool=data_bool)

    def dma_map(self, region: DmaRegion) -> None:
        """Recorded only: the synthetic GPU does not DMA."""
        self._dma[region.iova] = region

    def dma_unmap(self, iova: int, size: int) -> None:
        """Forget a mapping recorded by :meth:`dma_map`."""
        known = self._dma.get(iova)
        if known is not None and known.size == size:
            del self._dma[iova]

    def reset(self) -> None:
        """A function reset as vfio-pci-core does it (``pci_try_reset_function``), for
        DEVICE_RESET and for an FLR the client writes to DEVCTL: registers, interrupt state
        and readiness go back to their defaults, memory is kept, and config space is saved
        before and restored after, so the client finds COMMAND, the BARs and the capability
        controls as it left them (docs/device.md item 8). Not restored: :data:`NOT_RESTORED`.
        """
        saved = bytearray(self.config.data)
        self.config.reset()
        self.irqs.reset()
        self.bar0.reset()
        for offset, size in NOT_RESTORED:
            saved[offset : offset + size] = self.config.data[offset : offset + size]
        self.config.data[:] = saved
        self.irqs.config_written()
        self._update_memory_enabled()
        self.reset_count += 1

    def open(self) -> None:
        """A client attached. What vfio-pci-core's open leaves for it: memory decoding on
        (``pci_enable_device``) and the function in D0; everything else as the last client
        left it (spec vfio-user.md R19). The memory files are checked (the last client may
        have resized them, see :mod:`backends.synthetic.memory`)."""
        self._memory.restore_sizes()
        self._enable()

    def close(self) -> None:
        """Release every eventfd; device state and memory stay (spec vfio-user.md R19)."""
        self.irqs.close()
        self._dma.clear()
        self._memory.restore_sizes()

    # -- HandsOver (a live upgrade, vgpud/upgrade.py) ----------------------------------------

    def handover_refusal(self) -> str | None:
        """None: all of a synthetic GPU's state can be described (backends.device.HandsOver)."""
        return None

    def stand_in_refusal(self) -> str | None:
        """None: the memory is in shared files and the eventfds are the kernel's, so a fork
        serves the same device; the rest is this object's, which the fork then owns."""
        return None

    def handover_abandoned(self) -> None:
        """Nothing to give back: :meth:`handover` only describes."""

    def handover(self) -> tuple[dict[str, Any], list[int]]:
        """Config space, registers, readiness, interrupt state and the client's eventfds
        (:class:`backends.device.HandsOver`). Memory is in the files, which the next process
        opens by name, under the directory lock handed over with them (``directory_lock``,
        to build the next device with); what the client mapped for DMA the engine hands
        over itself."""
        irqs, fds = self.irqs.handover()
        lock = self._memory.directory_lock
        state = {
            "profile": self.profile.name,
            "config": bytes(self.config.data).hex(),
            "scratch": bytes(self.bar0.scratch).hex(),
            # The host's CLOCK_MONOTONIC (the default clock) reads the same in the next
            # process, so a training period in progress ends when it would have.
            "readiness_armed_at": self.readiness.armed_at,
            "reset_count": self.reset_count,
            "irqs": irqs,
            "directory_lock": lock,
        }
        return state, fds if lock is None else [*fds, lock]

    def take_over(self, state: Mapping[str, Any]) -> None:
        """Carry on from :meth:`handover`'s state, on a device built with the same profile
        (ValueError otherwise, nothing taken)."""
        if state["profile"] != self.profile.name:
            raise ValueError(f"state of a {state['profile']} device, this is a {self.profile.name}")
        config = bytes.fromhex(state["config"])
        scratch = bytes.fromhex(state["scratch"])
        if len(config) != len(self.config.data) or len(scratch) != len(self.bar0.scratch):
            raise ValueError("device state of another shape")
        armed_at, reset_count = float(state["readiness_armed_at"]), int(state["reset_count"])
        self.irqs.take_over(state["irqs"])
        self.config.data[:] = config
        self.bar0.scratch[:] = scratch
        self.readiness.armed_at = armed_at
        self.reset_count = reset_count
        self._update_memory_enabled()

    # -- internals -------------------------------------------------------------------------

    def _bar1(self) -> MemoryWindow:
        # Created on first use, so a device whose BAR1 nobody maps has no file for it.
        if self._bar1_window is None:
            self._bar1_window = self._memory.file(BAR1_FILE, self.profile.bar1_size).window(False)
        return self._bar1_window

    def _enable(self) -> None:
        self.config.set_bits(PCI_COMMAND, 2, PCI_COMMAND_MEMORY, True)
        self.config.set_bits(PMCSR, 2, PM_STATE_MASK, False)
        self._update_memory_enabled()

    def _update_memory_enabled(self) -> None:
        # __vfio_pci_memory_enabled: COMMAND.MEM set and the function not in D3hot.
        self._memory_enabled = bool(self.config.u16(PCI_COMMAND) & PCI_COMMAND_MEMORY) and (
            self.config.u16(PMCSR) & PM_STATE_MASK != PM_STATE_D3HOT
        )

    def _check_access(self, index: int, offset: int, count: int) -> None:
        # Region sizes are fixed at creation; building a RegionInfo per trapped access (the
        # hot path) would cost more than the access itself.
        size = self._region_sizes.get(index, 0)
        if offset < 0 or count < 0 or offset + count > size:
            raise DeviceError(
                errno.EINVAL, f"access [{offset:#x}, +{count:#x}) outside region {index}"
            )

    def _update_cxl_status(self) -> None:
        # The bits depend on the clock, so they are computed when read rather than stored
        # by a timer; they are read-only (wmask 0), so no write can have changed them.
        readiness = self.readiness
        self.config.set_bits(CXL_READY_REGISTER, 4, CXL_MEM_INFO_VALID, readiness.valid)
        self.config.set_bits(CXL_READY_REGISTER, 4, CXL_MEM_ACTIVE, readiness.ready)

    def _config_write(self, offset: int, data: bytes) -> None:
        state = self.config.u16(PMCSR) & PM_STATE_MASK
        self.config.write(offset, data)
        if self.config.u16(PMCSR) & PM_STATE_MASK in PM_STATES_UNSUPPORTED:
            # PMC advertises neither D1 nor D2: the request is discarded and the function
            # stays where it was (PCI PM 1.2, PMCSR PowerState; the kernel's
            # pci_set_low_power_state refuses it), so a D3hot function keeps refusing BARs.
            self.config.set_bits(PMCSR, 2, PM_STATE_MASK, False)
            self.config.set_bits(PMCSR, 2, state, True)
        flr_byte = PCIE_OFFSET + PCI_EXP_DEVCTL + 1
        if offset <= flr_byte < offset + len(data) and (
            data[flr_byte - offset] & (PCI_EXP_DEVCTL_BCR_FLR >> 8)
        ):
            # Function-level reset requested through DEVCTL (spec vfio-user.md §5.3).
            self.reset()
            return
        self.irqs.config_written()
        self._update_memory_enabled()


def _memory_disabled() -> DeviceError:
    # vfio_pci_bar_rw's test_mem for a memory BAR: the kernel refuses with EIO rather than
    # let the access reach a device that is not decoding memory (found by an audit against
    # vfio_pci_rdwr.c; BAR0 used to answer whatever COMMAND said).
    return DeviceError(errno.EIO, "memory decoding is off (COMMAND.MEM clear or D3hot)")


def _build_config(profile: Profile, serial_number: int | None) -> ConfigSpace:
    cfg = ConfigSpace()
    cfg.set(PCI_VENDOR_ID, 2, NVIDIA_VENDOR_ID)
    cfg.set(PCI_DEVICE_ID, 2, profile.device_id)
    cfg.set(PCI_COMMAND, 2, 0, wmask=COMMAND_WMASK)
    cfg.set(PCI_STATUS, 2, 0, w1cmask=PCI_STATUS_RW1C)
    cfg.set(PCI_REVISION_ID, 1, profile.revision)
    cfg.set(PCI_CLASS_PROG, 3, CLASS_3D_CONTROLLER)
    cfg.set(PCI_CACHE_LINE_SIZE, 1, 0, wmask=0xFF)
    cfg.set(PCI_LATENCY_TIMER, 1, 0, wmask=0xFF)
    cfg.set(PCI_HEADER_TYPE, 1, 0)  # type 0, single function
    cfg.bar(0, BAR0_SIZE, PCI_BASE_ADDRESS_MEM_TYPE_64)
    cfg.bar(2, profile.bar1_size, PCI_BASE_ADDRESS_MEM_TYPE_64 | PCI_BASE_ADDRESS_MEM_PREFETCH)
    cfg.bar(4, 0, 0)
    cfg.bar(5, 0, 0)
    cfg.set(PCI_SUBSYSTEM_VENDOR_ID, 2, profile.subsystem_vendor_id)
    cfg.set(PCI_SUBSYSTEM_ID, 2, profile.subsystem_id)
    cfg.set(PCI_ROM_ADDRESS, 4, 0)  # no ROM: read-only zero, sizing finds nothing (R12)
    cfg.set(PCI_INTERRUPT_LINE, 1, 0xFF, wmask=0xFF)
    cfg.set(PCI_INTERRUPT_PIN, 1, 1)
    serial = serial_number if serial_number is not None else 0x10DE_0000_0000 | profile.device_id
    build_capabilities(
        cfg,
        CapabilityParams(
            msi_vectors=profile.msi_vectors,
            msix_vectors=profile.msix_vectors,
            serial_number=serial,
            dvsec_bitmap=profile.dvsec_bitmap,
            cxl_mem_active_timeout=profile.cxl_mem_active_timeout if profile.cxl_dvsec else None,
            memory_base=profile.memphys,
            memory_size=profile.memory_size,
        ),
    )
    cfg.freeze_reset_values()
    return cfg
