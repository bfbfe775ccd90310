"""``vgpud probe SOCKET``: what a vfio-user server exposes, printed like ``lspci -vv``.

It connects as QEMU would (VERSION, GET_INFO, region and irq info, one bulk config read),
closes every fd it is handed, and prints. ``--json`` gives the same facts for scripts.
"""

from __future__ import annotations

import os
import stat
import struct
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import trio

from vgpud.client import MisbehavingServerError, VfioUserClient, VfioUserError
from vgpud.units import format_size
from vgpud.variant.probe import (
    CXL_MEM_ACTIVE,
    CXL_MEM_ACTIVE_TIMEOUT_MASK,
    CXL_MEM_ACTIVE_TIMEOUT_SHIFT,
    CXL_MEM_INFO_VALID,
    GPU_CAP_DVSEC_REGISTER,
    NVIDIA_VENDOR_ID,
    PCI_DVSEC_CXL_DEVICE,
    PCI_DVSEC_CXL_RANGE_SIZE_LOW0,
    PCI_EXT_CAP_ID_DVSEC,
    PCI_VENDOR_ID_CXL,
    cxl_active_timeout,
)

REGION_NAMES = {
    0: "BAR0",
    1: "BAR1",
    2: "BAR2",
    3: "BAR3",
    4: "BAR4",
    5: "BAR5",
    6: "ROM",
    7: "CONFIG",
    8: "VGA",
}
IRQ_NAMES = {0: "INTx", 1: "MSI", 2: "MSI-X", 3: "ERR", 4: "REQ"}
PROBE_TIMEOUT = 10.0  # seconds for the whole probe
MAX_REGIONS = 256  # VFIO's 9 PCI regions plus device-specific ones, generously
MAX_IRQS = 256
PCI_HEADER_SIZE = 64
PCIE_CONFIG_SIZE = 4096
CAP_NAMES = {
    0x01: "Power Management",
    0x05: "MSI",
    0x09: "Vendor Specific",
    0x10: "PCI Express",
    0x11: "MSI-X",
}
EXT_CAP_NAMES = {
    0x0001: "Advanced Error Reporting",
    0x0003: "Device Serial Number",
    0x000B: "Vendor Specific (VSEC)",
    0x0015: "Resizable BAR",
    0x0023: "Designated Vendor-Specific (DVSEC)",
}
# DVSECs known by (vendor, DVSEC ID): the two the nvgrace variant looks for (spec
# nvgrace-gpu.md §2.2, §2.3).
DVSEC_NAMES = {
    (NVIDIA_VENDOR_ID, GPU_CAP_DVSEC_REGISTER): "NVIDIA GPU capabilities",
    (PCI_VENDOR_ID_CXL, PCI_DVSEC_CXL_DEVICE): "CXL Device",
}
_REGION_FLAGS = ((1, "read"), (2, "write"), (4, "mmap"), (8, "caps"))
_IRQ_FLAGS = ((1, "eventfd"), (2, "maskable"), (4, "automasked"), (8, "noresize"))


@dataclass
class ProbeResult:
    """Everything ``probe`` learnt."""

    capabilities: dict[str, Any]
    device_flags: int
    regions: list[dict[str, Any]] = field(default_factory=list)
    irqs: list[dict[str, Any]] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)


async def probe(path: str | Path) -> ProbeResult:
    """Interrogate the server at ``path``; ``trio.TooSlowError`` after ``PROBE_TIMEOUT``
    seconds (a server that stops answering must not hang the tool)."""
    with trio.fail_after(PROBE_TIMEOUT):
        return await _probe(path)


