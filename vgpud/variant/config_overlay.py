"""The emulated BAR2/3 (resmem) and BAR4/5 (usemem) config registers, spec nvgrace-gpu.md §4.

Each faked region has a 64-bit little-endian ``bar_val``. Accesses to config bytes 0x18-0x27
go through :class:`BarOverlay`; everything else is the backend's.

Two kernel details are kept on purpose (spec §4.3-§4.4):

* The register is picked by an if/else chain: a request that touches [0x18, 0x20) picks
  resmem -- even when there is no resmem (Blackwell), in which case nothing is emulated for
  that request, not even its BAR4 bytes. Only a request that misses BAR2/3 can pick usemem.
* A write that straddles a register edge only changes the intersecting bytes of
  ``bar_val``. The kernel returns that as a short write and the remaining bytes never reach
  the device. A vfio-user REGION_WRITE has no short count (QEMU ignores the reply's count,
  spec vfio-user.md §3.9), so the remaining bytes are dropped silently here too.
"""

from __future__ import annotations

from dataclasses import dataclass

from vgpud.variant.layout import MemRegion, masked_bar

PCI_BASE_ADDRESS_2 = 0x18
PCI_BASE_ADDRESS_4 = 0x20
BAR_REGISTER_SIZE = 8
# The config bytes whose reads this overlay may change: (offset, length).
EMULATED_CONFIG = (PCI_BASE_ADDRESS_2, PCI_BASE_ADDRESS_4 + BAR_REGISTER_SIZE - PCI_BASE_ADDRESS_2)


@dataclass(frozen=True, slots=True)
class Intersection:
    """``count`` bytes at ``buf_offset`` of the access land at ``reg_offset`` of the register."""

    buf_offset: int
    reg_offset: int
    count: int


def intersect(
    buf_start: int, buf_count: int, reg_start: int, reg_count: int
) -> Intersection | None:
    """``vfio_pci_core_range_intersect_range`` (spec nvgrace-gpu.md §4.2)."""
    buf_end = buf_start + buf_count
    reg_end = reg_start + reg_count
    if buf_start <= reg_start < buf_end:
        return Intersection(reg_start - buf_start, 0, min(reg_count, buf_end - reg_start))
    if reg_start <= buf_start < reg_end:
        return Intersection(0, buf_start - reg_start, min(buf_count, reg_end - buf_start))
    return None


class FakeBar:
    """One emulated 64-bit BAR register: its region and ``bar_val``."""

    __slots__ = ("bar_val", "region")

    def __init__(self, region: MemRegion) -> None:
        self.region = region
        self.bar_val = 0

    def read(self) -> bytes:
        """The 8 register bytes: ``(bar_val & ~(bar_size-1)) | 0xC`` (§4.3 step 4)."""
        return masked_bar(self.bar_val, self.region.bar_size).to_bytes(BAR_REGISTER_SIZE, "little")


class BarOverlay:
    """Both fake BARs and the §4.3/§4.4 access rules."""

    def __init__(self, usemem: MemRegion, resmem: MemRegion | None) -> None:
        self.usemem = FakeBar(usemem)
        self.resmem = FakeBar(resmem) if resmem is not None else None

    def clear(self) -> None:
        """``bar_val = 0`` for both (open and VFIO_DEVICE_RESET, §4.7)."""
        self.usemem.bar_val = 0
        if self.resmem is not None:
            self.resmem.bar_val = 0

    def _pick(self, offset: int, count: int) -> tuple[FakeBar, Intersection] | None:
        hit = intersect(offset, count, PCI_BASE_ADDRESS_2, BAR_REGISTER_SIZE)
        if hit is not None:
            # The if/else chain: BAR2/3 wins even when resmem does not exist (§4.3 step 3).
            return (self.resmem, hit) if self.resmem is not None else None
        hit = intersect(offset, count, PCI_BASE_ADDRESS_4, BAR_REGISTER_SIZE)
        if hit is not None:
            return self.usemem, hit
        return None

    def touches(self, offset: int, count: int) -> bool:
        """Whether the access is (partly) emulated here."""
        return self._pick(offset, count) is not None

    def patch_read(self, offset: int, data: bytearray) -> None:
        """Overwrite the emulated bytes of a config read the backend already served (§4.3)."""
        picked = self._pick(offset, len(data))
        if picked is None:
            return
        bar, hit = picked
        value = bar.read()
        data[hit.buf_offset : hit.buf_offset + hit.count] = value[
            hit.reg_offset : hit.reg_offset + hit.count
        ]

    def write(self, offset: int, data: bytes) -> bool:
        """Store the intersecting bytes verbatim in ``bar_val`` (§4.4).

        Returns False when the write is not emulated and must go to the backend. When it
        returns True the bytes outside the register are dropped (see the module docstring).
        """
        picked = self._pick(offset, len(data))
        if picked is None:
            return False
        bar, hit = picked
        raw = bytearray(bar.bar_val.to_bytes(BAR_REGISTER_SIZE, "little"))
        raw[hit.reg_offset : hit.reg_offset + hit.count] = data[
            hit.buf_offset : hit.buf_offset + hit.count
        ]
        bar.bar_val = int.from_bytes(raw, "little")
        return True
