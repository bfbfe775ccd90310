"""BAR0 of the synthetic GPU: a 16 MiB trapped register file.

Register map (offsets in BAR0)::

    0x000000  BOOT_0       RO  chip id per profile (PMC_BOOT_0-like)
    0x001498  C2C_LINK     RO  0xFF once the NVLink-C2C link is up  (spec nvgrace-gpu.md §7.1)
    0x002000  MSI-X table  RW  16 bytes per vector (QEMU emulates it; kept for region access)
    0x003000  MSI-X PBA    RO  pending bits
    0x0200BC  HBM_TRAINING RO  0xFF once HBM training finished       (spec nvgrace-gpu.md §7.1)
    0xFF0000  DOORBELL     WO  writing N raises interrupt vector N (reads 0)
    0xFF0004  INTX_STATUS  RW1C bit 0: INTx asserted; writing 1 drops the line
    0xFF1000  SCRATCH      RW  4 KiB of plain storage
    anything else reads 0, writes are ignored

DOORBELL, INTX_STATUS and SCRATCH are vgpud's own (a synthetic block at the top of BAR0, far
from NVIDIA's engines): they let tests and guest programs make the device interrupt.

Readiness: after creation and after every reset the two readiness registers read 0 until
``ready_delay`` seconds have passed on the injected monotonic clock, so probe-time and
post-reset timeouts can be tested without sleeping. ``ready_delay`` 0 means ready at once.
The same :class:`Readiness` drives the CXL DVSEC's MEM_INFO_VALID / MEM_ACTIVE bits when the
profile has one (spec nvgrace-gpu.md §7.3; see :mod:`backends.synthetic.capabilities`):
ACTIVE is :attr:`Readiness.ready`, VALID is :attr:`Readiness.valid`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from backends.synthetic.capabilities import (
    MSIX_ENTRY_SIZE,
    MSIX_PBA_OFFSET,
    MSIX_TABLE_OFFSET,
)
from backends.synthetic.irq import InterruptController

BAR0_SIZE = 16 << 20

BOOT_0 = 0x000000
C2C_LINK_BAR0_OFFSET = 0x1498
HBM_TRAINING_BAR0_OFFSET = 0x200BC
STATUS_READY = 0xFF
DOORBELL = 0xFF0000
INTX_STATUS = 0xFF0004
SCRATCH = 0xFF1000
SCRATCH_SIZE = 0x1000

Clock = Callable[[], float]


# When MEM_INFO_VALID comes up after creation or reset unless told otherwise: well inside the
# driver's 1 s VALID budget (spec nvgrace-gpu.md §7.3 wait step 1), and never after ACTIVE.
DEFAULT_VALID_DELAY = 0.25


class Readiness:
    """When the device reads ready: BAR0 registers :data:`STATUS_READY`, CXL VALID/ACTIVE."""

    __slots__ = ("_clock", "armed_at", "delay", "valid_delay")

    def __init__(self, clock: Clock, delay: float, valid_delay: float | None = None) -> None:
        if delay < 0 or math.isnan(delay):
            raise ValueError(f"ready_delay must be >= 0, got {delay}")
        if valid_delay is None:
            valid_delay = min(delay, DEFAULT_VALID_DELAY)
        if valid_delay < 0 or math.isnan(valid_delay):
            raise ValueError(f"valid_delay must be >= 0, got {valid_delay}")
        self._clock = clock
        self.delay = delay
        self.valid_delay = valid_delay
        # When the current training period began, on ``clock`` (public: a live upgrade
        # carries it into the next process).
        self.armed_at = clock()

    def arm(self) -> None:
        """Start a new training period (creation, reset)."""
        self.armed_at = self._clock()

    @property
    def ready(self) -> bool:
        """Whether the training period is over (BAR0 registers 0xFF, CXL MEM_ACTIVE)."""
        return self._clock() >= self.armed_at + self.delay

    @property
    def valid(self) -> bool:
        """Whether the CXL memory range info is valid yet (MEM_INFO_VALID, spec §7.3)."""
        return self._clock() >= self.armed_at + self.valid_delay


class Bar0:
    """The register file; region 0 of the raw device."""

    def __init__(
        self, boot0: int, readiness: Readiness, irqs: InterruptController, msix_vectors: int
    ) -> None:
        self._boot0 = boot0
        self.readiness = readiness
        self._irqs = irqs
        self._table_end = MSIX_TABLE_OFFSET + msix_vectors * MSIX_ENTRY_SIZE
        self._pba_end = MSIX_PBA_OFFSET + 8 * ((msix_vectors + 63) // 64)
        self.scratch = bytearray(SCRATCH_SIZE)

    def reset(self) -> None:
        """Function reset: registers back to defaults, link and HBM re-train."""
        self.scratch[:] = bytes(SCRATCH_SIZE)
        self.readiness.arm()

    def read(self, offset: int, count: int) -> bytes:
        """Read ``count`` bytes; the caller has bounds-checked against :data:`BAR0_SIZE`."""
        out = bytearray()
        pos, end = offset, offset + count
        while pos < end:
            base = pos & ~3
            take = min(end, base + 4) - pos
            value = self._read_dword(base).to_bytes(4, "little")
            out += value[pos - base : pos - base + take]
            pos += take
        return bytes(out)

    def write(self, offset: int, data: bytes) -> None:
        """Write ``data``; read-only and unimplemented registers ignore it."""
        pos, end = offset, offset + len(data)
        while pos < end:
            base = pos & ~3
            take = min(end, base + 4) - pos
            chunk = bytearray(4)
            chunk[pos - base : pos - base + take] = data[pos - offset : pos - offset + take]
            mask = ((1 << (8 * take)) - 1) << (8 * (pos - base))
            self._write_dword(base, int.from_bytes(chunk, "little"), mask)
            pos += take

    def _read_dword(self, addr: int) -> int:
        if MSIX_TABLE_OFFSET <= addr < self._table_end:
            at = addr - MSIX_TABLE_OFFSET
            return int.from_bytes(self._irqs.msix_table[at : at + 4], "little")
        if MSIX_PBA_OFFSET <= addr < self._pba_end:
            return (self._irqs.msix_pending >> (8 * (addr - MSIX_PBA_OFFSET))) & 0xFFFFFFFF
        if SCRATCH <= addr < SCRATCH + SCRATCH_SIZE:
            at = addr - SCRATCH
            return int.from_bytes(self.scratch[at : at + 4], "little")
        if addr == BOOT_0:
            return self._boot0
        if addr in (C2C_LINK_BAR0_OFFSET, HBM_TRAINING_BAR0_OFFSET):
            return STATUS_READY if self.readiness.ready else 0
        if addr == INTX_STATUS:
            return int(self._irqs.intx_asserted)
        return 0

    def _write_dword(self, addr: int, value: int, mask: int) -> None:
        if MSIX_TABLE_OFFSET <= addr < self._table_end:
            at = addr - MSIX_TABLE_OFFSET
            old = int.from_bytes(self._irqs.msix_table[at : at + 4], "little")
            new = (old & ~mask) | (value & mask)
            self._irqs.msix_table[at : at + 4] = new.to_bytes(4, "little")
            self._irqs.config_written()  # an unmask may release a pending vector
        elif SCRATCH <= addr < SCRATCH + SCRATCH_SIZE:
            at = addr - SCRATCH
            old = int.from_bytes(self.scratch[at : at + 4], "little")
            new = (old & ~mask) | (value & mask)
            self.scratch[at : at + 4] = new.to_bytes(4, "little")
        elif addr == DOORBELL:
            self._irqs.raise_vector(value & mask)
        elif addr == INTX_STATUS and value & mask & 1:
            self._irqs.intx_ack()
