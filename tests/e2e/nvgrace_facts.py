"""What the nvgrace variant presents, as facts a vfio-user client can gather: the same
questions asked of the real kernel driver and of vgpud, so that the answers can be compared.

Run INSIDE a test guest (tests/e2e/test_kernel_driver.py), it starts a vgpud with
``--vfio-device`` on a GPU that the guest kernel's ``nvgrace_gpu_vfio_pci`` drives, and prints
the facts as one ``VGTEST facts=<json>`` line. The host test gathers the same facts from a
vgpud serving the synthetic GPU of the same memory size, and compares them.

Every fact is one the driver decides or acts on (spec nvgrace-gpu.md §2, §3.4, §4, §5): the
region info of the fake BARs, the DVSECs that steer it, the emulated BAR registers (sizing,
byte writes, an access spanning two), reads and writes of device memory and of the tail past
it, and what a reset puts back. Device memory is written before it is read, since the
kernel's is guest RAM with whatever was left in it.

``python -m tests.e2e.nvgrace_facts BDF WORKDIR``
"""

from __future__ import annotations

import json
import mmap
import os
import struct
import sys
from pathlib import Path
from typing import Any

import trio

from tests.e2e.guest_vfio import report, start_daemon
from vgpud.client import VfioUserClient, VfioUserError

BAR2, BAR4, CONFIG = 2, 4, 7
# Config-space offsets of the emulated BAR registers: BAR2/BAR3 and BAR4/BAR5.
BAR_REGISTERS = (0x18, 0x1C, 0x20, 0x24)
PATTERN = bytes(range(0xA0, 0xB0))
PCI_COMMAND = 0x04
PCI_COMMAND_MEMORY = 0x2
PCI_EXT_CAPS = 0x100  # where the extended capability list starts
PCI_EXT_CAP_ID_DVSEC = 0x23
TRAPPED_OFFSET = 0x1000  # where device memory is written and read back through REGION_WRITE


async def _read(client: VfioUserClient, region: int, offset: int, count: int) -> str:
    """The bytes as hex, or the error a read got (``errno N``)."""
    try:
        return (await client.region_read(region, offset, count)).hex()
    except VfioUserError as exc:
        return f"errno {exc.errno}"


async def _write(client: VfioUserClient, region: int, offset: int, data: bytes) -> str:
    try:
        await client.region_write(region, offset, data)
    except VfioUserError as exc:
        return f"errno {exc.errno}"
    return "ok"


async def _bar_registers(client: VfioUserClient) -> list[str]:
    # One 4-byte read each, as QEMU reads them (a bulk read is another fact, below).
    return [await _read(client, CONFIG, offset, 4) for offset in BAR_REGISTERS]


async def _dvsecs(client: VfioUserClient) -> list[list[int]]:
    """[offset, vendor, DVSEC ID] of each Designated Vendor-Specific Extended Capability, as
    ``pci_find_dvsec_capability`` walks them: the NVIDIA one (ID 3) decides the MIG bug and a
    CXL Device one (vendor 0x1E98, ID 0) the v7.2 readiness path (spec nvgrace-gpu.md §2.2,
    §2.3), so a VMM hiding either would change what the driver does."""
    found: list[list[int]] = []
    offset, seen = PCI_EXT_CAPS, set()
    while offset and offset not in seen:  # a loop in the list ends the walk, as in the kernel
        seen.add(offset)
        header = struct.unpack("<I", await client.region_read(CONFIG, offset, 4))[0]
        if header & 0xFFFF == PCI_EXT_CAP_ID_DVSEC:
            vendor_header = struct.unpack("<I", await client.region_read(CONFIG, offset + 4, 4))
            dvsec_id = struct.unpack("<H", await client.region_read(CONFIG, offset + 8, 2))
            found.append([offset, vendor_header[0] & 0xFFFF, dvsec_id[0]])
        offset = header >> 20 & 0xFFC
    return found


async def _region(client: VfioUserClient, index: int) -> dict[str, Any]:
    got = await client.region_info(index)
    if got.fd is not None:
        os.close(got.fd)
    info = got.info
    areas = [list(area) for cap in info.caps for area in getattr(cap, "areas", ())]
    return {"size": info.size, "flags": info.flags, "sparse_areas": areas}


