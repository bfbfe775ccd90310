"""What a guest attached with ``vgpud qemu-args --numa`` must see (spec nvgrace-gpu.md §11.1):
8 memory-less, CPU-less NUMA nodes per GPU, each a generic initiator whose ACPI SRAT entry
names the GPU. Shared by the aarch64 guest (QEMU arguments) and the libvirt guest (domain)."""

from __future__ import annotations

from tests.e2e.initramfs import GuestResults

GI_NODES = range(1, 9)  # `vgpud qemu-args --numa`: 8 nodes per GPU
SRAT_HEADER = 48  # ACPI table header (36) + SRAT reserved (12)
SRAT_GENERIC_INITIATOR = 5
GI_HANDLE_PCI = 1

# Appended to a guest script that found the GPU (vg_find_dev sets $BDF).
NUMA_SCRIPT = (
    'vg_kv gi_nodes "$(cat /sys/devices/system/node/has_generic_initiator)"\n'
    "vg_kv srat \"$(od -An -tx1 -v /sys/firmware/acpi/tables/SRAT | tr -d ' \\n')\"\n"
    "for n in 1 2 3 4 5 6 7 8; do\n"
    '  vg_kv node${n}_cpus "$(cat /sys/devices/system/node/node$n/cpulist)"\n'
    "  vg_kv node${n}_mem_kb "
    "\"$(awk '/MemTotal/ {print $4}' /sys/devices/system/node/node$n/meminfo)\"\n"
    "done"
)


def generic_initiators(srat: bytes) -> list[tuple[int, int, bytes]]:
    """(proximity domain, segment, BDF bytes) of every PCI generic-initiator affinity entry."""
    entries = []
    offset = SRAT_HEADER
    while offset + 2 <= len(srat):
        kind, length = srat[offset], srat[offset + 1]
        if length == 0:
            break
        entry = srat[offset : offset + length]
        if kind == SRAT_GENERIC_INITIATOR and entry[3] == GI_HANDLE_PCI:
            domain = int.from_bytes(entry[4:8], "little")
            segment = int.from_bytes(entry[8:10], "little")
            entries.append((domain, segment, bytes(entry[10:12])))
        offset += length
    return entries


def numa_mismatches(results: GuestResults) -> list[str]:
    """Everything :data:`NUMA_SCRIPT`'s output says is wrong (empty: all as expected)."""
    values = results.values
    bad = []
    if values.get("gi_nodes") != "1-8":
        bad.append(f"generic-initiator nodes {values.get('gi_nodes')!r}, not '1-8'")
    for node in GI_NODES:
        if values.get(f"node{node}_cpus") != "":
            bad.append(f"node{node} has CPUs {values.get(f'node{node}_cpus')!r}")
        if values.get(f"node{node}_mem_kb") != "0":
            bad.append(f"node{node} has memory ({values.get(f'node{node}_mem_kb')!r} kB)")
    segment, bus, device_fn = values["bdf"].split(":")
    dev, fn = device_fn.split(".")
    devfn = int(dev, 16) << 3 | int(fn, 16)
    initiators = generic_initiators(bytes.fromhex(values["srat"]))
    domains = [domain for domain, _, _ in sorted(initiators)]
    if domains != list(GI_NODES):
        bad.append(f"SRAT generic initiators for domains {domains}, not 1-8")
    # The handle names our GPU. ACPI's 16-bit BDF is bus in bits 15:8; the guest NVIDIA
    # driver also accepts the bytes swapped (old hypervisors), so either order is the GPU.
    ours = {bytes([devfn, int(bus, 16)]), bytes([int(bus, 16), devfn])}
    for domain, seg, handle in initiators:
        if seg != int(segment, 16) or handle not in ours:
            bad.append(
                f"SRAT initiator {domain} names {seg:04x}/{handle.hex()}, not {values['bdf']}"
            )
    return bad
