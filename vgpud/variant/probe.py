"""What the kernel driver learns from the device at probe: the DVSEC and readiness.

* ``has_mig_hw_bug`` comes from the NVIDIA DVSEC in config space (spec nvgrace-gpu.md §2.2).
* Readiness is two BAR0 registers reading exactly 0xFF (§7.1). The kernel sleeps between
  polls; the daemon is single-threaded and async, so here the poll is a small state machine
  (:class:`ReadinessWait`) that tells the caller how long to sleep. Nothing here sleeps.
"""

from __future__ import annotations

import errno
import struct
import time
from collections.abc import Callable

from backends.device import BAR0_REGION_INDEX, CONFIG_REGION_INDEX, DeviceError, VfioDevice

NVIDIA_VENDOR_ID = 0x10DE
PCI_EXT_CAP_ID_DVSEC = 0x0023
PCI_CFG_SPACE_SIZE = 256
PCI_CFG_SPACE_EXP_SIZE = 4096
GPU_CAP_DVSEC_REGISTER = 3
DVSEC_BITMAP_OFFSET = 0xA
MIG_SUPPORTED_WITH_CACHED_RESMEM = 1 << 0

C2C_LINK_BAR0_OFFSET = 0x1498
HBM_TRAINING_BAR0_OFFSET = 0x200BC
STATUS_READY = 0xFF
POLL_QUANTUM = 1.0  # seconds, POLL_QUANTUM_MS (§7.1)
POLL_TIMEOUT = 30.0  # seconds, POLL_TIMEOUT_MS (§7.1)

# Enough hops to visit every dword of extended config space once: a looping list ends.
_MAX_EXT_CAPS = (PCI_CFG_SPACE_EXP_SIZE - PCI_CFG_SPACE_SIZE) // 8


def _config_u32(device: VfioDevice, offset: int) -> int:
    value: int = struct.unpack("<I", device.region_read(CONFIG_REGION_INDEX, offset, 4))[0]
    return value


def find_dvsec(device: VfioDevice, vendor: int, dvsec_id: int) -> int | None:
    """Config offset of the DVSEC (``vendor``, ``dvsec_id``), like ``pci_find_dvsec_capability``.

    Walks the extended capability list from 0x100; None when absent or when config space
    is only 256 bytes.
    """
    if device.region_info(CONFIG_REGION_INDEX).size < PCI_CFG_SPACE_EXP_SIZE:
        return None
    offset = PCI_CFG_SPACE_SIZE
    for _ in range(_MAX_EXT_CAPS):
        header = _config_u32(device, offset)
        if header in (0, 0xFFFFFFFF):
            return None
        if header & 0xFFFF == PCI_EXT_CAP_ID_DVSEC:
            header1 = _config_u32(device, offset + 4)
            header2 = _config_u32(device, offset + 8)
            if header1 & 0xFFFF == vendor and header2 & 0xFFFF == dvsec_id:
                return offset
        offset = header >> 20
        if offset < PCI_CFG_SPACE_SIZE:
            return None
    return None


def has_mig_hw_bug(device: VfioDevice) -> bool:
    """Spec nvgrace-gpu.md §2.2: no DVSEC, or bit 0 clear -> the (Hopper) MIG bug."""
    dvsec = find_dvsec(device, NVIDIA_VENDOR_ID, GPU_CAP_DVSEC_REGISTER)
    if dvsec is None:
        return True
    raw = device.region_read(CONFIG_REGION_INDEX, dvsec + DVSEC_BITMAP_OFFSET, 2)
    bitmap: int = struct.unpack("<H", raw)[0]
    return not bitmap & MIG_SUPPORTED_WITH_CACHED_RESMEM


def device_ready(device: VfioDevice) -> bool:
    """One readiness test: both BAR0 registers read exactly 0xFF with 32-bit reads (§7.1)."""
    for offset in (C2C_LINK_BAR0_OFFSET, HBM_TRAINING_BAR0_OFFSET):
        raw = device.region_read(BAR0_REGION_INDEX, offset, 4)
        if struct.unpack("<I", raw)[0] != STATUS_READY:
            return False
    return True


class ReadinessWait:
    """The probe-time poll of spec nvgrace-gpu.md §7.1-§7.2, driven by the caller.

    Usage from the async daemon::

        wait = ReadinessWait(lambda: device_ready(backend))
        while (delay := wait.poll()) is not None:
            await trio.sleep(delay)

    :meth:`poll` returns None once ready, else the seconds to sleep before polling again,
    and raises ``DeviceError(ETIME)`` once the 30 s deadline has passed (the kernel's
    ``-ETIME``, which fails probe -- also for the fallback ops, §8). The deadline starts at
    construction. Unlike the kernel, which gives up right after its last sleep, one final
    test runs after the deadline: a device that became ready during the last second counts.
    """

    def __init__(
        self,
        check: Callable[[], bool],
        *,
        clock: Callable[[], float] = time.monotonic,
        timeout: float = POLL_TIMEOUT,
        quantum: float = POLL_QUANTUM,
    ) -> None:
        self._check = check
        self._clock = clock
        self._quantum = quantum
        self.deadline = clock() + timeout
        self.polls = 0

    def poll(self) -> float | None:
        """Test once; see the class docstring."""
        self.polls += 1
        if self._check():
            return None
        now = self._clock()
        if now >= self.deadline:
            raise DeviceError(errno.ETIME, "GPU not ready: C2C link / HBM training timed out")
        return min(self._quantum, self.deadline - now)
