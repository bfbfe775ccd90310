"""``vgpud qemu-args`` output: what QEMU needs to attach the device (spec vfio-user.md §6)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from vgpud.qemu_args import (
    GuestBar,
    GuestDevice,
    arguments,
    device_add_commands,
    mmio_window,
    plan,
    render_shell,
)

BAR0 = GuestBar(16 << 20, prefetchable=False)


def build(devices: list[GuestDevice], **options: Any) -> list[str]:
    """The QEMU arguments for the machine :func:`plan` checks (as ``vgpud qemu-args``)."""
    return arguments(plan(devices, **options))


GH200_BARS = [BAR0, GuestBar(2 << 30), GuestBar(128 << 30)]


def _value(args: list[str], option: str) -> list[str]:
    return [args[i + 1] for i, a in enumerate(args) if a == option]


def test_q35_default_gh200() -> None:
    args = build([GuestDevice("/run/vgpud/gpu0.sock", GH200_BARS)])
    devices = _value(args, "-device")
    assert devices[0].startswith("pcie-root-port,id=rp0,bus=pcie.0")
    spec = json.loads(devices[1])
    assert spec == {
        "driver": "vfio-user-pci",
        "id": "gpu0",
        "bus": "rp0",
        "socket": {"type": "unix", "path": "/run/vgpud/gpu0.sock"},
    }
    assert "memory-backend-memfd,id=ram0,size=1G,share=on" in _value(args, "-object")
    assert _value(args, "-machine") == ["q35,memory-backend=ram0"]
    # 128 GiB + 2 GiB + 16 MiB rounds to 256 GiB; twice that for alignment room.
    assert _value(args, "-global") == ["q35-pcihost.pci-hole64-size=512G"]
    assert _value(args, "-cpu") == ["max,phys-bits=46"]


def test_small_device_needs_no_hole_override() -> None:
    small = GuestDevice("/s", [BAR0, GuestBar(1 << 30), GuestBar(4 << 30)])
    args = build([small])
    assert mmio_window([small]) == 16 << 30
    assert _value(args, "-global") == []


def test_aarch64_numa_generic_initiators() -> None:
    args = build([GuestDevice("/s", [BAR0, GuestBar(512 << 30)])], arch="aarch64", numa=True, smp=2)
    assert _value(args, "-machine") == ["virt,gic-version=3,highmem-mmio-size=2T"]
    numa = _value(args, "-numa")
    assert numa[0] == "node,nodeid=0,cpus=0-1,memdev=ram0"
    assert numa[1:] == [f"node,nodeid={n}" for n in range(1, 9)]
    gis = [o for o in _value(args, "-object") if o.startswith("acpi-generic-initiator")]
    assert gis == [
        f"acpi-generic-initiator,id=gi{n - 1},pci-dev=gpu0,node={n}" for n in range(1, 9)
    ]


def test_tray_gets_distinct_ports_and_nodes() -> None:
    devices = [GuestDevice(f"/s{i}", GH200_BARS, id=f"gpu{i}") for i in range(2)]
    args = build(devices, numa=True)
    ports = [d for d in _value(args, "-device") if d.startswith("pcie-root-port")]
    assert len(ports) == 2 and "chassis=2" in ports[1]
    assert "acpi-generic-initiator,id=gi15,pci-dev=gpu1,node=16" in _value(args, "-object")


def test_numa_stays_within_qemus_nodes() -> None:
    # 8 nodes per GPU and node 0: 15 GPUs take 121 of QEMU's 128 nodes; 16 would need 129
    # (QEMU 11.1.3: "-numa node,nodeid=128: Max number of NUMA nodes reached: 128").
    devices = [GuestDevice(f"/s{i}", GH200_BARS, id=f"gpu{i}") for i in range(16)]
    assert _value(build(devices[:15], numa=True), "-numa")[-1] == "node,nodeid=120"
    with pytest.raises(ValueError, match=r"^--numa: 16 GPUs need 129 NUMA nodes"):
        build(devices, numa=True)


def test_shell_rendering_quotes_json() -> None:
    text = render_shell(build([GuestDevice("/s", GH200_BARS)]), "qemu-system-x86_64")
    assert '\'{"driver":"vfio-user-pci"' in text
    assert text.startswith("qemu-system-x86_64 \\\n  -machine q35,memory-backend=ram0")


def test_hugepages_back_guest_ram() -> None:
    args = build([GuestDevice("/run/vgpud/gpu0.sock", GH200_BARS)], ram="4G", hugepages="1G")
    assert _value(args, "-object") == [
        "memory-backend-memfd,id=ram0,size=4G,share=on,hugetlb=on,hugetlbsize=1G"
    ]
    assert _value(args, "-m") == ["4G"]


@pytest.mark.parametrize(
    ("options", "flag"),
    [
        ({"hugepages": "abc"}, "--hugepages"),
        ({"hugepages": "3M"}, "--hugepages"),
        ({"hugepages": "-2M"}, "--hugepages"),
        ({"ram": "abc"}, "--ram"),
        ({"ram": "0"}, "--ram"),
        ({"ram": "1000K"}, "--ram"),
        ({"ram": "2G", "hugepages": "1G", "smp": -4}, "--smp"),
        ({"ram": "1536M", "hugepages": "1G"}, "--ram"),
    ],
)
def test_bad_guest_sizes_never_reach_qemu(options: dict[str, object], flag: str) -> None:
    with pytest.raises(ValueError, match=f"^{flag} "):
        build([GuestDevice("/s", GH200_BARS)], **options)


@pytest.mark.parametrize("name", ["0", "gpu 0", "gpu,0", "gpu:0", "rp0"])
def test_device_names_qemu_refuses_never_reach_qemu(name: str) -> None:
    # vgpud serves a device of any file-name-safe name, but the name is the GPU's QEMU id:
    # QEMU 11.1.3 refuses "0" and "gpu 0" ("Invalid qdev ID"), and "rp0" is its root port's
    # ("Duplicate device ID").
    with pytest.raises(ValueError, match=f"^device name '{name}'"):
        build([GuestDevice("/s", GH200_BARS, id=name)])
    build([GuestDevice("/s", GH200_BARS, id="tray-a.gpu_0")])


def test_guest_sizes_in_qemu_spelling() -> None:
    args = build([GuestDevice("/s", GH200_BARS)], ram="2GiB", hugepages="2048K")
    assert _value(args, "-m") == ["2G"]
    assert _value(args, "-object") == [
        "memory-backend-memfd,id=ram0,size=2G,share=on,hugetlb=on,hugetlbsize=2M"
    ]


# -- --hotplug ---------------------------------------------------------------------------------


def test_hotplug_leaves_the_gpu_out_and_reserves_room_on_its_port() -> None:
    device = GuestDevice("/run/vgpud/gpu0.sock", GH200_BARS)
    args = build([device], hotplug=True)
    # BAR0 (16 MiB) in the 32-bit window, BAR2 + BAR4 (130 GiB) in the 64-bit one: twice
    # the power-of-two total each, so a naturally aligned block fits wherever it is placed.
    assert _value(args, "-device") == [
        "pcie-root-port,id=rp0,bus=pcie.0,chassis=1,slot=1,mem-reserve=32M,pref64-reserve=512G"
    ]
    # The hole holds the 512 GiB reserve with room to align it.
    assert _value(args, "-global") == ["q35-pcihost.pci-hole64-size=1T"]
    assert device_add_commands([device]) == [
        {
            "execute": "device_add",
            "arguments": {
                "driver": "vfio-user-pci",
                "id": "gpu0",
                "bus": "rp0",
                "socket": {"type": "unix", "path": "/run/vgpud/gpu0.sock"},
            },
        }
    ]


def test_hotplug_tray_adds_each_gpu_to_its_own_port() -> None:
    devices = [GuestDevice(f"/s{i}", GH200_BARS, id=f"gpu{i}") for i in range(2)]
    ports = _value(build(devices, hotplug=True, arch="aarch64"), "-device")
    assert [p.split(",")[1] for p in ports] == ["id=rp0", "id=rp1"]
    assert all("pref64-reserve=512G" in p for p in ports)
    commands = device_add_commands(devices)
    assert [(c["arguments"]["id"], c["arguments"]["bus"]) for c in commands] == [
        ("gpu0", "rp0"),
        ("gpu1", "rp1"),
    ]


def test_hotplug_reserves_only_the_windows_a_device_needs() -> None:
    prefetchable_only = GuestDevice("/s", [GuestBar(1 << 30)])
    assert prefetchable_only.port_reserves() == "pref64-reserve=2G"
    assert GuestDevice("/s", [GuestBar(3 << 20, prefetchable=False)]).port_reserves() == (
        "mem-reserve=8M"
    )
    assert GuestDevice("/s", []).port_reserves() == ""
    assert _value(build([GuestDevice("/s", [])], hotplug=True), "-device") == [
        "pcie-root-port,id=rp0,bus=pcie.0,chassis=1,slot=1"
    ]


def test_guest_addresses_reach_the_end_of_a_large_hole() -> None:
    # 16 hot-plugged GB300s (BAR4 512 GiB each): a 64 TiB hole, which q35 starts at 1 TiB, so
    # it ends above 46 bits (QEMU 11.1.3 with phys-bits=46: "Address space limit
    # 0x3fffffffffff < 0x40ffffffffff phys-bits too low (46)"; 47 starts).
    gb300 = [BAR0, GuestBar(64 << 20), GuestBar(512 << 30)]
    devices = [GuestDevice(f"/s{i}", gb300, id=f"gpu{i}") for i in range(16)]
    args = build(devices, hotplug=True)
    assert _value(args, "-global") == ["q35-pcihost.pci-hole64-size=64T"]
    assert _value(args, "-cpu") == ["max,phys-bits=47"]
    # Half of them fit the default width.
    assert _value(build(devices[:8], hotplug=True), "-cpu") == ["max,phys-bits=46"]


def test_hotplug_refuses_numa() -> None:
    # The generic-initiator objects name the GPU, so it must be there at start-up.
    with pytest.raises(ValueError, match=r"^--numa needs the GPU present at start-up"):
        build([GuestDevice("/s", GH200_BARS)], hotplug=True, numa=True)
