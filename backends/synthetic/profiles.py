"""Named Grace GPU profiles: PCI identity, device memory and DVSEC bits per product.

Device IDs are the kernel's table (spec nvgrace-gpu.md §1). Memory sizes are the HBM of the
product (GH200: 96 GiB HBM3 or 144 GiB HBM3e; GB200 ~186 GiB; GB300 ~279 GiB); real firmware
reports a little less than the marketing size, and ``with_overrides(memory_size=...)`` lets a
config file say exactly what a host reports.

Not verified against hardware, chosen and documented here:

* subsystem IDs: 0x10DE:0x16C1 for gh200 is what the positive-control capture presented
  (captures/README.md); the others are distinct values in NVIDIA's 0x1xxx subsystem range,
  not copied from a real board.
* ``boot0`` (BAR0 offset 0, PMC_BOOT_0-like): architecture in bits 24-28 (0x18 Hopper,
  0x1A Blackwell) and revision 0xA1 in the low byte, modelled on how nouveau decodes it.
* ``memphys``: 0x4000_0000_0000, where GH200 firmware places socket 0's GPU memory; per
  device configs may override it (a 4-GPU tray has one base per GPU).
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass
from typing import Any

GIB = 1 << 30
MIB = 1 << 20

NVIDIA_VENDOR_ID = 0x10DE

# Bit 0 of the NVIDIA DVSEC bitmap: MIG works with cached resmem, i.e. no MIG hardware bug
# (spec nvgrace-gpu.md §2.2).
MIG_SUPPORTED_WITH_CACHED_RESMEM = 1 << 0


class Architecture(enum.Enum):
    """GPU generation; decides the MIG hardware bug (spec nvgrace-gpu.md §2.2)."""

    HOPPER = "hopper"
    BLACKWELL = "blackwell"


@dataclass(frozen=True, slots=True)
class Profile:
    """Everything that distinguishes one synthetic Grace GPU from another."""

    name: str
    device_id: int
    architecture: Architecture
    memory_size: int
    memphys: int = 0x4000_0000_0000
    subsystem_vendor_id: int = NVIDIA_VENDOR_ID
    subsystem_id: int = 0x16C1
    revision: int = 0xA1
    boot0: int = 0x180000A1
    # None: no NVIDIA DVSEC at all (the variant then assumes the MIG bug, §2.2 step 4).
    dvsec_bitmap: int | None = 0
    # The GPU's real BAR1 (regions 2/3 of the raw device); modest so tests can mmap it.
    bar1_size: int = 64 * MIB
    # 0: no MSI-X at all (capability, irq index, table): a QEMU 11.1.3 that aborts on
    # hot-unplug of a device with MSI-X (captures README fact 14) can then unplug it.
    msix_vectors: int = 16
    msi_vectors: int = 16
    # A CXL Device DVSEC in the extended capability list (spec nvgrace-gpu.md §2.3): the
    # v7.2 driver then takes readiness from its Range 1 Size Low register instead of BAR0
    # (§7.3). The kernel keys this on the capability, not the device ID, and the IDs of
    # the "Blackwell-Next" parts it was written for are unknown, so no named profile has it;
    # enable it with ``with_overrides(cxl_dvsec=True)``.
    cxl_dvsec: bool = False
    # Memory_Active_Timeout (Range 1 Size Low bits 15:13) the CXL DVSEC advertises: code t
    # means 1 s * 4^min(t, 4) (§7.3). 3 = 64 s, the first code that covers the legacy 30 s
    # BAR0 budget, so a ``ready_delay`` that works on the BAR0 path also works here.
    cxl_mem_active_timeout: int = 3

    def __post_init__(self) -> None:
        for name in ("device_id", "subsystem_vendor_id", "subsystem_id"):
            value = getattr(self, name)
            if not 0 <= value <= 0xFFFF:
                raise ValueError(f"{name} {value:#x} is not a 16-bit PCI id")
        if not 0 <= self.revision <= 0xFF:
            raise ValueError(f"revision {self.revision:#x} is not a byte")
        if self.memory_size < 0:
            raise ValueError(f"memory_size must not be negative: {self.memory_size}")
        if self.memphys < 0 or self.memphys + self.memory_size > 1 << 64:
            raise ValueError(f"memphys {self.memphys:#x} + size does not fit 64 bits")
        if self.bar1_size < 4096 or self.bar1_size & (self.bar1_size - 1):
            raise ValueError(f"bar1_size {self.bar1_size:#x} must be a power of two >= 4 KiB")
        if not 0 <= self.msix_vectors <= 2048:
            raise ValueError(f"msix_vectors {self.msix_vectors} outside 0..2048")
        if self.msi_vectors not in (1, 2, 4, 8, 16, 32):
            raise ValueError(f"msi_vectors {self.msi_vectors} is not a power of two <= 32")
        if self.dvsec_bitmap is not None and not 0 <= self.dvsec_bitmap <= 0xFFFF:
            raise ValueError(f"dvsec_bitmap {self.dvsec_bitmap:#x} is not 16 bits")
        if not 0 <= self.cxl_mem_active_timeout <= 7:
            # A 3-bit field: 5-7 are valid encodings (the driver clamps them), 8+ are not.
            raise ValueError(f"cxl_mem_active_timeout {self.cxl_mem_active_timeout} outside 0..7")

    @property
    def has_mig_hw_bug(self) -> bool:
        """What the variant will conclude from the DVSEC (spec nvgrace-gpu.md §2.2)."""
        bitmap = self.dvsec_bitmap
        return bitmap is None or not bitmap & MIG_SUPPORTED_WITH_CACHED_RESMEM

    def with_overrides(self, **changes: Any) -> Profile:
        """A copy with some fields replaced (validated like a new profile)."""
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ValueError(f"unknown profile field(s): {', '.join(sorted(unknown))}")
        return dataclasses.replace(self, **changes)


_BLACKWELL_BITMAP = MIG_SUPPORTED_WITH_CACHED_RESMEM

PROFILES: dict[str, Profile] = {
    p.name: p
    for p in (
        Profile("gh200", 0x2342, Architecture.HOPPER, 96 * GIB),
        Profile("gh200-480g", 0x2345, Architecture.HOPPER, 144 * GIB, subsystem_id=0x1809),
        Profile("gh200-sku", 0x2348, Architecture.HOPPER, 144 * GIB, subsystem_id=0x18B0),
        Profile(
            "gb200",
            0x2941,
            Architecture.BLACKWELL,
            186 * GIB,
            subsystem_id=0x2046,
            boot0=0x1A0000A1,
            dvsec_bitmap=_BLACKWELL_BITMAP,
        ),
        Profile(
            "gb300",
            0x31C2,
            Architecture.BLACKWELL,
            279 * GIB,
            subsystem_id=0x21A6,
            boot0=0x1A1000A1,
            dvsec_bitmap=_BLACKWELL_BITMAP,
        ),
    )
}


def get_profile(name: str) -> Profile:
    """The profile called ``name``; ValueError listing the known names otherwise."""
    try:
        return PROFILES[name]
    except KeyError:
        known = ", ".join(sorted(PROFILES))
        raise ValueError(f"unknown profile {name!r} (known: {known})") from None
