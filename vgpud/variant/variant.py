"""``NvgraceVariant``: the nvgrace-gpu-vfio-pci variant driver over any Backend.

Overrides exactly what the kernel variant overrides (spec nvgrace-gpu.md §3-§5, §7.4) and
passes everything else to the backend, as the kernel passes it to vfio-pci-core:

* region info, read and write of region 4 (usemem) and, when resmem exists, region 2;
* config bytes 0x18-0x27 (:mod:`vgpud.variant.config_overlay`);
* ``bar_val`` cleared on open and reset; the post-reset readiness gate;
* ioeventfds refused with ENOTTY (§5.4).

Two places where vfio-user cannot do what the kernel does, and what happens instead:

* **Clipped accesses.** The kernel clips a read/write that runs past ``bar_size`` and returns
  a short count (§5.2-§5.3). A vfio-user REGION_READ reply must carry exactly ``count``
  bytes (spec vfio-user.md §3.9, R10) and R20 asks for ``offset+count <= region size``, so
  an access that runs past ``bar_size`` is refused with EINVAL, like one that starts there.
  Within ``bar_size`` the kernel's rules hold byte for byte: 0xFF past ``memlength`` on read,
  silent drop past ``memlength`` on write.
* **Readiness after reset.** The kernel blocks the first access after a reset in a
  readiness wait (§7.4): up to 30 s of BAR0 polls, or on the CXL path the §7.3 budget (1 s
  for MEM_INFO_VALID, then the Memory_Active_Timeout the register advertises, up to
  256 s). The daemon is single-threaded and QEMU gives up after 5 s (spec vfio-user.md R16),
  so the gate never blocks. The first gated access starts the wait, as the kernel's does,
  and while the GPU is not ready it fails with EAGAIN (the guest sees a failed access,
  all-ones on read). Each later access is one more poll of the same wait, until the GPU is
  ready (the gate clears and the access goes through) or the wait's budget, counted from
  the access that started it, runs out: ETIME, the kernel's error. That ends the wait; the
  next access starts a new one, as the kernel's next read would.

  The order of the checks is the kernel's. On the legacy path ``check_device_ready`` first
  wants memory enabled (``__vfio_pci_memory_enabled``: COMMAND.MEM set and the function not
  in D3hot), else EIO, then waits. On the CXL path ``nvgrace_gpu_read_mem``/``write_mem``
  run the CXL wait before taking the lock (all-ones: ENODEV), then the memory-enable check.
  A write wholly past ``memlength`` returns before any of this (``write_mem``'s early
  ``goto exitfn``); a read of the tail is gated like any read.

  The gate is armed whenever the device completes a function reset -- ``reset()``, or an
  FLR the guest writes to config space, which the backend counts in ``reset_count`` (the
  kernel's ``err_handler.reset_done``) -- and by ``open()``, because the kernel's open runs
  a function reset (§7.4, (I)). Of these, ``reset()`` and ``open()`` clear ``bar_val``
  (§4.7: the kernel clears it in the VFIO_DEVICE_RESET ioctl and in open_device); a guest
  FLR does not, as the kernel's PCI reset path does not.
"""

from __future__ import annotations

import errno
import struct
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from backends.backend import Backend, MemoryWindow
from backends.device import (
    BAR2_REGION_INDEX,
    BAR4_REGION_INDEX,
    CONFIG_REGION_INDEX,
    ConfigView,
    DeviceError,
    DeviceInfo,
    DmaRegion,
    ExposesConfig,
    HandsOver,
    IrqAction,
    IrqInfo,
    MmapTarget,
    RegionFlags,
    RegionInfo,
    SparseArea,
    VfioDevice,
    WatchesFds,
)
from vgpud.variant.config_overlay import EMULATED_CONFIG, BarOverlay
from vgpud.variant.layout import MemRegion, NvgraceLayout, compute_layout
from vgpud.variant.probe import (
    CxlReadinessWait,
    ProbeWait,
    ReadinessWait,
    bar0_device_ready,
    cxl_device_ready,
    find_capability,
    find_cxl_dvsec,
    has_mig_hw_bug,
)

PCI_COMMAND = 0x04
PCI_COMMAND_MEMORY = 1 << 1
PCI_CAP_ID_PM = 0x01
PCI_PM_CTRL = 4
PCI_PM_CTRL_STATE_MASK = 0x3
PCI_D3HOT = 3


class _FakeRegion:
    """A faked BAR region: its layout entry and the backing window."""

    __slots__ = ("index", "region", "window")

    def __init__(self, index: int, region: MemRegion, window: MemoryWindow) -> None:
        self.index = index
        self.region = region
        self.window = window


