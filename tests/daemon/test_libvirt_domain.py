"""``vgpud qemu-args --libvirt``: the machine of ``qemu-args`` as a libvirt domain.

Parsed back with ElementTree, as libvirt parses it. That libvirt accepts and runs it is
tests/e2e/test_libvirt.py's business (a real libvirt 12.8 boots it).
"""

from __future__ import annotations

import json
import shlex
import xml.etree.ElementTree as ET

import pytest

from tests.daemon.test_cli_flags import _usage_error
from tests.daemon.test_qemu_args import build
from vgpud import cli
from vgpud.libvirt_domain import MAX_DEVICES, QEMU_NS, _render, domain_xml, hotplug_commands
from vgpud.qemu_args import GuestBar, GuestDevice, device_add_commands, plan

BAR0 = GuestBar(16 << 20, prefetchable=False)
GH200_BARS = [BAR0, GuestBar(2 << 30), GuestBar(128 << 30)]
SMALL_BARS = [BAR0, GuestBar(1 << 30), GuestBar(4 << 30)]


def _domain(devices: list[GuestDevice], **options: object) -> ET.Element:
    return ET.fromstring(domain_xml(plan(devices, **options)))  # type: ignore[arg-type]


def _passthrough(domain: ET.Element) -> list[tuple[str, str]]:
    """(option, value) pairs of ``<qemu:commandline>``."""
    args = [a.get("value", "") for a in domain.iter(f"{{{QEMU_NS}}}arg")]
    return list(zip(args[::2], args[1::2], strict=True))


def test_default_gh200_domain() -> None:
    domain = _domain([GuestDevice("/run/vgpud/gpu0.sock", GH200_BARS)])
    assert domain.tag == "domain" and domain.get("type") == "qemu"
    assert domain.findtext("name") == "vgpud"
    assert domain.findtext("memory") == "1024" and domain.find("memory").get("unit") == "MiB"  # type: ignore[union-attr]
    backing = domain.find("memoryBacking")
    assert backing is not None
    # fd-backed, shared guest RAM: what vfio-user DMA needs (spec vfio-user.md §5.7).
    assert backing.find("source").get("type") == "memfd"  # type: ignore[union-attr]
    assert backing.find("access").get("mode") == "shared"  # type: ignore[union-attr]
    os_type = domain.find("os/type")
    assert os_type is not None and os_type.get("machine") == "q35"
    assert domain.find("os").attrib == {}  # type: ignore[union-attr]  # SeaBIOS is fine
    cpu = domain.find("cpu")
    assert cpu is not None and cpu.get("mode") == "maximum"
    assert cpu.find("maxphysaddr").attrib == {"mode": "emulate", "bits": "46"}  # type: ignore[union-attr]
    # The same window as the QEMU form (512G), in KiB.
    hole = domain.find("devices/controller[@model='pcie-root']/pcihole64")
    assert hole is not None and hole.get("unit") == "KiB" and int(hole.text or 0) << 10 == 512 << 30
    assert "q35-pcihost.pci-hole64-size=512G" in build(
        [GuestDevice("/run/vgpud/gpu0.sock", GH200_BARS)]
    )
    passthrough = _passthrough(domain)
    assert [option for option, _ in passthrough] == ["-device", "-device"]
    assert passthrough[0][1] == "pcie-root-port,id=rp0,bus=pcie.0,addr=0x1c.0x0,chassis=1,slot=1"
    assert json.loads(passthrough[1][1]) == {
        "driver": "vfio-user-pci",
        "id": "gpu0",
        "bus": "rp0",
        "socket": {"type": "unix", "path": "/run/vgpud/gpu0.sock"},
    }


def test_small_device_keeps_the_default_window() -> None:
    domain = _domain([GuestDevice("/s", SMALL_BARS)])
    assert domain.find("devices/controller/pcihole64") is None


def test_socket_path_survives_xml_quoting() -> None:
    path = '/tmp/it\'s <a> & "b"'
    domain = _domain([GuestDevice(path, SMALL_BARS)])
    assert json.loads(_passthrough(domain)[1][1])["socket"]["path"] == path


def test_rendered_attributes_keep_their_whitespace() -> None:
    # A parser turns a literal newline or tab in an attribute into a space.
    element = ET.Element("arg", value="a\nb\tc\rd 'e' & <f>")
    assert ET.fromstring(_render(element)).get("value") == "a\nb\tc\rd 'e' & <f>"


