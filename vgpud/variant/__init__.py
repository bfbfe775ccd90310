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
    CxlReadinessWait,
    ProbeWait,
    ReadinessWait,
    device_ready,
    find_cxl_dvsec,
    has_mig_hw_bug,
    probe_wait,
)
from vgpud.variant.variant import NvgraceVariant, make_device

__all__ = [
    "MEMBLK_SIZE",
    "POLL_QUANTUM",
    "POLL_TIMEOUT",
    "RESMEM_SIZE",
    "CxlReadinessWait",
    "LayoutError",
    "MemRegion",
    "NvgraceLayout",
    "NvgraceVariant",
    "ProbeWait",
    "ReadinessWait",
    "compute_layout",
    "device_ready",
    "find_cxl_dvsec",
    "format_layout",
    "has_mig_hw_bug",
    "layout_as_dict",
    "make_device",
    "probe_wait",
]
