"""What the guest must see: the kernel's layout formulas (spec nvgrace-gpu.md §3.2), written
again here, independently of vgpud, as the tests' oracle; plus vgpud's own ``layout --json``
for what only vgpud knows (backing file names and offsets, the real BAR1 of Blackwell).
"""

from __future__ import annotations

import os
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

    def write(self, offset: int, data: bytes) -> None:
        """Write ``data`` at the region's ``offset`` from the host (a guest polling that
        address through the mapped BAR sees it: a go-ahead)."""
        fd = os.open(self.path, os.O_RDWR)
        try:
            os.pwrite(fd, data, self.offset + offset)
        finally:
            os.close(fd)


def backing_files(layout: dict[str, Any], backing_dir: Path) -> dict[str, BackingFile]:
    """region name ("usemem"/"resmem"/"bar1") -> where its bytes live on the host.

    Exactly what ``vgpud layout --backing-dir D --json`` says (``backing_files``); the tests
    then check the guest's bytes there, so a wrong path or offset in vgpud fails them.
    """
    found: dict[str, BackingFile] = {}
    for name, entry in layout["backing_files"].items():
        path = Path(entry["path"])
        assert path.parent == backing_dir, f"{name} file {path} is not in {backing_dir}"
        found[name] = BackingFile(path, int(entry["offset"]))
    return found


def read_backing_bytes(file: BackingFile, offset: int, size: int) -> bytes:
    """``size`` bytes at region offset ``offset`` (fewer where the file ends)."""
    with file.path.open("rb") as handle:
        handle.seek(file.offset + offset)
        return handle.read(size)


def read_backing(file: BackingFile, offset: int, width: int) -> int:
    """Little-endian integer of ``width`` bits at region offset ``offset``."""
    return int.from_bytes(read_backing_bytes(file, offset, width // 8), "little")