def test_tray_ports_are_functions_of_one_slot() -> None:
    gpus = [GuestDevice(f"/s{i}", SMALL_BARS, id=f"gpu{i}") for i in range(4)]
    passthrough = _passthrough(_domain(gpus))
    ports = [value for option, value in passthrough if value.startswith("pcie-root-port")]
    assert ports == [
        "pcie-root-port,id=rp0,bus=pcie.0,addr=0x1c.0x0,chassis=1,slot=1,multifunction=on",
        "pcie-root-port,id=rp1,bus=pcie.0,addr=0x1c.0x1,chassis=2,slot=2",
        "pcie-root-port,id=rp2,bus=pcie.0,addr=0x1c.0x2,chassis=3,slot=3",
        "pcie-root-port,id=rp3,bus=pcie.0,addr=0x1c.0x3,chassis=4,slot=4",
    ]
    buses = [json.loads(v)["bus"] for _, v in passthrough if v.startswith("{")]
    assert buses == ["rp0", "rp1", "rp2", "rp3"]


def test_numa_cells_and_generic_initiators() -> None:
    gpus = [GuestDevice(f"/s{i}", SMALL_BARS, id=f"gpu{i}") for i in range(2)]
    domain = _domain(gpus, numa=True, smp=4, ram="2G")
    cells = domain.findall("cpu/numa/cell")
    assert cells[0].attrib == {"id": "0", "cpus": "0-3", "memory": "2048", "unit": "MiB"}
    # 8 memory-less, CPU-less nodes per GPU (spec nvgrace-gpu.md §11.1).
    assert [c.get("id") for c in cells[1:]] == [str(n) for n in range(1, 17)]
    assert all(c.get("memory") == "0" and c.get("cpus") is None for c in cells[1:])
    objects = [value for option, value in _passthrough(domain) if option == "-object"]
    assert objects[0] == "acpi-generic-initiator,id=gi0,pci-dev=gpu0,node=1"
    assert objects[15] == "acpi-generic-initiator,id=gi15,pci-dev=gpu1,node=16"
    # The same objects as the QEMU form.
    qemu = build(gpus, numa=True, smp=4, ram="2G")
    assert objects == [qemu[i + 1] for i, a in enumerate(qemu) if a == "-object"][1:]


def test_kvm_and_hugepages() -> None:
    domain = _domain([GuestDevice("/s", SMALL_BARS)], accel="kvm", hugepages="1G", ram="4G")
    assert domain.get("type") == "kvm"
    cpu = domain.find("cpu")
    assert cpu is not None and cpu.get("mode") == "host-passthrough"
    assert cpu.find("maxphysaddr").attrib == {"mode": "passthrough"}  # type: ignore[union-attr]
    page = domain.find("memoryBacking/hugepages/page")
    assert page is not None and page.attrib == {"size": "1048576", "unit": "KiB"}


def test_guest_addresses_reach_the_end_of_a_large_hole() -> None:
    # The QEMU form's width (test_qemu_args.py): a 64 TiB hole from 1 TiB needs 47 bits.
    gb300 = [BAR0, GuestBar(64 << 20), GuestBar(512 << 30)]
    devices = [GuestDevice(f"/s{i}", gb300, id=f"gpu{i}") for i in range(MAX_DEVICES)]
    domain = ET.fromstring(domain_xml(plan(devices, hotplug=True, ram="16G")))
    assert domain.find("cpu/maxphysaddr").attrib == {"mode": "emulate", "bits": "46"}  # type: ignore[union-attr]
    # MAX_DEVICES GPUs of twice the memory: the same 64 TiB.
    big = [BAR0, GuestBar(64 << 20), GuestBar(1 << 40)]
    devices = [GuestDevice(f"/s{i}", big, id=f"gpu{i}") for i in range(MAX_DEVICES)]
    domain = ET.fromstring(domain_xml(plan(devices, hotplug=True)))
    assert domain.find("cpu/maxphysaddr").attrib == {"mode": "emulate", "bits": "47"}  # type: ignore[union-attr]


