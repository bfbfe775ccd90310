"""What the guest must see: the kernel's layout formulas (spec nvgrace-gpu.md §3.2), written
again here, independently of vgpud, as the tests' oracle; plus vgpud's own ``layout --json``
for what only vgpud knows (backing file names and offsets, the real BAR1 of Blackwell).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

GIB = 1 << 30
MEMBLK = 512 << 20
BAR1_SIZE = 64 << 20  # the synthetic GPU's real BAR1 (backends/synthetic/profiles.py)
NVIDIA = 0x10DE

# profile -> (device id, has_mig_hw_bug) — spec nvgrace-gpu.md §1, §2.2
PROFILES: dict[str, tuple[int, bool]] = {
    "gh200": (0x2342, True),
    "gh200-480g": (0x2345, True),
    "gh200-sku": (0x2348, True),
    "gb200": (0x2941, False),
    "gb300": (0x31C2, False),
}


def _pow2(value: int) -> int:
    return 1 << (value - 1).bit_length()


@dataclass(frozen=True)
class Expected:
    """The fake BARs for one profile and device memory size."""

    profile: str
    device_id: int
    memory_size: int
    usemem_len: int
    usemem_bar: int
    resmem_len: int  # 0: no carve-out (BAR2 is the GPU's real BAR1)
    resmem_bar: int
    bar1_size: int = BAR1_SIZE  # the real BAR1 shown as BAR2 when there is no carve-out

    @classmethod
    def for_profile(cls, profile: str, memory_size: int) -> Expected:
        device_id, mig_bug = PROFILES[profile]
        resmem = GIB if mig_bug else 0
        usemem_len = memory_size - resmem
        usemem_bar = _pow2(usemem_len)  # before the 512 MiB round-down (§3.2)
        if not mig_bug:
            return cls(profile, device_id, memory_size, usemem_len, usemem_bar, 0, 0)
        usemem_len -= usemem_len % MEMBLK
        resmem_len = memory_size - usemem_len
        return cls(
            profile, device_id, memory_size, usemem_len, usemem_bar, resmem_len, _pow2(resmem_len)
        )


@dataclass(frozen=True)
class BackingFile:
    path: Path
    offset: int  # file offset of the region's byte 0


def backing_files(layout: dict[str, Any] | None, backing_dir: Path) -> dict[str, BackingFile]:
    """region name ("usemem"/"resmem") -> where its bytes live on the host.

    Read from ``vgpud layout --json`` when it names files; otherwise the documented default
    ``<backing_dir>/usemem`` and ``<backing_dir>/resmem`` at offset 0.
    """
    found: dict[str, BackingFile] = {}
    named = (layout or {}).get("backing_files")
    if isinstance(named, dict):  # {"usemem": "usemem", "resmem": null}: one file per window
        for name, file_name in named.items():
            if isinstance(file_name, str):
                found[name] = BackingFile(backing_dir / file_name, 0)
    for name, entry in _regions(layout):
        file_name = entry.get("file") or entry.get("backing_file") or entry.get("path")
        if isinstance(file_name, str):
            path = Path(file_name)
            if not path.is_absolute():
                path = backing_dir / path
            offset = entry.get("file_offset", entry.get("offset_in_file", 0))
            found[name] = BackingFile(path, int(offset) if isinstance(offset, int) else 0)
    for name in ("usemem", "resmem", "bar1"):
        found.setdefault(name, BackingFile(backing_dir / name, 0))
    return found


def _regions(layout: dict[str, Any] | None) -> list[tuple[str, dict[str, Any]]]:
    if not layout:
        return []
    out: list[tuple[str, dict[str, Any]]] = []
    for key in ("usemem", "resmem"):
        value = layout.get(key)
        if isinstance(value, dict):
            out.append((key, value))
    regions = layout.get("regions")
    if isinstance(regions, list):
        for value in regions:
            if isinstance(value, dict) and isinstance(value.get("name"), str):
                out.append((value["name"], value))
    elif isinstance(regions, dict):
        out += [(k, v) for k, v in regions.items() if isinstance(v, dict)]
    return out


def read_backing(file: BackingFile, offset: int, width: int) -> int:
    """Little-endian integer of ``width`` bits at region offset ``offset``."""
    with file.path.open("rb") as handle:
        handle.seek(file.offset + offset)
        data = handle.read(width // 8)
    return int.from_bytes(data, "little")
