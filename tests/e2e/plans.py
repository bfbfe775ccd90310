"""Guest access plans: which BAR words a guest writes and reads, and what each must read back.

A :class:`Plan` renders to a guest script (see :mod:`tests.e2e.initramfs`) and knows the
expected results, so a scenario can boot once and the tests assert many small facts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tests.e2e.expect import BackingFile, Expected, read_backing
from tests.e2e.initramfs import GuestResults, GuestScript

ONES = {8: 0xFF, 16: 0xFFFF, 32: 0xFFFF_FFFF, 64: 0xFFFF_FFFF_FFFF_FFFF}
REGION_OF_BAR = {2: "resmem", 4: "usemem"}

# sysfs resource flags (include/linux/ioport.h)
IORESOURCE_MEM = 0x200
IORESOURCE_PREFETCH = 0x2000
IORESOURCE_MEM_64 = 0x100000


@dataclass(frozen=True)
class Write:
    bar: int
    offset: int
    width: int
    value: int


@dataclass(frozen=True)
class Read:
    key: str
    bar: int
    offset: int
    width: int
    expect: int
    why: str


@dataclass
class Plan:
    steps: list[Write | Read] = field(default_factory=list)
    # Host-side: (region, offset, width, value) that must be in the backing file afterwards.
    stored: list[tuple[str, int, int, int]] = field(default_factory=list)
    # Host-side: (region, offset) where nothing may have been written (the BAR tails).
    untouched: list[tuple[str, int]] = field(default_factory=list)

    def write(
        self,
        bar: int,
        offset: int,
        width: int,
        value: int,
        *,
        store: bool = True,
        region: str | None = None,
    ) -> None:
        self.steps.append(Write(bar, offset, width, value))
        if store:
            self.stored.append((region or REGION_OF_BAR[bar], offset, width, value))

    def read(self, key: str, bar: int, offset: int, width: int, expect: int, *, why: str) -> None:
        self.steps.append(Read(key, bar, offset, width, expect, why))

    def script(
        self, script: GuestScript | None = None, *, writes: bool = True, reads: bool = True
    ) -> GuestScript:
        script = script or GuestScript()
        for step in self.steps:
            if (isinstance(step, Write) and not writes) or (isinstance(step, Read) and not reads):
                continue
            if isinstance(step, Write):
                script.write(step.bar, step.offset, step.value, step.width)
            else:
                script.read(step.key, step.bar, step.offset, step.width)
        return script

    def reads(self) -> list[Read]:
        return [s for s in self.steps if isinstance(s, Read)]

    def mismatches(self, results: GuestResults) -> list[str]:
        """Every read whose guest value differs from the expectation, explained."""
        bad = []
        for read in self.reads():
            got = results.values.get(read.key)
            if got is None:
                bad.append(f"{read.key}: the guest printed no value ({read.why})")
            elif not got.startswith("0x") or int(got, 16) != read.expect:
                bad.append(
                    f"{read.key}: BAR{read.bar}+{read.offset:#x}/{read.width} read {got}, "
                    f"expected {read.expect:#x} ({read.why})"
                )
        return bad

    def host_mismatches(self, files: dict[str, BackingFile]) -> list[str]:
        bad = []
        for region, offset, width, value in self.stored:
            got = read_backing(files[region], offset, width)
            if got != value:
                bad.append(
                    f"{files[region].path}+{files[region].offset + offset:#x}/{width}: "
                    f"{got:#x}, expected the guest's {value:#x}"
                )
        for region, offset in self.untouched:
            file = files[region]
            if not file.path.exists():
                continue
            size = file.path.stat().st_size
            if file.offset + offset < size and read_backing(file, offset, 32) != 0:
                bad.append(f"{file.path}+{file.offset + offset:#x}: a dropped tail write landed")
        return bad


def memory_plan(expected: Expected, tag: int = 0xA5, *, unaligned: bool = True) -> Plan:
    """Writes/reads over both fake BARs, including the all-ones, write-dropping tails.

    ``unaligned=False`` leaves out the 8-byte access at a 4-byte-aligned address (arm64
    guests take SIGBUS on unaligned device-memory accesses, vfio-user.md §14).
    """
    plan = Plan()
    usemem, bar4 = expected.usemem_len, expected.usemem_bar
    t = tag << 24
    plan.write(4, 0x0, 32, t | 0x000000)
    plan.write(4, 0x1000, 32, t | 0x001000)
    plan.write(4, 0x2000, 64, 0x0123_4567_89AB_CDEF)
    plan.write(4, 0x3001, 8, 0x7E)
    plan.write(4, 0x3002, 16, 0xBEEF)
    middle = (usemem // 2) & ~0xFFF
    plan.write(4, middle, 32, t | 0x4A1F)
    plan.write(4, usemem - 4, 32, t | 0xFF04)
    plan.read("u_0", 4, 0x0, 32, t, why="usemem word 0")
    plan.read("u_1000", 4, 0x1000, 32, t | 0x1000, why="usemem")
    plan.read("u_2000_64", 4, 0x2000, 64, 0x0123_4567_89AB_CDEF, why="64-bit access")
    plan.read("u_2004", 4, 0x2004, 32, 0x0123_4567, why="upper half of the 64-bit write")
    plan.read("u_3000", 4, 0x3000, 32, 0xBEEF_7E00, why="8- and 16-bit writes")
    plan.read("u_middle", 4, middle, 32, t | 0x4A1F, why="usemem middle")
    plan.read("u_last", 4, usemem - 4, 32, t | 0xFF04, why="last usemem word")
    if bar4 > usemem:
        _tail(plan, "u", 4, usemem, bar4, last_word=t | 0xFF04, unaligned=unaligned)
    if expected.resmem_len:
        resmem, bar2 = expected.resmem_len, expected.resmem_bar
        plan.write(2, 0x0, 32, t | 0x2E0000)
        plan.write(2, resmem - 4, 32, t | 0x2EFF04)
        plan.read("r_0", 2, 0x0, 32, t | 0x2E0000, why="resmem word 0")
        plan.read("r_last", 2, resmem - 4, 32, t | 0x2EFF04, why="last resmem word")
        if bar2 > resmem:
            _tail(plan, "r", 2, resmem, bar2, last_word=t | 0x2EFF04, unaligned=unaligned)
    else:
        # No carve-out: BAR2 is the GPU's own BAR1, plain memory of its full size.
        bar1 = expected.bar1_size
        plan.write(2, 0x0, 32, t | 0xB10000, region="bar1")
        plan.write(2, bar1 - 4, 32, t | 0xB1FF04, region="bar1")
        plan.read("b1_0", 2, 0x0, 32, t | 0xB10000, why="real BAR1 word 0")
        plan.read("b1_last", 2, bar1 - 4, 32, t | 0xB1FF04, why="last real BAR1 word")
    return plan


def persistence_plan(expected: Expected, tag: int) -> Plan:
    """Words written by one guest (or boot) and read back by the next: no tail accesses."""
    plan = Plan()
    t = tag << 24
    words = [(4, 0x0), (4, 0x10_0000), (4, expected.usemem_len - 8)]
    if expected.resmem_len:
        words += [(2, 0x0), (2, expected.resmem_len - 8)]
    for i, (bar, offset) in enumerate(words):
        value = (t | (bar << 16) | i) << 32 | 0x600D_0000 | i
        plan.write(bar, offset, 64, value)
        plan.read(f"keep_{bar}_{offset:x}", bar, offset, 64, value, why="written before")
    return plan


def _tail(
    plan: Plan,
    p: str,
    bar: int,
    memlength: int,
    bar_size: int,
    *,
    last_word: int,
    unaligned: bool,
) -> None:
    why = "BAR tail past memlength reads all-ones (nvgrace-gpu.md §5.2)"
    plan.read(f"{p}_tail_first", bar, memlength, 32, ONES[32], why=why)
    plan.read(f"{p}_tail_last", bar, bar_size - 4, 32, ONES[32], why=why)
    plan.read(f"{p}_tail_64", bar, memlength, 64, ONES[64], why=why)
    plan.read(f"{p}_tail_8", bar, memlength + 1, 8, ONES[8], why=why)
    if unaligned:
        plan.read(
            f"{p}_straddle_64",
            bar,
            memlength - 4,
            64,
            (ONES[32] << 32) | last_word,
            why="8-byte read straddling memlength: memory half, then all-ones",
        )
    plan.write(bar, memlength, 32, 0x1111_1111, store=False)
    plan.write(bar, bar_size - 8, 64, 0x2222_2222_2222_2222, store=False)
    plan.read(f"{p}_tail_after_write", bar, memlength, 32, ONES[32], why="tail writes are dropped")
    plan.read(f"{p}_tail_last_after_write", bar, bar_size - 8, 64, ONES[64], why="dropped")
    plan.untouched.append((REGION_OF_BAR[bar], memlength))


def describe_script() -> GuestScript:
    """Find the GPU, print its ids/BARs/config, enable it, note BAR2/BAR4 addresses."""
    return GuestScript().find_device().describe().enable().bar_base(2).bar_base(4)


def assert_bars_assigned(results: GuestResults, sizes: dict[int, int], what: str = "") -> None:
    """Each BAR in ``sizes`` (index -> size) got its size, 64-bit prefetchable, naturally
    aligned: what a hot-added GPU's BARs only get with room in its root port's windows."""
    for n, size in sizes.items():
        bar = bar_facts(results, n)
        assert bar["size"] == size, f"{what}BAR{n} not assigned: {bar}"
        assert bar["mem64"] and bar["prefetch"], bar
        assert bar["start"] % size == 0, f"{what}BAR{n} placed unaligned: {bar}"


def bar_facts(results: GuestResults, bar: int) -> dict[str, Any]:
    start, size, flags = results.bar(bar)
    return {
        "start": start,
        "size": size,
        "mem": bool(flags & IORESOURCE_MEM),
        "prefetch": bool(flags & IORESOURCE_PREFETCH),
        "mem64": bool(flags & IORESOURCE_MEM_64),
    }
