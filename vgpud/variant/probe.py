"""What the kernel driver learns from the device at probe: the DVSECs and readiness.

* ``has_mig_hw_bug`` comes from the NVIDIA DVSEC in config space (spec nvgrace-gpu.md §2.2).
* ``cxl_dvsec``: the config offset of a CXL Device DVSEC, if any (§2.3, v7.2). It picks the
  readiness path at runtime, never the device ID.
* Readiness, legacy path: two BAR0 registers reading exactly 0xFF (§7.1), polled every 1 s
  for 30 s. CXL path: MEM_INFO_VALID and MEM_ACTIVE in the DVSEC's Range 1 Size Low (§7.3),
  with a 1 s budget for VALID and then the budget the register itself advertises (up to
  256 s). The kernel sleeps between polls; the daemon is single-threaded and async, so each
  wait is a small state machine (:class:`ReadinessWait`, :class:`CxlReadinessWait`; built
  by :func:`probe_wait`) that tells the caller how long to sleep. Nothing here sleeps.
"""

from __future__ import annotations

import errno
import struct
import time
from collections.abc import Callable
from typing import Protocol

from backends.device import BAR0_REGION_INDEX, CONFIG_REGION_INDEX, DeviceError, VfioDevice

NVIDIA_VENDOR_ID = 0x10DE
PCI_STATUS = 0x06
PCI_STATUS_CAP_LIST = 1 << 4
PCI_CAPABILITY_LIST = 0x34
PCI_STD_HEADER_SIZEOF = 0x40
PCI_FIND_CAP_TTL = 48  # the kernel's bound on a capability walk (drivers/pci/pci.c)
PCI_EXT_CAP_ID_DVSEC = 0x0023
PCI_EXT_CAP_NEXT_MASK = 0xFFC  # PCI_EXT_CAP_NEXT(): bits 31:20, dword aligned
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

# CXL Device DVSEC (spec nvgrace-gpu.md §2.3, §7.3).
PCI_VENDOR_ID_CXL = 0x1E98
PCI_DVSEC_CXL_DEVICE = 0
PCI_DVSEC_CXL_RANGE_SIZE_LOW0 = 0x1C  # PCI_DVSEC_CXL_RANGE_SIZE_LOW(0): Range 1 Size Low
CXL_MEM_INFO_VALID = 1 << 0
CXL_MEM_ACTIVE = 1 << 1
CXL_MEM_ACTIVE_TIMEOUT_SHIFT = 13  # Memory_Active_Timeout, bits 15:13
CXL_MEM_ACTIVE_TIMEOUT_MASK = 0x7
CXL_MEM_ACTIVE_TIMEOUT_MAX_CODE = 4  # codes 5-7 clamp to 4, i.e. 256 s (§7.3)
CXL_MEM_INFO_VALID_TIMEOUT = 1.0  # seconds, the budget for VALID (§7.3 wait step 1)
CXL_STATUS_GONE = 0xFFFFFFFF  # what a config read of a vanished device returns (§7.3)

# Enough hops to visit every dword of extended config space once: a looping list ends.
_MAX_EXT_CAPS = (PCI_CFG_SPACE_EXP_SIZE - PCI_CFG_SPACE_SIZE) // 8


def _config_u32(device: VfioDevice, offset: int) -> int:
    value: int = struct.unpack("<I", device.region_read(CONFIG_REGION_INDEX, offset, 4))[0]
    return value


def find_capability(device: VfioDevice, cap_id: int) -> int | None:
    """Config offset of the standard capability ``cap_id``, like ``pci_find_capability``.

    None when the status register has no capability list or the list has no such entry.
    The walk stops below the standard header, at an 0xFF id and after the kernel's 48 hops.
    """
    status = struct.unpack("<H", device.region_read(CONFIG_REGION_INDEX, PCI_STATUS, 2))[0]
    if not status & PCI_STATUS_CAP_LIST:
        return None
    offset = device.region_read(CONFIG_REGION_INDEX, PCI_CAPABILITY_LIST, 1)[0]
    for _ in range(PCI_FIND_CAP_TTL):
        if offset < PCI_STD_HEADER_SIZEOF:
            return None
        offset &= ~3
        entry = device.region_read(CONFIG_REGION_INDEX, offset, 2)
        if entry[0] == 0xFF:
            return None
        if entry[0] == cap_id:
            return offset
        offset = entry[1]
    return None


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
        offset = header >> 20 & PCI_EXT_CAP_NEXT_MASK
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


def find_cxl_dvsec(device: VfioDevice) -> int | None:
    """``cxl_dvsec`` (spec nvgrace-gpu.md §2.3): the CXL Device DVSEC's offset, or None.

    The kernel stores 0 for "absent"; None is the Python spelling of that.
    """
    return find_dvsec(device, PCI_VENDOR_ID_CXL, PCI_DVSEC_CXL_DEVICE)


def cxl_status(device: VfioDevice, cxl_dvsec: int) -> int:
    """Range 1 Size Low of the CXL DVSEC; ``DeviceError(ENODEV)`` when it reads all-ones.

    All-ones is what a config read returns when the device has dropped off the bus, so the
    driver reports the device as gone instead of waiting for it (§7.3 "Test").
    """
    status = _config_u32(device, cxl_dvsec + PCI_DVSEC_CXL_RANGE_SIZE_LOW0)
    if status == CXL_STATUS_GONE:
        raise DeviceError(errno.ENODEV, "CXL DVSEC reads all-ones: the GPU is gone")
    return status


