"""``vgpud qemu-args``: the QEMU arguments that attach a vgpud device.

What a guest needs, per the spec sheets:
- guest RAM that is fd-backed and shared, so DMA_MAP carries an fd (spec vfio-user.md §5.7);
- a PCIe root port, behind which the large BARs are 64-bit prefetchable (§11 "observed");
- the JSON ``vfio-user-pci`` device (§5.1: the dotted form does not build the socket object);
- a 64-bit MMIO window that holds the BARs: q35 ``pci-hole64-size`` with guest phys-bits that
  cover it (§6, §11), aarch64 ``virt`` ``highmem-mmio-size`` (a power of two >= 512 GiB,
  spec nvgrace-gpu.md §11.2);
- optionally the memory-less NUMA nodes and ``acpi-generic-initiator`` objects the guest
  NVIDIA driver needs for MIG (spec nvgrace-gpu.md §11.1, §12): 8 per GPU.

For hot-plug (``--hotplug``), the device is left out of the command line and added later with
QMP ``device_add``. Its root port then has to reserve bridge windows for BARs that are not
there at boot: the firmware sizes an empty port's windows from the port's resource-reserve
hints (``mem-reserve``, ``pref64-reserve``), and without them a hot-added GPU is enumerated
with none of its BARs assigned (seen with QEMU 11.1.3, SeaBIOS and a Linux 6.1 guest).
"""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from vgpud.units import parse_size

Q35_DEFAULT_HOLE64 = 32 << 30  # Q35_PCI_HOST_HOLE64_SIZE_DEFAULT
VIRT_DEFAULT_HIGHMEM_MMIO = 512 << 30
GI_NODES_PER_GPU = 8
# QEMU's MAX_NODES: with 8 generic-initiator nodes per GPU and guest RAM's node 0, at most
# 15 GPUs (QEMU 11.1.3 refuses node 128: "Max number of NUMA nodes reached: 128").
QEMU_MAX_NUMA_NODES = 128
# The x86 guest's physical address width under TCG: 46 bits (64 TiB) unless the 64-bit hole
# ends above that (Machine.phys_bits); with KVM the host's own width is used instead
# (host-phys-bits).
TCG_PHYS_BITS = 46
# Where q35 starts the 64-bit hole at the latest: after guest RAM above 4 GiB, which QEMU moves
# to 1 TiB (the AMD HyperTransport hole) once the hole reaches that high, as it does for the
# large windows here (seen with QEMU 11.1.3: a 64T hole refused with phys-bits=46, "Address
# space limit 0x3fffffffffff < 0x40ffffffffff").
Q35_HOLE64_START_MAX = 1 << 40
MIB = 1 << 20
# The huge page sizes guest RAM may be backed with, as documented in docs/operations.md:
# x86_64's two, which arm64 with 4 KiB pages has too.
HUGEPAGE_SIZES = (2 << 20, 1 << 30)
# What QEMU takes as a device id (its id_wellformed()): anything else, a device name such as
# "0" or "gpu 0" that vgpud itself serves, is refused ("Invalid qdev ID").
QEMU_ID = re.compile(r"[A-Za-z][A-Za-z0-9._-]*")


class GuestBar(NamedTuple):
    """One memory BAR of a device as the guest will see it."""

    size: int
    # A bridge forwards prefetchable and non-prefetchable BARs through different windows
    # (the 64-bit prefetchable one and the 32-bit one), so a hot-plug port reserves each.
    prefetchable: bool = True


@dataclass(frozen=True, slots=True)
class GuestDevice:
    """One vgpud device as the guest will see it."""

    socket_path: str
    bars: Sequence[GuestBar]  # every memory BAR of the device
    id: str = "gpu0"

    def device_spec(self, port: str) -> dict[str, Any]:
        """The JSON ``vfio-user-pci`` device behind ``port`` (spec vfio-user.md §5.1)."""
        return {
            "driver": "vfio-user-pci",
            "id": self.id,
            "bus": port,
            "socket": {"type": "unix", "path": self.socket_path},
        }

    def port_reserves(self) -> str:
        """The root port's resource-reserve hints that leave room for this device's BARs."""
        mem = _reserve(sum(bar.size for bar in self.bars if not bar.prefetchable))
        pref = self.prefetchable_reserve()
        hints = [f"mem-reserve={qemu_size(mem)}"] if mem else []
        hints += [f"pref64-reserve={qemu_size(pref)}"] if pref else []
        return ",".join(hints)

    def prefetchable_reserve(self) -> int:
        """The 64-bit prefetchable window a hot-plug port reserves (0: none needed)."""
        return _reserve(sum(bar.size for bar in self.bars if bar.prefetchable))