async def _mapped(client: VfioUserClient, index: int, offset: int, count: int) -> str:
    """``count`` bytes at ``offset`` of region ``index`` through the fd it hands out, mmapped
    as QEMU maps it (the sparse area at the region's mmap offset)."""
    got = await client.region_info(index)
    if got.fd is None:
        return "no fd"
    try:
        page = mmap.PAGESIZE
        start = offset - offset % page
        with mmap.mmap(got.fd, page, offset=got.info.offset + start) as view:
            return view[offset - start : offset - start + count].hex()
    finally:
        os.close(got.fd)


def _memlength(region: dict[str, Any]) -> int:
    """The device memory behind a BAR region: a fake BAR's sparse area, else the whole BAR
    (Blackwell's region 2 is the GPU's real BAR1, spec nvgrace-gpu.md §3.3)."""
    areas = region["sparse_areas"]
    return int(areas[0][1]) if areas else int(region["size"])


async def collect(client: VfioUserClient) -> dict[str, Any]:
    """Every fact, in the order asked (the order matters: writes change what reads see)."""
    facts: dict[str, Any] = {}
    info = await client.device_info()
    facts["device_info"] = [info.flags, info.num_regions, info.num_irqs]
    # Regions 2 and 4 are the driver's; the others, and the interrupts, are vfio-pci-core's
    # over the device (compared too: vgpud stands in for both).
    regions = {index: await _region(client, index) for index in range(info.num_regions)}
    facts.update({f"region{index}": region for index, region in regions.items()})
    irqs = []
    for index in range(info.num_irqs):
        irq = await client.irq_info(index)
        irqs.append([irq.flags, irq.count])
    facts["irqs"] = irqs
    facts["dvsecs"] = await _dvsecs(client)
    # One fact per register: on Blackwell BAR2/BAR3 are the real BAR1's, not the driver's.
    for offset, value in zip(BAR_REGISTERS, await _bar_registers(client), strict=True):
        facts[f"bar_register_{offset:#x}_at_open"] = value
    # Sizing, as a guest's firmware does it: all ones, read back.
    for offset in BAR_REGISTERS:
        facts[f"write_ones_{offset:#x}"] = await _write(client, CONFIG, offset, b"\xff" * 4)
    facts["bar_registers_sized"] = await _bar_registers(client)
    # An address, then byte and word writes into it.
    await _write(client, CONFIG, 0x20, struct.pack("<I", 0x12345678))
    await _write(client, CONFIG, 0x24, struct.pack("<I", 0x9ABC))
    facts["bar4_address"] = await _bar_registers(client)
    await _write(client, CONFIG, 0x21, b"\xab")
    await _write(client, CONFIG, 0x26, b"\xcd\xef")
    facts["bar4_partial_writes"] = await _bar_registers(client)
    # Narrow reads of an emulated register.
    facts["read_0x21_1"] = await _read(client, CONFIG, 0x21, 1)
    facts["read_0x22_2"] = await _read(client, CONFIG, 0x22, 2)
    facts["read_0x24_2"] = await _read(client, CONFIG, 0x24, 2)
    # A write over BAR3 and BAR4: only BAR3's bytes are the driver's to take (spec §4.4);
    # then a write over BAR4 and BAR5 at once, and over BAR5 and the register after it.
    facts["write_0x1c_8"] = await _write(client, CONFIG, 0x1C, bytes(range(1, 9)))
    facts["bar_registers_after_0x1c_8"] = await _bar_registers(client)
    facts["write_0x20_8"] = await _write(client, CONFIG, 0x20, bytes(range(0x11, 0x19)))
    facts["bar_registers_after_0x20_8"] = await _bar_registers(client)
    facts["write_0x26_4"] = await _write(client, CONFIG, 0x26, b"\x21\x22\x23\x24")
    facts["bar_registers_after_0x26_4"] = await _bar_registers(client)
    # One access over two fake BARs: only the first it touches is emulated (spec
    # nvgrace-gpu.md §4.3); the rest is the underlying device's (vfio-pci's copy of the
    # physical BAR under the kernel), so only the emulated bytes are facts of the driver.
    facts["read_0x1c_8_bar3"] = (await _read(client, CONFIG, 0x1C, 8))[:8]
    facts["read_0x18_16_bar2"] = (await _read(client, CONFIG, 0x18, 16))[:16]
    # Device memory: written, then read back; the tail past memlength; past the BAR.
    for index in (BAR2, BAR4):
        size = regions[index]["size"]
        memlength = _memlength(regions[index])
        name = f"bar{index}"
        facts[f"{name}_write"] = await _write(client, index, TRAPPED_OFFSET, PATTERN)
        facts[f"{name}_read"] = await _read(client, index, TRAPPED_OFFSET, len(PATTERN))
        facts[f"{name}_mapped"] = await _mapped(client, index, TRAPPED_OFFSET, len(PATTERN))
        facts[f"{name}_write_last"] = await _write(client, index, memlength - 8, PATTERN[:8])
        facts[f"{name}_read_last"] = await _read(client, index, memlength - 8, 8)
        facts[f"{name}_tail"] = await _read(client, index, memlength, 8)
        facts[f"{name}_straddle"] = await _read(client, index, memlength - 4, 8)
        facts[f"{name}_tail_write"] = await _write(client, index, memlength, PATTERN[:8])
        facts[f"{name}_tail_after_write"] = await _read(client, index, memlength, 8)
        facts[f"{name}_straddle_write"] = await _write(client, index, memlength - 4, PATTERN[:8])
        facts[f"{name}_straddle_after_write"] = await _read(client, index, memlength - 4, 8)
        facts[f"{name}_last_bytes"] = await _read(client, index, size - 4, 4)
        facts[f"{name}_past_bar"] = await _read(client, index, size, 4)
        facts[f"{name}_over_bar_end"] = await _read(client, index, size - 4, 8)
    # Memory decoding off (COMMAND.MEM clear): since v6.19 the driver refuses device-memory
    # accesses then (spec nvgrace-gpu.md §5.2 step 4, §7); before, it served them.
    command = await client.region_read(CONFIG, PCI_COMMAND, 2)
    off = struct.pack("<H", struct.unpack("<H", command)[0] & ~PCI_COMMAND_MEMORY)
    facts["memory_off_write"] = await _write(client, CONFIG, PCI_COMMAND, off)
    for index in (BAR2, BAR4):
        memlength = _memlength(regions[index])
        facts[f"memory_off_bar{index}_read"] = await _read(client, index, TRAPPED_OFFSET, 4)
        facts[f"memory_off_bar{index}_tail"] = await _read(client, index, memlength, 4)
        write = await _write(client, index, TRAPPED_OFFSET, b"\x5a" * 4)
        facts[f"memory_off_bar{index}_write"] = write
    await _write(client, CONFIG, PCI_COMMAND, command)
    for index in (BAR2, BAR4):
        facts[f"memory_on_bar{index}_read"] = await _read(client, index, TRAPPED_OFFSET, 4)
    # A reset, then the registers again.
    await client.reset()
    facts["bar_registers_after_reset"] = await _bar_registers(client)
    # The first device-memory access after a reset is gated (v6.19+, spec §7.4): with memory
    # decoding off it fails before any readiness wait, so the answer does not depend on how
    # soon the GPU is ready again.
    facts["after_reset_memory_off_write"] = await _write(client, CONFIG, PCI_COMMAND, off)
    for index in (BAR2, BAR4):
        read = await _read(client, index, TRAPPED_OFFSET, 4)
        facts[f"after_reset_memory_off_bar{index}_read"] = read
    await _write(client, CONFIG, PCI_COMMAND, command)
    return facts


async def main(bdf: str, workdir: Path) -> None:
    async with trio.open_nursery() as nursery:
        daemon, sock_path, _notify, _log = await start_daemon(bdf, workdir, nursery)
        try:
            async with await VfioUserClient.connect(sock_path) as client:
                facts = await collect(client)
            report("facts", json.dumps(facts, separators=(",", ":")))
        finally:
            daemon.terminate()
            await daemon.wait()


if __name__ == "__main__":
    trio.run(main, sys.argv[1], Path(sys.argv[2]))
