"""The usemem/resmem carve-up of device memory, exactly as the kernel computes it.

Spec nvgrace-gpu.md §3.2 is the authority; the formulas below are kept in its order so the
two can be read side by side. Everything is unsigned 64-bit arithmetic in the kernel
(``phys_addr_t``/``size_t`` on arm64); where the kernel would overflow or underflow it fails
probe with an errno, and :class:`LayoutError` carries that errno.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass

MIB = 1 << 20
GIB = 1 << 30
U64_MAX = (1 << 64) - 1

# "Hardwired ABI between GPU FW and VFIO driver" (spec nvgrace-gpu.md §3.1).
MEMBLK_SIZE = 512 * MIB
# The resmem carve-out, only when the MIG hardware bug is present (§3.1: plain SZ_1G).
RESMEM_SIZE = 1 * GIB
# The low nibble of an emulated BAR: 64-bit (0x4) | prefetchable (0x8) (§3.4).
BAR_FLAGS = 0xC


class LayoutError(ValueError):
    """The kernel would fail probe for this memory description; ``errno`` says how."""

    def __init__(self, errno_: int, message: str) -> None:
        super().__init__(message)
        self.errno = errno_


@dataclass(frozen=True, slots=True)
class MemRegion:
    """One faked BAR: ``memlength`` real bytes at ``memphys``, reported as ``bar_size``."""

    memphys: int
    memlength: int
    bar_size: int


@dataclass(frozen=True, slots=True)
class NvgraceLayout:
    """The result of §3.2 for one device. ``resmem`` is None without the MIG bug (§3.3)."""

    memphys: int
    memlength: int
    has_mig_hw_bug: bool
    usemem: MemRegion
    resmem: MemRegion | None


def roundup_pow2(n: int) -> int:
    """The kernel's ``roundup_pow_of_two`` for ``n >= 1``; EOVERFLOW past 64 bits.

    The kernel leaves ``n == 0`` and results beyond ``unsigned long`` undefined; both are
    refused here instead (the callers never reach them for sizes that pass §3.2's checks,
    except a memlength above 2^63, which cannot be a BAR).
    """
    if n < 1:
        raise LayoutError(errno.EINVAL, "roundup_pow_of_two(0) is undefined")
    result = 1 << (n - 1).bit_length()
    if result > U64_MAX:
        raise LayoutError(errno.EOVERFLOW, f"{n:#x} rounds up beyond 64 bits")
    return result


def compute_layout(memphys: int, memlength: int, has_mig_hw_bug: bool) -> NvgraceLayout:
    """Spec nvgrace-gpu.md §3.2, step by step.

    Raises :class:`LayoutError`:

    * ENOMEM for ``memlength`` 0 (firmware's "C2C link failed", §2.1 -- the daemon treats
      this as "no device memory" and falls back before ever calling this);
    * EOVERFLOW for values that do not fit 64 bits (§2.1), for ``memlength`` smaller than
      the resmem carve-out, and when ``resmem.memphys`` overflows;
    * EINVAL when usemem rounds down to nothing (1 GiB <= memlength < 1.5 GiB on Hopper).
    """
    if not 0 <= memphys <= U64_MAX:
        raise LayoutError(errno.EOVERFLOW, f"memphys {memphys:#x} does not fit phys_addr_t")
    if not 0 <= memlength <= U64_MAX:
        raise LayoutError(errno.EOVERFLOW, f"memlength {memlength:#x} does not fit size_t")
    if memlength == 0:
        raise LayoutError(errno.ENOMEM, "firmware reports no device memory")

    resmem_size = RESMEM_SIZE if has_mig_hw_bug else 0
    usemem_memlength = memlength - resmem_size
    if usemem_memlength < 0:
        raise LayoutError(
            errno.EOVERFLOW,
            f"memlength {memlength:#x} is smaller than the {resmem_size:#x} resmem carve-out",
        )
    if usemem_memlength == 0:
        # The kernel computes roundup_pow_of_two(0) here (undefined) and then fails with
        # EINVAL below; skip straight to the failure.
        raise LayoutError(errno.EINVAL, "no usemem left after the resmem carve-out")
    # NB: bar_size comes from the value *before* the 512 MiB round-down (§3.2).
    usemem_bar_size = roundup_pow2(usemem_memlength)

    if not has_mig_hw_bug:
        usemem = MemRegion(memphys, usemem_memlength, usemem_bar_size)
        return NvgraceLayout(memphys, memlength, False, usemem, None)

    usemem_memlength -= usemem_memlength % MEMBLK_SIZE
    if usemem_memlength == 0:
        raise LayoutError(
            errno.EINVAL, f"usemem of memlength {memlength:#x} rounds down to 0 (512 MiB blocks)"
        )
    resmem_memphys = memphys + usemem_memlength
    if resmem_memphys > U64_MAX:
        raise LayoutError(errno.EOVERFLOW, f"resmem base {resmem_memphys:#x} overflows")
    resmem_memlength = memlength - usemem_memlength
    resmem = MemRegion(resmem_memphys, resmem_memlength, roundup_pow2(resmem_memlength))
    usemem = MemRegion(memphys, usemem_memlength, usemem_bar_size)
    return NvgraceLayout(memphys, memlength, True, usemem, resmem)


def masked_bar(bar_val: int, bar_size: int) -> int:
    """What the emulated 64-bit BAR reads: ``(bar_val & ~(bar_size-1)) | 0xC`` (§4.3)."""
    return ((bar_val & ~(bar_size - 1)) | BAR_FLAGS) & U64_MAX
