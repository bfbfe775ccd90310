"""The `vgpud layout` renderings."""

from __future__ import annotations

import json

from vgpud.variant import compute_layout, format_layout, layout_as_dict
from vgpud.variant.format import human_size
from vgpud.variant.layout import GIB, MIB


def test_human_size() -> None:
    assert human_size(96 * GIB) == "96 GiB"
    assert human_size(94 * GIB + 512 * MIB) == "94.5 GiB"
    assert human_size(512) == "512 B"
    assert human_size(1 << 40) == "1 TiB"


def test_hopper_table_and_dict() -> None:
    layout = compute_layout(0x4000_0000_0000, 95 * GIB + 768 * MIB, True)
    text = format_layout(layout, title="gh200")
    assert text.startswith("gh200\n")
    assert "2 resmem" in text and "4 usemem" in text and "128 GiB" in text and "2 GiB" in text
    data = layout_as_dict(layout, profile="gh200")
    assert json.loads(json.dumps(data)) == data
    assert data["profile"] == "gh200" and data["has_mig_hw_bug"] is True
    resmem, usemem = data["regions"]
    assert (resmem["region_index"], resmem["memlength"], resmem["bar_size"]) == (
        2,
        GIB + 256 * MIB,
        2 * GIB,
    )
    assert usemem["offset"] == 0 and usemem["trapped_tail"] == 128 * GIB - usemem["memlength"]
    assert resmem["sizing_readback"] == 0xFFFF_FFFF_8000_000C


def test_blackwell_table() -> None:
    layout = compute_layout(0x4000_0000_0000, 186 * GIB, False)
    text = format_layout(layout)
    assert "2 resmem" not in text and "4 usemem" in text and "256 GiB" in text
    data = layout_as_dict(layout)
    assert [r["name"] for r in data["regions"]] == ["usemem"]
    assert data["bar2"].startswith("backend BAR1")