def test_aarch64_domain() -> None:
    """``virt`` with GICv3; no pcihole64 and no maxphysaddr (x86 elements); a window larger
    than virt's default 512 GiB as a second ``-machine`` (GB200 186 GiB: BAR4 256 GiB)."""
    gb200 = [BAR0, GuestBar(64 << 20), GuestBar(256 << 30)]
    domain = _domain([GuestDevice("/s", gb200)], arch="aarch64")
    os_type = domain.find("os/type")
    assert os_type is not None and os_type.attrib == {"arch": "aarch64", "machine": "virt"}
    # UEFI, or libvirt refuses <acpi/> on arm64 (and the guest would have no ACPI tables).
    assert domain.find("os").attrib == {"firmware": "efi"}  # type: ignore[union-attr]
    assert domain.find("features/gic").attrib == {"version": "3"}  # type: ignore[union-attr]
    assert domain.find("features/apic") is None
    assert domain.find("cpu/maxphysaddr") is None
    assert domain.find("devices/controller/pcihole64") is None
    passthrough = _passthrough(domain)
    assert passthrough[0] == ("-machine", "highmem-mmio-size=1T")
    assert "virt,gic-version=3,memory-backend=ram0,highmem-mmio-size=1T" in build(
        [GuestDevice("/s", gb200)], arch="aarch64"
    )
    # Within virt's default window: nothing to add.
    small = _domain([GuestDevice("/s", SMALL_BARS)], arch="aarch64", accel="kvm")
    assert [option for option, _ in _passthrough(small)] == ["-device", "-device"]
    assert small.find("cpu").attrib == {"mode": "host-passthrough", "check": "none"}  # type: ignore[union-attr]


def test_hotplug_leaves_the_gpu_out_and_says_how_to_add_it() -> None:
    """The port carries the QEMU form's reserve hints; the GPU is not in the domain; the
    closing comment's command is the QEMU form's device_add, through virsh."""
    path = "/run/vgpud--a/gpu0.sock"  # "--" cannot stand in an XML comment
    machine = plan([GuestDevice(path, GH200_BARS)], hotplug=True)
    rendered = domain_xml(machine, name="vm1")
    domain = ET.fromstring(rendered)  # the comment keeps the XML well-formed
    passthrough = _passthrough(domain)
    assert passthrough == [
        (
            "-device",
            "pcie-root-port,id=rp0,bus=pcie.0,addr=0x1c.0x0,chassis=1,slot=1,"
            "mem-reserve=32M,pref64-reserve=512G",
        )
    ]
    qemu = build([GuestDevice(path, GH200_BARS)], hotplug=True)
    assert qemu[-1].endswith("mem-reserve=32M,pref64-reserve=512G")
    printed = [line.strip() for line in rendered.splitlines() if "qemu-monitor-command" in line]
    assert len(printed) == 1
    argv = shlex.split(printed[0])
    assert argv[:3] == ["virsh", "qemu-monitor-command", "vm1"]
    assert json.loads(argv[3]) == device_add_commands(machine.devices)[0]
    assert "--" not in rendered.split("<!--", 1)[1].split("-->", 1)[0]
    assert hotplug_commands(machine, "vm1") == [shlex.join(argv)]


def test_hotplug_command_names_the_domain_it_was_printed_for() -> None:
    # "--" cannot stand in the comment, in the domain name either, where the JSON's escape
    # ("vm-\u002d1") reads as another name in the shell and virsh finds no such domain.
    path = "/run/vgpud---a/gpu0.sock"
    machine = plan([GuestDevice(path, GH200_BARS)], hotplug=True)
    for name in ("vm--1", "my vm--1's"):
        rendered = domain_xml(machine, name=name)
        comment = rendered.split("<!--", 1)[1].split("-->", 1)[0]
        assert "--" not in comment
        printed = [line for line in comment.splitlines() if "qemu-monitor-command" in line]
        argv = shlex.split(printed[0])
        assert argv[:3] == ["virsh", "qemu-monitor-command", name]
        assert json.loads(argv[3])["arguments"]["socket"]["path"] == path


def test_too_many_devices_are_refused() -> None:
    gpus = [GuestDevice(f"/s{i}", SMALL_BARS, id=f"gpu{i}") for i in range(MAX_DEVICES + 1)]
    with pytest.raises(ValueError, match=f"at most {MAX_DEVICES} devices"):
        domain_xml(plan(gpus))


def test_cli_prints_the_domain(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["qemu-args", "--socket-path", "/s", "--libvirt", "--domain-name", "vm1"]
    assert cli.main(argv) == 0
    domain = ET.fromstring(capsys.readouterr().out)
    assert domain.findtext("name") == "vm1"
    device = json.loads(_passthrough(domain)[1][1])
    assert device["socket"]["path"] == "/s"


def test_cli_refusals(capsys: pytest.CaptureFixture[str]) -> None:
    err = _usage_error(
        capsys, ["qemu-args", "--socket-path", "/s", "--libvirt", "--numa", "--hotplug"]
    )
    assert err.startswith("vgpud: --numa needs the GPU present at start-up")
    with pytest.raises(SystemExit):  # argparse: the two outputs are exclusive
        cli.main(["qemu-args", "--libvirt", "--json"])
    assert "not allowed with argument" in capsys.readouterr().err