async def _probe(path: str | Path) -> ProbeResult:
    async with await VfioUserClient.connect(path) as client:
        caps = client.server_capabilities
        info = await client.device_info()
        if info.num_regions > MAX_REGIONS or info.num_irqs > MAX_IRQS:
            # Each is one request and one entry; a broken server's 2^32 would run forever.
            raise MisbehavingServerError(
                f"DEVICE_GET_INFO claims {info.num_regions} regions and {info.num_irqs} "
                f"interrupt types (a PCI device has 9 and 5; at most {MAX_REGIONS} and "
                f"{MAX_IRQS} are probed)"
            )
        result = ProbeResult(
            capabilities={
                "max_msg_fds": caps.max_msg_fds if caps else None,
                "max_data_xfer_size": caps.max_data_xfer_size if caps else None,
                "max_dma_maps": caps.max_dma_maps if caps else None,
                "pgsizes": caps.pgsizes if caps else None,
            },
            device_flags=info.flags,
        )
        config_size = 0
        for index in range(info.num_regions):
            got = await client.region_info(index)
            region = got.info
            fd_size = None
            fd_kind = None
            if got.fd is not None:
                st = os.fstat(got.fd)
                fd_size = st.st_size
                # A memory file (synthetic GPU), or a VFIO device fd (--vfio-device), whose
                # size means nothing.
                fd_kind = "file" if stat.S_ISREG(st.st_mode) else "device"
                os.close(got.fd)
            sparse = [
                {"offset": off, "size": size}
                for cap in region.caps
                for off, size in getattr(cap, "areas", ())
            ]
            result.regions.append(
                {
                    "index": index,
                    "name": REGION_NAMES.get(index, f"region{index}"),
                    "size": region.size,
                    "flags": [name for bit, name in _REGION_FLAGS if region.flags & bit],
                    "mmap_offset": region.offset,
                    "fd_size": fd_size,
                    "fd_kind": fd_kind,
                    "sparse_areas": sparse,
                }
            )
            if index == 7:
                config_size = region.size
        for index in range(info.num_irqs):
            try:
                irq = await client.irq_info(index)
            except VfioUserError as exc:
                result.irqs.append({"index": index, "error": exc.errno})
                continue
            result.irqs.append(
                {
                    "index": index,
                    "name": IRQ_NAMES.get(index, f"irq{index}"),
                    "count": irq.count,
                    "flags": [name for bit, name in _IRQ_FLAGS if irq.flags & bit],
                }
            )
        if config_size:
            if config_size < PCI_HEADER_SIZE:
                raise MisbehavingServerError(
                    f"config space is {config_size} bytes, less than a PCI header"
                )
            # PCIe config space is 4 KiB; anything past it is not config space.
            config = await client.region_read(7, 0, min(config_size, PCIE_CONFIG_SIZE))
            result.config = decode_config(config)
            # The variant patches only the first fake BAR a single access touches (spec
            # nvgrace-gpu.md §4.3), so a bulk read shows BAR4 unpatched; read each BAR
            # register on its own, as QEMU does at realize.
            result.config["bars"] = [
                struct.unpack("<I", await client.region_read(7, 0x10 + 4 * i, 4))[0]
                for i in range(6)
            ]
    return result


@dataclass(frozen=True, slots=True)
class ServedBar:
    """One BAR as a vfio-user server presents it: its region's size and its config register."""

    index: int
    size: int
    register: int  # the BAR's low dword in config space: I/O, 64-bit and prefetchable bits


@dataclass(frozen=True, slots=True)
class ServedDevice:
    """What ``qemu-args`` needs to know of a served device: its IDs and BARs 0-5."""

    vendor_id: int
    device_id: int
    bars: list[ServedBar]


async def served_device(path: str | Path) -> ServedDevice:
    """BARs 0-5 as the server at ``path`` presents them, read the way QEMU reads them at
    realize: each region's size from DEVICE_GET_REGION_INFO, each BAR's type from its own
    4-byte config read (the variant patches only the fake BAR an access touches first, spec
    nvgrace-gpu.md §4.3). ``trio.TooSlowError`` after ``PROBE_TIMEOUT`` seconds."""
    with trio.fail_after(PROBE_TIMEOUT):
        async with await VfioUserClient.connect(path) as client:
            ids = struct.unpack("<HH", await client.region_read(7, 0, 4))
            bars = []
            for index in range(6):
                got = await client.region_info(index)
                if got.fd is not None:
                    os.close(got.fd)
                offset = 0x10 + 4 * index
                register = struct.unpack("<I", await client.region_read(7, offset, 4))[0]
                bars.append(ServedBar(index, got.info.size, register))
    return ServedDevice(vendor_id=ids[0], device_id=ids[1], bars=bars)


