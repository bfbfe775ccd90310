"""The nvgrace-gpu variant: memory layout, fake BAR2/BAR4 and their config registers."""

from vgpud.variant.format import format_layout, layout_as_dict
from vgpud.variant.layout import (
    MEMBLK_SIZE,
    RESMEM_SIZE,
    LayoutError,
    MemRegion,
    NvgraceLayout,
    compute_layout,
)
from vgpud.variant.probe import (
    POLL_QUANTUM,
    POLL_TIMEOUT,
    ReadinessWait,
    device_ready,
    has_mig_hw_bug,
)
from vgpud.variant.variant import NvgraceVariant, make_device

__all__ = [
    "MEMBLK_SIZE",
    "POLL_QUANTUM",
    "POLL_TIMEOUT",
    "RESMEM_SIZE",
    "LayoutError",
    "MemRegion",
    "NvgraceLayout",
    "NvgraceVariant",
    "ReadinessWait",
    "compute_layout",
    "device_ready",
    "format_layout",
    "has_mig_hw_bug",
    "layout_as_dict",
    "make_device",
]