def _reserve(size: int) -> int:
    """A bridge window that holds BARs of ``size`` bytes in total, each naturally aligned.

    SeaBIOS places an empty port's reserved window with only the bridge's own 1 MiB
    alignment (seen: a 16 MiB mem-reserve at 0xfda00000, where a 16 MiB BAR0 cannot go), so
    the window is twice the BARs' power-of-two total: any such window holds a block of that
    total aligned to it, and in there the BARs, largest first, are each aligned. No BARs,
    no window: 0.
    """
    return 2 * _next_pow2(size) if size else 0


def _next_pow2(value: int) -> int:
    return 1 << max(value - 1, 0).bit_length()


def port_id(index: int) -> str:
    """The root port of the index-th device (from 0)."""
    return f"rp{index}"


def mmio_window(devices: Sequence[GuestDevice], *, hotplug: bool = False) -> int:
    """Bytes of 64-bit MMIO that hold every device's BARs with their natural alignment.

    Each root port's window must be aligned to its largest BAR, so each device is rounded
    to a power of two; twice the total leaves the firmware room to align the windows. A
    hot-plug port's window is its 64-bit reserve, whether or not the device is there yet.
    """
    if hotplug:
        total = sum(d.prefetchable_reserve() for d in devices)
    else:
        total = sum(_next_pow2(sum(bar.size for bar in d.bars)) for d in devices)
    return _next_pow2(2 * total)


def device_add_commands(devices: Sequence[GuestDevice]) -> list[dict[str, Any]]:
    """The QMP commands that hot-add each device to the port :func:`build` left for it."""
    return [
        {"execute": "device_add", "arguments": device.device_spec(port_id(index))}
        for index, device in enumerate(devices)
    ]