def decode_config(config: bytes) -> dict[str, Any]:
    """Decode a PCI config header and walk both capability lists."""

    def u8(off: int) -> int:
        return config[off]

    def u16(off: int) -> int:
        return int(struct.unpack_from("<H", config, off)[0])

    def u32(off: int) -> int:
        return int(struct.unpack_from("<I", config, off)[0])

    out: dict[str, Any] = {
        "vendor_id": u16(0),
        "device_id": u16(2),
        "command": u16(4),
        "status": u16(6),
        "revision": u8(8),
        "class_code": u32(8) >> 8,
        "header_type": u8(0x0E),
        "subsystem_vendor_id": u16(0x2C),
        "subsystem_id": u16(0x2E),
        "bars": [u32(0x10 + 4 * i) for i in range(6)],
        "interrupt_pin": u8(0x3D),
        "capabilities": [],
        "extended_capabilities": [],
    }
    seen: set[int] = set()
    pointer = u8(0x34) & ~3 if out["status"] & 0x10 else 0
    while pointer and pointer not in seen and pointer + 2 <= min(len(config), 256):
        seen.add(pointer)
        cap_id = u8(pointer)
        out["capabilities"].append(
            {
                "offset": pointer,
                "id": cap_id,
                "name": CAP_NAMES.get(cap_id, f"cap {cap_id:#x}"),
            }
        )
        pointer = u8(pointer + 1) & ~3
    offset = 0x100
    while len(config) > 0x100 and offset and offset not in seen and offset + 4 <= len(config):
        seen.add(offset)
        header = u32(offset)
        if header in (0, 0xFFFFFFFF):
            break
        cap_id = header & 0xFFFF
        entry: dict[str, Any] = {
            "offset": offset,
            "id": cap_id,
            "name": EXT_CAP_NAMES.get(cap_id, f"ext cap {cap_id:#x}"),
        }
        if cap_id == PCI_EXT_CAP_ID_DVSEC and offset + 10 <= len(config):
            vendor, dvsec_id = u16(offset + 4), u16(offset + 8)
            entry["dvsec_vendor"] = vendor
            entry["dvsec_id"] = dvsec_id
            if (vendor, dvsec_id) in DVSEC_NAMES:
                entry["dvsec_name"] = DVSEC_NAMES[vendor, dvsec_id]
            if (vendor, dvsec_id) == (NVIDIA_VENDOR_ID, GPU_CAP_DVSEC_REGISTER):
                # Spec nvgrace-gpu.md §2.2: bit 0 of the word at +0xA.
                bitmap = u16(offset + 0xA)
                entry["mig_supported_with_cached_resmem"] = bool(bitmap & 1)
            status_at = offset + PCI_DVSEC_CXL_RANGE_SIZE_LOW0
            if (vendor, dvsec_id) == (PCI_VENDOR_ID_CXL, PCI_DVSEC_CXL_DEVICE) and (
                status_at + 4 <= len(config)
            ):
                entry["cxl"] = decode_cxl_status(u32(status_at))
        out["extended_capabilities"].append(entry)
        offset = (header >> 20) & 0xFFC
    return out


def decode_cxl_status(status: int) -> dict[str, Any]:
    """The CXL Device DVSEC's Range 1 Size Low, as the v7.2 driver reads it (spec §7.3)."""
    code = status >> CXL_MEM_ACTIVE_TIMEOUT_SHIFT & CXL_MEM_ACTIVE_TIMEOUT_MASK
    return {
        "range1_size_low": status,
        "mem_info_valid": bool(status & CXL_MEM_INFO_VALID),
        "mem_active": bool(status & CXL_MEM_ACTIVE),
        "mem_active_timeout": code,
        "mem_active_timeout_seconds": int(cxl_active_timeout(status)),
    }