class NvgraceVariant:
    """The full variant (``nvgrace-gpu-vfio-pci`` ops) over ``backend``.

    Construction is the kernel's probe minus the readiness wait (which the async daemon
    drives with :func:`vgpud.variant.probe.probe_wait`): read the memory description, look
    up ``cxl_dvsec`` (spec §2.3-§2.4), decide ``has_mig_hw_bug`` from the NVIDIA DVSEC,
    compute the layout (a :class:`~vgpud.variant.layout.LayoutError` fails it) and obtain
    the backing windows.
    """

    def __init__(self, backend: Backend, *, clock: Callable[[], float] = time.monotonic) -> None:
        memory = backend.device_memory()
        if memory is None:
            raise ValueError("backend has no device memory; use make_device() for the fallback")
        self.backend = backend
        self._clock = clock
        # Looked up once, like the kernel's probe (§2.4 step 3): it picks the readiness path.
        self.cxl_dvsec: int | None = find_cxl_dvsec(backend)
        self.layout: NvgraceLayout = compute_layout(
            memory.memphys, memory.memlength, has_mig_hw_bug(backend)
        )
        self._regions: dict[int, _FakeRegion] = {}
        self._config_view: ConfigView | None = None
        usemem = self.layout.usemem
        self._regions[BAR4_REGION_INDEX] = _FakeRegion(
            BAR4_REGION_INDEX,
            usemem,
            backend.memory_window(usemem.memphys - memory.memphys, usemem.memlength, True),
        )
        resmem = self.layout.resmem
        if resmem is not None:
            self._regions[BAR2_REGION_INDEX] = _FakeRegion(
                BAR2_REGION_INDEX,
                resmem,
                backend.memory_window(resmem.memphys - memory.memphys, resmem.memlength, False),
            )
        self.overlay = BarOverlay(usemem, resmem)
        # A region's size never changes while the device exists (the config write path's
        # bounds check would otherwise build a RegionInfo per guest write).
        self._config_size = backend.region_info(CONFIG_REGION_INDEX).size
        # The power-management capability, looked up once like the kernel's pdev->pm_cap.
        self._pm_cap = find_capability(backend, PCI_CAP_ID_PM)
        self._gate_armed = False
        self._wait: ProbeWait | None = None  # the readiness wait in progress, if any
        self._resets_seen = backend.reset_count

    # -- readiness ---------------------------------------------------------------------------

    def ready_now(self) -> bool:
        """One readiness test of the backend: CXL (§7.3) or BAR0 (§7.1) per ``cxl_dvsec``."""
        if self.cxl_dvsec is not None:
            return cxl_device_ready(self.backend, self.cxl_dvsec)
        return bar0_device_ready(self.backend)

    @property
    def gate_armed(self) -> bool:
        """Whether the next fake-BAR access runs the post-reset readiness check (§7.4)."""
        self._note_backend_resets()
        return self._gate_armed

    def _arm_gate(self) -> None:
        self._gate_armed = True
        self._wait = None  # a reset ends any wait in progress; the next access starts one
        self._resets_seen = self.backend.reset_count

    def _note_backend_resets(self) -> None:
        # The kernel's err_handler.reset_done: any function reset of the device arms the
        # gate, including an FLR the guest starts through config space (§7.4).
        if self.backend.reset_count != self._resets_seen:
            self._arm_gate()

    def _check_ready(self) -> None:
        """``check_device_ready`` without blocking (module docstring, spec §7.4)."""
        self._note_backend_resets()
        if not self._gate_armed:
            return
        if self.cxl_dvsec is not None:
            # nvgrace_gpu_read_mem/write_mem: the CXL wait runs first, outside memory_lock.
            self._poll_wait()
            self._check_memory_enabled()
        else:
            self._check_memory_enabled()
            self._poll_wait()
        self._gate_armed = False
        self._wait = None

    def _check_memory_enabled(self) -> None:
        """``__vfio_pci_memory_enabled``: COMMAND.MEM set and the function above D3hot."""
        command = self._config_u16(PCI_COMMAND)
        if not command & PCI_COMMAND_MEMORY:
            raise DeviceError(errno.EIO, "memory decoding is disabled (COMMAND.MEM clear)")
        if self._pm_cap is not None:
            pmcsr = self._config_u16(self._pm_cap + PCI_PM_CTRL)
            if pmcsr & PCI_PM_CTRL_STATE_MASK == PCI_D3HOT:
                raise DeviceError(errno.EIO, "the GPU is in D3hot (PMCSR power state 3)")

    def _config_u16(self, offset: int) -> int:
        raw = self.backend.region_read(CONFIG_REGION_INDEX, offset, 2)
        value: int = struct.unpack("<H", raw)[0]
        return value

    def _poll_wait(self) -> None:
        """One poll of the readiness wait in progress, started by the first access to get
        here: EAGAIN while it runs, ETIME/ENODEV end it (module docstring)."""
        wait = self._wait
        if wait is None:
            if self.cxl_dvsec is not None:
                wait = CxlReadinessWait(self.backend, self.cxl_dvsec, clock=self._clock)
            else:
                wait = ReadinessWait(lambda: bar0_device_ready(self.backend), clock=self._clock)
            self._wait = wait
        try:
            retry_in = wait.poll()
        except DeviceError:
            self._wait = None
            raise
        if retry_in is not None:
            raise DeviceError(errno.EAGAIN, "GPU not ready yet after reset; retry")

    # -- HandsOver (a live upgrade, vgpud/upgrade.py) ------------------------------------------

    def handover_refusal(self) -> str | None:
        """The backend's (:class:`backends.device.HandsOver`)."""
        if not isinstance(self.backend, HandsOver):
            return f"{type(self.backend).__name__} cannot be handed over"
        return self.backend.handover_refusal()

    def stand_in_refusal(self) -> str | None:
        """The backend's."""
        if not isinstance(self.backend, HandsOver):
            return f"{type(self.backend).__name__} cannot be handed over"
        return self.backend.stand_in_refusal()

    def handover_abandoned(self) -> None:
        """The backend's."""
        if isinstance(self.backend, HandsOver):
            self.backend.handover_abandoned()

    def handover(self) -> tuple[dict[str, Any], list[int]]:
        """The emulated BAR registers and the post-reset gate, with the backend's state
        (:class:`backends.device.HandsOver`; the backend must be one). A readiness wait in
        progress is not carried: the next access after the upgrade starts it again."""
        if not isinstance(self.backend, HandsOver):
            raise TypeError(f"{type(self.backend).__name__} cannot be handed over")
        backend, fds = self.backend.handover()
        resmem = self.overlay.resmem
        state = {
            "usemem_bar_val": self.overlay.usemem.bar_val,
            "resmem_bar_val": None if resmem is None else resmem.bar_val,
            "gate_armed": self.gate_armed,
            "backend": backend,
        }
        return state, fds

    def take_over(self, state: Mapping[str, Any]) -> None:
        """Carry on from :meth:`handover`'s state (see there)."""
        if not isinstance(self.backend, HandsOver):
            raise TypeError(f"{type(self.backend).__name__} cannot be handed over")
        resmem = self.overlay.resmem
        if (state["resmem_bar_val"] is None) != (resmem is None):
            raise ValueError("variant state of another memory layout")
        usemem_bar_val, gate_armed = int(state["usemem_bar_val"]), bool(state["gate_armed"])
        self.backend.take_over(state["backend"])
        self.overlay.usemem.bar_val = usemem_bar_val
        if resmem is not None:
            resmem.bar_val = int(state["resmem_bar_val"])
        self._resets_seen = self.backend.reset_count
        self._gate_armed = gate_armed
        self._wait = None

    # -- VfioDevice --------------------------------------------------------------------------

    def device_info(self) -> DeviceInfo:
        """The backend's."""
        return self.backend.device_info()

    def region_info(self, index: int) -> RegionInfo:
        """Faked regions per spec nvgrace-gpu.md §3.4; the rest from the backend."""
        fake = self._regions.get(index)
        if fake is None:
            return self.backend.region_info(index)
        window = fake.window
        return RegionInfo(
            index=index,
            size=fake.region.bar_size,
            # CAPS because the sparse-mmap capability is always attached (§3.4).
            flags=RegionFlags.READ | RegionFlags.WRITE | RegionFlags.MMAP | RegionFlags.CAPS,
            mmap=MmapTarget(window.fd, window.offset),
            # Only the real memory is mappable; the tail up to bar_size is trapped (§3.4).
            sparse_areas=(SparseArea(0, fake.region.memlength),),
        )

    def region_read(self, index: int, offset: int, count: int) -> bytes:
        """Spec nvgrace-gpu.md §5.2 for faked regions, §4.3 for config, else the backend."""
        fake = self._regions.get(index)
        if fake is not None:
            return self._bar_read(fake, offset, count)
        data = self.backend.region_read(index, offset, count)
        if index == CONFIG_REGION_INDEX and self.overlay.touches(offset, count):
            patched = bytearray(data)
            self.overlay.patch_read(offset, patched)
            return bytes(patched)
        return data

    def config_view(self) -> ConfigView | None:
        """The backend's view (:class:`backends.device.ExposesConfig`), with the emulated
        BAR2-BAR5 registers (§4.3) among the bytes computed when read; None when the backend
        has no view."""
        if not isinstance(self.backend, ExposesConfig):
            return None
        raw = self.backend.config_view()
        if raw is None:
            return None
        view = self._config_view
        if view is None or view.data is not raw.data:
            view = self._config_view = ConfigView(raw.data, (*raw.computed, EMULATED_CONFIG))
        return view

    def region_write(self, index: int, offset: int, data: bytes) -> None:
        """Spec nvgrace-gpu.md §5.3 for faked regions, §4.4 for config, else the backend."""
        fake = self._regions.get(index)
        if fake is not None:
            self._bar_write(fake, offset, data)
        elif index == CONFIG_REGION_INDEX:
            if offset < 0 or offset + len(data) > self._config_size:
                raise DeviceError(errno.EINVAL, f"config write [{offset:#x}, +{len(data)})")
            if not self.overlay.write(offset, data):
                self.backend.region_write(index, offset, data)
        else:
            self.backend.region_write(index, offset, data)

    def watched_fds(self) -> Sequence[int]:
        """The backend's (interrupts are not the variant's business)."""
        return self.backend.watched_fds() if isinstance(self.backend, WatchesFds) else ()

    def fd_readable(self, fd: int) -> None:
        """The backend's."""
        if isinstance(self.backend, WatchesFds):
            self.backend.fd_readable(fd)

    def irq_info(self, index: int) -> IrqInfo:
        """The backend's."""
        return self.backend.irq_info(index)

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
        """The backend's (it takes ownership of ``eventfds``)."""
        self.backend.set_irqs(index, action, start, count, eventfds=eventfds, data_bool=data_bool)

    def dma_map(self, region: DmaRegion) -> None:
        """The backend's."""
        self.backend.dma_map(region)

    def dma_unmap(self, iova: int, size: int) -> None:
        """The backend's."""
        self.backend.dma_unmap(iova, size)

    @property
    def reset_count(self) -> int:
        """The backend's: function resets completed, an FLR the guest wrote to DEVCTL
        included (the libvfio-user engine drops the interrupts it holds on one)."""
        return self.backend.reset_count

    def reset(self) -> None:
        """Clear ``bar_val`` (§4.7), reset the backend, re-arm the readiness gate (§7.4)."""
        self.overlay.clear()
        self.backend.reset()
        self._arm_gate()

    def open(self) -> None:
        """Clear ``bar_val`` (§4.7, usemem always exists here) and arm the gate."""
        self.overlay.clear()
        self.backend.open()
        self._arm_gate()

    def close(self) -> None:
        """The backend's; ``bar_val`` is deliberately kept (§4.7)."""
        self.backend.close()

    def region_io_fds(self, index: int) -> None:
        """``VFIO_DEVICE_IOEVENTFD`` / GET_REGION_IO_FDS: always ENOTTY (§5.4)."""
        raise DeviceError(errno.ENOTTY, f"ioeventfds are not supported (region {index})")

    def shutdown(self) -> None:
        """The daemon stops: the backend closes its memory."""
        self.backend.shutdown()

    # -- fake BAR data path ------------------------------------------------------------------

    def _check_bar_access(self, fake: _FakeRegion, offset: int, count: int) -> None:
        bar_size = fake.region.bar_size
        if offset < 0 or offset >= bar_size:
            raise DeviceError(errno.EINVAL, f"offset {offset:#x} at/after bar_size {bar_size:#x}")
        if count < 0 or count > bar_size - offset:
            # Not clipped: see the module docstring ("Clipped accesses").
            raise DeviceError(
                errno.EINVAL, f"access [{offset:#x}, +{count:#x}) runs past bar_size {bar_size:#x}"
            )

    def _bar_read(self, fake: _FakeRegion, offset: int, count: int) -> bytes:
        self._check_bar_access(fake, offset, count)
        self._check_ready()
        memlength = fake.region.memlength
        mem_count = 0 if offset >= memlength else min(count, memlength - offset)
        data = fake.window.read(offset, mem_count) if mem_count else b""
        return data + b"\xff" * (count - mem_count)

    def _bar_write(self, fake: _FakeRegion, offset: int, data: bytes) -> None:
        self._check_bar_access(fake, offset, len(data))
        memlength = fake.region.memlength
        if offset >= memlength:
            # Dropped silently (§5.3 step 3), before the readiness gate: nvgrace_gpu_write_mem
            # jumps to its exit ahead of the CXL wait and check_device_ready.
            return
        self._check_ready()
        mem_count = min(len(data), memlength - offset)
        fake.window.write(offset, data[:mem_count])


def make_device(backend: Backend, *, clock: Callable[[], float] = time.monotonic) -> VfioDevice:
    """The device to serve: the variant, or the backend itself without device memory (§8)."""
    if backend.device_memory() is None:
        return backend
    return NvgraceVariant(backend, clock=clock)