def cxl_status_ready(status: int) -> bool:
    """Both MEM_INFO_VALID and MEM_ACTIVE set (§7.3); the caller has ruled out all-ones."""
    ready = CXL_MEM_INFO_VALID | CXL_MEM_ACTIVE
    return status & ready == ready


def cxl_active_timeout(status: int) -> float:
    """Seconds the Memory_Active_Timeout field of ``status`` allows: 1 s * 4^min(t, 4) (§7.3)."""
    code = status >> CXL_MEM_ACTIVE_TIMEOUT_SHIFT & CXL_MEM_ACTIVE_TIMEOUT_MASK
    return float(4 ** min(code, CXL_MEM_ACTIVE_TIMEOUT_MAX_CODE))


def cxl_device_ready(device: VfioDevice, cxl_dvsec: int) -> bool:
    """The CXL readiness test (§7.3): True for 0, False for -EAGAIN, ENODEV raised."""
    return cxl_status_ready(cxl_status(device, cxl_dvsec))


def device_ready(device: VfioDevice) -> bool:
    """One readiness test on whichever path the device selects (§2.3): CXL or BAR0.

    Looks the CXL DVSEC up on every call, so callers that only hold the device (the
    daemon's ``BuiltDevice.ready_now``) get the same answer as the variant, which looked it
    up once at construction. Raises ``DeviceError(ENODEV)`` on the CXL path when the
    register reads all-ones.
    """
    cxl_dvsec = find_cxl_dvsec(device)
    if cxl_dvsec is not None:
        return cxl_device_ready(device, cxl_dvsec)
    return bar0_device_ready(device)


def bar0_device_ready(device: VfioDevice) -> bool:
    """One legacy readiness test: both BAR0 registers read exactly 0xFF with 32-bit reads (§7.1)."""
    for offset in (C2C_LINK_BAR0_OFFSET, HBM_TRAINING_BAR0_OFFSET):
        raw = device.region_read(BAR0_REGION_INDEX, offset, 4)
        if struct.unpack("<I", raw)[0] != STATUS_READY:
            return False
    return True


class ReadinessWait:
    """The probe-time poll of spec nvgrace-gpu.md §7.1-§7.2, driven by the caller.

    Usage from the async daemon (:func:`probe_wait` builds this one, over
    :func:`bar0_device_ready`, for a device without a CXL DVSEC)::

        wait = ReadinessWait(lambda: bar0_device_ready(backend))
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


class CxlReadinessWait:
    """The CXL probe-time wait of spec nvgrace-gpu.md §7.3, driven by the caller.

    Same interface as :class:`ReadinessWait`. The deadline starts as now + 1 s: the device
    must at least report its memory info as valid by then. The first poll that sees
    MEM_INFO_VALID moves it to that moment + the Memory_Active_Timeout the same register
    advertises (1 s to 256 s), once -- later polls never move it again. :meth:`poll` raises
    ``DeviceError(ETIME)`` once a not-ready test happens at or after the deadline and
    ``DeviceError(ENODEV)`` when the register reads all-ones. Like :class:`ReadinessWait`,
    the test comes before the deadline check, so the last test runs at the deadline. The
    variant's post-reset gate reuses this machine with one test per access (§7.4).
    """

    def __init__(
        self,
        device: VfioDevice,
        cxl_dvsec: int,
        *,
        clock: Callable[[], float] = time.monotonic,
        quantum: float = POLL_QUANTUM,
    ) -> None:
        self._device = device
        self._cxl_dvsec = cxl_dvsec
        self._clock = clock
        self._quantum = quantum
        self.started = clock()
        self.deadline = self.started + CXL_MEM_INFO_VALID_TIMEOUT
        self.valid_seen = False
        self.polls = 0

    def poll(self) -> float | None:
        """Test once; see the class docstring."""
        self.polls += 1
        status = cxl_status(self._device, self._cxl_dvsec)
        if cxl_status_ready(status):
            return None
        now = self._clock()
        if not self.valid_seen and status & CXL_MEM_INFO_VALID:
            # §7.3 wait step 2: the memory-active budget starts when VALID is first seen.
            self.valid_seen = True
            self.deadline = now + cxl_active_timeout(status)
        if now >= self.deadline:
            if self.valid_seen:
                raise DeviceError(errno.ETIME, "CXL DVSEC: memory never became active")
            raise DeviceError(errno.ETIME, "CXL DVSEC: memory info never became valid")
        return min(self._quantum, self.deadline - now)


class ProbeWait(Protocol):
    """What :func:`probe_wait` returns: either wait, polled the same way."""

    polls: int
    deadline: float

    def poll(self) -> float | None:
        """None once ready, else seconds to sleep; ``DeviceError`` (ETIME, ENODEV) to fail."""


def probe_wait(device: VfioDevice, *, clock: Callable[[], float] = time.monotonic) -> ProbeWait:
    """The readiness wait the v7.2 probe runs for ``device`` (spec nvgrace-gpu.md §2.4 3-4).

    With a CXL Device DVSEC: :class:`CxlReadinessWait` (§7.3, up to 1 s + 256 s). Without:
    :class:`ReadinessWait` over the BAR0 registers (§7.1-§7.2, 30 s). Both the full variant
    and the fallback (§8) run it on the raw backend, before the device is served.
    """
    cxl_dvsec = find_cxl_dvsec(device)
    if cxl_dvsec is not None:
        return CxlReadinessWait(device, cxl_dvsec, clock=clock)
    return ReadinessWait(lambda: bar0_device_ready(device), clock=clock)
