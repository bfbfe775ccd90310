"""Runs INSIDE a benchmark guest: read latency and copy bandwidth on a vfio-user device.

The host side is ``benchmarks.guest_bandwidth``, which boots the guest and runs this with the
host's own Python in ``chroot /host`` (tests/e2e's host-Python guest: the host's / over 9p).

Single reads, each timed on its own, so each pays the whole guest -> QEMU (-> server) ->
guest path; median and 99th percentile of ``--loads`` samples:

- ``config``: the vendor/device dword through sysfs ``config`` (the guest kernel's ECAM
  access, which QEMU forwards to the server as a config-region read). Any vfio-user device
  has it, so this is the row a peer server is compared on;
- ``bar0`` (``--bar0``): the GPU's PMC_BOOT_0 register, a 4-byte load from BAR0 (trapped);
- ``ram`` / ``bar4`` / ``bar2`` (with ``--copy-kib``): 4-byte loads from guest RAM (Python's
  own cost per load), usemem and resmem.

Copies (``--copy-kib``): whole-buffer memcpys (a memoryview slice assignment: the copy loop is
the guest's libc, not Python), RAM to target ("write") and target to RAM ("read"), best of
``--rounds`` (the guest shares the host's CPUs with QEMU's other threads and the daemon; the
fastest round is the least disturbed). BARs are mapped uncached through /dev/mem. With
vgpud's defaults QEMU has mmapped usemem/resmem from the daemon's memory files, so those
accesses never reach the daemon; with ``--no-mmap`` every access is a vfio-user message.

It prints ``VGTEST <target>_load_p50_ns`` / ``_load_p99_ns`` / ``_value`` (what a load
returned, for the host to check it reached the device), and for copies
``<target>_write_bytes_s`` / ``_read_bytes_s`` / ``_sha256`` (of what it read back after
writing ``pattern(size)``: the host checks it, and finds the same bytes at the start of its
usemem file).

``python -m benchmarks.guest_access BDF [--copy-kib N] [--loads N] [--rounds N] [--bar0]``
"""

from __future__ import annotations

import argparse
import hashlib
import mmap
import os
import struct
import sys
import time
from collections.abc import Callable
from pathlib import Path

PAGE = mmap.PAGESIZE
WORD = struct.Struct("<I")
PMC_BOOT_0 = 0x0  # BAR0 offset of the chip id register
PCI_COMMAND = 0x04
PCI_COMMAND_MEMORY = 0x2


def report(key: str, value: object) -> None:
    print(f"VGTEST {key}={value}", flush=True)


def pattern(size: int) -> bytes:
    """Incompressible, reproducible bytes (the host recomputes them to check the copies)."""
    out = bytearray()
    counter = 0
    while len(out) < size:
        out += hashlib.sha256(counter.to_bytes(8, "little")).digest()
        counter += 1
    return bytes(out[:size])


def best_seconds(run: Callable[[], None], rounds: int) -> float:
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best


def copies(name: str, target: mmap.mmap, size: int, rounds: int, data: bytes) -> None:
    view = memoryview(target)[:size]
    source = mmap.mmap(-1, size)
    source[:] = data
    sink = mmap.mmap(-1, size)

    def write() -> None:
        view[:] = source

    def read() -> None:
        sink[:] = view

    report(f"{name}_write_bytes_s", round(size / best_seconds(write, rounds)))
    report(f"{name}_read_bytes_s", round(size / best_seconds(read, rounds)))
    # What the last write left there, read back through the same path.
    report(f"{name}_sha256", hashlib.sha256(sink[:size]).hexdigest())
    view.release()


def loads(name: str, target: mmap.mmap, offsets: list[int]) -> None:
    """Time each 4-byte load on its own; report the median and the 99th percentile."""
    unpack = WORD.unpack_from
    clock = time.perf_counter_ns
    samples = []
    for offset in offsets:
        start = clock()
        unpack(target, offset)
        samples.append(clock() - start)
    report_loads(name, samples, unpack(target, offsets[0])[0])