@dataclass(frozen=True, slots=True)
class Machine:
    """A checked guest machine with its vgpud devices: what every rendering of it (QEMU
    arguments, a libvirt domain) starts from. Made by :func:`plan`."""

    devices: Sequence[GuestDevice]
    arch: str
    accel: str
    smp: int
    ram_size: int
    hugepage_size: int | None
    numa: bool
    hotplug: bool
    window: int  # bytes of 64-bit MMIO the BARs need (mmio_window)

    @property
    def ram(self) -> str:
        return qemu_size(self.ram_size)

    @property
    def phys_bits(self) -> int:
        """The x86 TCG guest's physical address width: QEMU refuses to start when the 64-bit
        hole ends beyond it (spec vfio-user.md §6, §11)."""
        # The hole starts on a 1 GiB boundary after RAM above 4 GiB (at most all of it).
        ram = -(-self.ram_size // (1 << 30)) << 30
        hole_end = Q35_HOLE64_START_MAX + ram + max(self.window, Q35_DEFAULT_HOLE64)
        return max(TCG_PHYS_BITS, (hole_end - 1).bit_length())

    def cpus(self) -> str:
        """The guest's CPU list, as ``-numa`` and libvirt's ``<cell cpus=>`` spell it."""
        return f"0-{self.smp - 1}" if self.smp > 1 else "0"

    def initiator_nodes(self) -> list[tuple[GuestDevice, int]]:
        """With ``numa``: each memory-less NUMA node (1, 2, ...) and the GPU it belongs to
        (spec nvgrace-gpu.md §11.1: 8 per GPU)."""
        if not self.numa:
            return []
        nodes = range(1, 1 + GI_NODES_PER_GPU * len(self.devices))
        return [(self.devices[(node - 1) // GI_NODES_PER_GPU], node) for node in nodes]


def plan(
    devices: Sequence[GuestDevice],
    *,
    arch: str = "x86_64",
    ram: str = "1G",
    smp: int = 1,
    accel: str = "tcg",
    numa: bool = False,
    hugepages: str | None = None,
    hotplug: bool = False,
) -> Machine:
    """Check the machine options; bad values raise ValueError naming the ``vgpud qemu-args``
    flag.

    ``hotplug``: each device's root port reserves room for its BARs and the device itself is
    left out, to be added with :func:`device_add_commands` once the guest runs.

    ``hugepages`` (a QEMU size such as ``2M`` or ``1G``) backs guest RAM with a hugetlb memfd
    of that page size; the host needs that many huge pages reserved.
    """
    if smp < 1:
        raise ValueError(f"--smp {smp}: must be a positive number of CPUs")
    ram_size = _ram_size(ram)
    page_size = None
    if hugepages is not None:
        page_size = _hugepage_size(hugepages)
        if ram_size % page_size:
            # A hugetlb memfd only takes whole pages: QEMU's ftruncate of it would fail.
            raise ValueError(
                f"--ram {qemu_size(ram_size)} is not a whole number of "
                f"{qemu_size(page_size)} huge pages"
            )
    if arch not in ("x86_64", "aarch64"):
        raise ValueError(f"unknown arch {arch!r} (x86_64 or aarch64)")
    if accel not in ("tcg", "kvm"):
        raise ValueError(f"unknown accel {accel!r} (tcg or kvm)")
    ports = {port_id(index) for index in range(len(devices))}
    for device in devices:
        if not QEMU_ID.fullmatch(device.id):
            raise ValueError(
                f"device name {device.id!r} is not a QEMU device id (a letter, then letters, "
                "digits, '-', '.' or '_'): rename the device (--name, or name in the config)"
            )
        if device.id in ports:  # QEMU: "Duplicate device ID"
            raise ValueError(f"device name {device.id!r} is the id of a root port: rename it")
    nodes = 1 + GI_NODES_PER_GPU * len(devices)
    if numa and nodes > QEMU_MAX_NUMA_NODES:
        raise ValueError(
            f"--numa: {len(devices)} GPUs need {nodes} NUMA nodes, QEMU has at most "
            f"{QEMU_MAX_NUMA_NODES} ({GI_NODES_PER_GPU} per GPU and guest RAM's)"
        )
    if hotplug and numa:
        # The generic-initiator objects name the GPU, which must then exist at start-up, and
        # the guest reads the NUMA affinity from ACPI tables built once, at boot.
        raise ValueError("--numa needs the GPU present at start-up; it cannot be hot-plugged")
    return Machine(
        devices=tuple(devices),
        arch=arch,
        accel=accel,
        smp=smp,
        ram_size=ram_size,
        hugepage_size=page_size,
        numa=numa,
        hotplug=hotplug,
        window=mmio_window(devices, hotplug=hotplug),
    )


def arguments(machine: Machine) -> list[str]:
    """QEMU's arguments for ``machine``."""
    args: list[str] = []
    # With -numa, guest RAM goes to node 0 (memdev=ram0) and -machine memory-backend= is
    # rejected (spec vfio-user.md §11, §14).
    machine_ram = "" if machine.numa else ",memory-backend=ram0"
    accel = machine.accel
    if machine.arch == "x86_64":
        args += ["-machine", f"q35{machine_ram}", "-accel", accel]
        args += [
            "-cpu",
            "host,host-phys-bits=on" if accel == "kvm" else f"max,phys-bits={machine.phys_bits}",
        ]
        if machine.window > Q35_DEFAULT_HOLE64:
            args += ["-global", f"q35-pcihost.pci-hole64-size={qemu_size(machine.window)}"]
    else:
        highmem = virt_highmem_mmio(machine)
        virt = f"virt,gic-version=3{machine_ram}"
        if highmem > VIRT_DEFAULT_HIGHMEM_MMIO:
            virt += f",highmem-mmio-size={qemu_size(highmem)}"
        args += ["-machine", virt, "-accel", accel, "-cpu", "host" if accel == "kvm" else "max"]
    ram = machine.ram
    args += ["-smp", str(machine.smp), "-m", ram]
    # fd-backed and shared: vfio-user DMA hands the server the RAM's fd (spec vfio-user.md
    # §5.7). Huge pages work too: the daemon maps whole pages around QEMU's unaligned sections.
    backend = f"memory-backend-memfd,id=ram0,size={ram},share=on"
    if machine.hugepage_size is not None:
        backend += f",hugetlb=on,hugetlbsize={qemu_size(machine.hugepage_size)}"
    args += ["-object", backend]
    if machine.numa:
        args += ["-numa", f"node,nodeid=0,cpus={machine.cpus()},memdev=ram0"]
    initiators = machine.initiator_nodes()
    for slot, device in enumerate(machine.devices, start=1):
        port = port_id(slot - 1)
        port_args = f"pcie-root-port,id={port},bus=pcie.0,chassis={slot}"
        if machine.arch == "x86_64":
            port_args += f",slot={slot}"
        if machine.hotplug:
            reserves = device.port_reserves()
            args += ["-device", f"{port_args},{reserves}" if reserves else port_args]
            continue
        args += ["-device", port_args]
        args += ["-device", json.dumps(device.device_spec(port), separators=(",", ":"))]
        for owner, node in initiators:
            if owner is device:
                args += ["-numa", f"node,nodeid={node}"]
                args += ["-object", generic_initiator(device, node)]
    return args


def generic_initiator(device: GuestDevice, node: int) -> str:
    """The ``acpi-generic-initiator`` object that ties NUMA ``node`` to ``device``."""
    return f"acpi-generic-initiator,id=gi{node - 1},pci-dev={device.id},node={node}"


def virt_highmem_mmio(machine: Machine) -> int:
    """aarch64 ``virt``'s high MMIO window: at least its default, more if the BARs need it."""
    return max(machine.window, VIRT_DEFAULT_HIGHMEM_MMIO)


def _ram_size(ram: str) -> int:
    """Guest RAM in bytes: a positive whole number of MiB (QEMU's -m unit), with a unit."""
    try:
        size = parse_size(ram)
    except ValueError:
        raise ValueError(f"--ram {ram!r}: not a size (examples: 512M, 4G)") from None
    if size == 0:
        raise ValueError(f"--ram {ram!r}: the guest needs some RAM (e.g. 512M, 4G)")
    if ram.strip().isdigit():
        # QEMU reads a bare -m number as MiB but a bare memory-backend size as bytes.
        raise ValueError(f"--ram {ram!r}: give a unit, e.g. {ram.strip()}M")
    if size % MIB:
        raise ValueError(f"--ram {ram!r}: must be a whole number of MiB (e.g. 512M, 4G)")
    return size


def _hugepage_size(hugepages: str) -> int:
    try:
        size = parse_size(hugepages)
    except ValueError:
        size = 0  # not a size at all: refused below like any unsupported one
    if size not in HUGEPAGE_SIZES:
        choices = " or ".join(qemu_size(s) for s in HUGEPAGE_SIZES)
        raise ValueError(f"--hugepages {hugepages!r}: not a supported huge page size ({choices})")
    return size


def qemu_size(size: int) -> str:
    """``size`` in QEMU's own spelling: ``1G``, ``1536M``, bytes when neither fits."""
    for suffix, unit in (("T", 1 << 40), ("G", 1 << 30), ("M", 1 << 20)):
        if size % unit == 0:
            return f"{size // unit}{suffix}"
    return str(size)


def render_shell(args: Sequence[str], binary: str) -> str:
    """One option per line, shell-quoted, ready to paste."""
    lines = [binary]
    i = 0
    while i < len(args):
        if args[i].startswith("-") and i + 1 < len(args) and not args[i + 1].startswith("-"):
            lines.append(f"{args[i]} {shlex.quote(args[i + 1])}")
            i += 2
        else:
            lines.append(shlex.quote(args[i]))
            i += 1
    return " \\\n  ".join(lines)