def render(result: ProbeResult) -> str:
    """Human-readable text."""
    cfg = result.config
    lines = []
    if cfg:
        lines.append(
            f"{cfg['vendor_id']:04x}:{cfg['device_id']:04x} class {cfg['class_code']:06x} "
            f"rev {cfg['revision']:02x}, subsystem "
            f"{cfg['subsystem_vendor_id']:04x}:{cfg['subsystem_id']:04x}"
        )
    flags = [n for bit, n in ((1, "reset"), (2, "pci")) if result.device_flags & bit]
    lines.append(f"Device flags: {', '.join(flags) or 'none'}")
    lines.append("Negotiated: " + ", ".join(f"{k}={v}" for k, v in result.capabilities.items()))
    lines.append("Regions:")
    for region in result.regions:
        if not region["size"]:
            lines.append(f"  {region['name']:<7} (absent)")
            continue
        flag_text = ", ".join(region["flags"])
        text = f"  {region['name']:<7} size {format_size(region['size'])} [{flag_text}]"
        if region["fd_kind"] == "file":
            text += f", fd of {format_size(region['fd_size'])} at offset {region['mmap_offset']:#x}"
        elif region["fd_kind"] == "device":
            text += f", device fd at offset {region['mmap_offset']:#x}"
        lines.append(text)
        for area in region["sparse_areas"]:
            lines.append(
                f"          mmappable [{area['offset']:#x}, {area['offset'] + area['size']:#x})"
                f" = {format_size(area['size'])}"
            )
    lines.append("Interrupts:")
    for irq in result.irqs:
        if "error" in irq:
            lines.append(f"  irq{irq['index']}: error {irq['error']}")
        else:
            lines.append(f"  {irq['name']:<6} count {irq['count']} [{', '.join(irq['flags'])}]")
    if cfg:
        lines.append("Config space:")
        lines.append(
            f"  Command {cfg['command']:#06x} Status {cfg['status']:#06x}, "
            f"interrupt pin {cfg['interrupt_pin']}"
        )
        for i, bar in enumerate(cfg["bars"]):
            lines.append(f"  BAR{i} register {bar:#010x}")
        for cap in cfg["capabilities"]:
            lines.append(f"  Capabilities: [{cap['offset']:02x}] {cap['name']}")
        for cap in cfg["extended_capabilities"]:
            text = f"  Capabilities: [{cap['offset']:03x}] {cap['name']}"
            if "dvsec_vendor" in cap:
                text += f" vendor {cap['dvsec_vendor']:#06x} id {cap['dvsec_id']}"
            if "dvsec_name" in cap:
                text += f" [{cap['dvsec_name']}]"
            if "cxl" in cap:
                text += f" ({_render_cxl(cap['cxl'])})"
            if "mig_supported_with_cached_resmem" in cap:
                bug = not cap["mig_supported_with_cached_resmem"]
                text += f" (MIG hardware bug: {'yes, resmem carved out' if bug else 'no'})"
            lines.append(text)
    return "\n".join(lines)


def _render_cxl(cxl: dict[str, Any]) -> str:
    # lspci's +/- for the two readiness bits; the timeout as the code and what it means.
    def flag(name: str, key: str) -> str:
        return f"{name}{'+' if cxl[key] else '-'}"

    return (
        f"Range 1 Size Low {cxl['range1_size_low']:#010x}: "
        f"{flag('MEM_INFO_VALID', 'mem_info_valid')} {flag('MEM_ACTIVE', 'mem_active')} "
        f"Memory_Active_Timeout {cxl['mem_active_timeout']} = "
        f"{cxl['mem_active_timeout_seconds']} s"
    )


def as_dict(result: ProbeResult) -> dict[str, Any]:
    """JSON-ready form."""
    return asdict(result)
