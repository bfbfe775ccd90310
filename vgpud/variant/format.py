"""Human and JSON renderings of an :class:`~vgpud.variant.layout.NvgraceLayout`.

``vgpud layout`` prints these: the kernel-exact BAR layout for a profile and memory size.
"""

from __future__ import annotations

from typing import Any

from vgpud.variant.layout import MemRegion, NvgraceLayout, masked_bar

_UNITS = (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10))


def human_size(n: int) -> str:
    """``96 GiB``, ``94.5 GiB``, ``1.25 GiB``, ``512 B``; up to three decimals."""
    for unit, scale in _UNITS:
        if n >= scale:
            text = f"{n / scale:.3f}".rstrip("0").rstrip(".")
            return f"{text} {unit}"
    return f"{n} B"


def _region_dict(index: int, name: str, region: MemRegion, memphys: int) -> dict[str, Any]:
    return {
        "name": name,
        "region_index": index,
        "config_offset": 0x10 + 4 * index,
        "memphys": region.memphys,
        "offset": region.memphys - memphys,
        "memlength": region.memlength,
        "bar_size": region.bar_size,
        "mmappable": [{"offset": 0, "size": region.memlength}],
        "trapped_tail": region.bar_size - region.memlength,
        "sizing_readback": masked_bar((1 << 64) - 1, region.bar_size),
    }


def layout_as_dict(layout: NvgraceLayout, **extra: Any) -> dict[str, Any]:
    """A JSON-ready description; ``extra`` (e.g. ``profile="gh200"``) is merged in first."""
    regions = [_region_dict(4, "usemem", layout.usemem, layout.memphys)]
    if layout.resmem is not None:
        regions.insert(0, _region_dict(2, "resmem", layout.resmem, layout.memphys))
    return {
        **extra,
        "memphys": layout.memphys,
        "memlength": layout.memlength,
        "has_mig_hw_bug": layout.has_mig_hw_bug,
        "bar2": "resmem" if layout.resmem is not None else "backend BAR1 (passthrough)",
        "regions": regions,
    }


def format_layout(layout: NvgraceLayout, *, title: str | None = None) -> str:
    """A small table: one row per faked BAR plus the device memory it covers."""
    lines = [title] if title else []
    size = human_size(layout.memlength)
    lines.append(f"device memory  {layout.memphys:#x} + {layout.memlength:#x} ({size})")
    if layout.has_mig_hw_bug:
        lines.append("MIG hw bug     yes (Hopper): 1 GiB resmem carve-out at the tail")
    else:
        lines.append("MIG hw bug     no (Blackwell): BAR2 is the GPU's own BAR1")
    header = f"{'region':<10}{'memphys':>18}{'memlength':>22}{'bar_size':>12}{'trapped tail':>14}"
    lines += [header, "-" * len(header)]
    for name, region in (("2 resmem", layout.resmem), ("4 usemem", layout.usemem)):
        if region is None:
            continue
        tail = region.bar_size - region.memlength
        lines.append(
            f"{name:<10}{region.memphys:>#18x}{region.memlength:>#22x}"
            f"{human_size(region.bar_size):>12}{human_size(tail):>14}"
        )
    return "\n".join(lines) + "\n"