def report_loads(name: str, samples: list[int], value: int) -> None:
    """The median and 99th percentile of the timed loads, and what a load returned (for the
    host to check the loads reached the device). The timing loops stay inline, each with
    nothing but its load between the clock reads."""
    samples.sort()
    report(f"{name}_value", hex(value))
    report(f"{name}_load_p50_ns", samples[len(samples) // 2])
    report(f"{name}_load_p99_ns", samples[len(samples) * 99 // 100])


def enable_memory_space(bdf: str) -> None:
    """Set Memory Space Enable in PCI_COMMAND, nothing else. (sysfs ``enable`` also wants
    every BAR assigned, and a peer's I/O BAR may not be: the root port has no I/O window.)"""
    with (Path("/sys/bus/pci/devices") / bdf / "config").open("r+b", buffering=0) as config:
        config.seek(PCI_COMMAND)
        command = int.from_bytes(config.read(2), "little")
        config.seek(PCI_COMMAND)
        config.write((command | PCI_COMMAND_MEMORY).to_bytes(2, "little"))


def bar_mapping(bdf: str, bar: int, size: int) -> tuple[mmap.mmap, int]:
    """The first ``size`` bytes of the BAR, mapped uncached through /dev/mem, and the BAR's
    offset in the mapping. Not sysfs ``resourceN``: Python's mmap refuses a length past that
    file's size, and a BAR smaller than a page (a peer's) needs its whole page mapped. The
    kernel's IO_STRICT_DEVMEM allows it: no driver has claimed the device."""
    line = (Path("/sys/bus/pci/devices") / bdf / "resource").read_text().splitlines()[bar]
    start, end = (int(field, 16) for field in line.split()[:2])
    if end - start + 1 < size:
        raise SystemExit(f"BAR{bar} is {end - start + 1} bytes, smaller than the {size} to map")
    in_page = start % PAGE
    fd = os.open("/dev/mem", os.O_RDWR | os.O_SYNC)
    try:
        length = -(-(in_page + size) // PAGE) * PAGE
        prot = mmap.PROT_READ | mmap.PROT_WRITE
        return mmap.mmap(fd, length, mmap.MAP_SHARED, prot, offset=start - in_page), in_page
    finally:
        os.close(fd)


def config_loads(bdf: str, count: int) -> None:
    """4-byte reads of the vendor/device dword through sysfs ``config``: the guest kernel's
    config accessor (ECAM), which QEMU forwards to the server as a config-region read."""
    fd = os.open(Path("/sys/bus/pci/devices") / bdf / "config", os.O_RDONLY)
    try:
        clock, pread = time.perf_counter_ns, os.pread
        samples = []
        for _ in range(count):
            start = clock()
            pread(fd, 4, 0)
            samples.append(clock() - start)
        report_loads("config", samples, WORD.unpack(pread(fd, 4, 0))[0])
    finally:
        os.close(fd)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.guest_access")
    parser.add_argument("bdf")
    parser.add_argument("--copy-kib", type=int, default=0, help="0: no copies")
    parser.add_argument("--loads", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--bar0", action="store_true", help="also time BAR0 register loads")
    args = parser.parse_args(argv)
    bdf, count, size = args.bdf, args.loads, args.copy_kib << 10
    if size % PAGE or 0 < size < count * WORD.size:
        raise SystemExit(f"size {size}: not page-aligned or too small for {count} loads")
    enable_memory_space(bdf)
    config_loads(bdf, count)
    if args.bar0:
        bar0, in_page = bar_mapping(bdf, 0, PAGE)
        loads("bar0", bar0, [in_page + PMC_BOOT_0] * count)
    if not size:
        return 0
    data = pattern(size)
    report("size_bytes", size)
    report("data_sha256", hashlib.sha256(data).hexdigest())
    sequential = [i * WORD.size for i in range(count)]
    for name, (target, _) in (
        ("ram", (mmap.mmap(-1, size), 0)),
        ("bar4", bar_mapping(bdf, 4, size)),
        ("bar2", bar_mapping(bdf, 2, size)),
    ):
        copies(name, target, size, args.rounds, data)
        loads(name, target, sequential)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
