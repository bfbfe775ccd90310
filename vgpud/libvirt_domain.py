"""``vgpud qemu-args --libvirt``: the same machine as a libvirt domain (XML).

libvirt (12.8, the newest checked) has no element for a vfio-user device nor for
``acpi-generic-initiator``, so those go through its QEMU passthrough namespace
(``<qemu:commandline>``); everything libvirt does model is written the libvirt way, so that
libvirt keeps managing it:

- guest RAM: ``<memoryBacking>`` memfd + shared, which libvirt turns into the fd-backed
  ``memory-backend-memfd,share=on`` vfio-user DMA needs (spec vfio-user.md §5.7);
- the 64-bit MMIO window: ``<pcihole64>`` on ``pcie-root`` (q35 ``pci-hole64-size``) and the
  guest's physical address width, ``<maxphysaddr>``, wide enough for it (§6, §11); on aarch64
  ``virt`` its ``highmem-mmio-size`` has no element and goes through ``<qemu:commandline>``
  as a second ``-machine``, which QEMU merges into libvirt's (seen with QEMU 11.1.3);
- the memory-less NUMA nodes of ``--numa``: ``<cell memory='0'>`` (spec nvgrace-gpu.md §11.1).

The GPU's root port goes through ``<qemu:commandline>`` too, at a fixed address libvirt does
not hand out. A root port that libvirt manages is one it also fills: it puts its own
auto-addressed devices (the USB controller, the balloon) on the first free root port, and
the GPU then lands in slot 1 of its port, where a root port has no slot (seen with libvirt
12.8 and QEMU 11.1.3: "slot 1 is not valid for vfio-user-pci", and the guest has no GPU).
Being ours, the port also takes the resource-reserve hints a hot-plugged GPU needs.
libvirt places its root ports from slot 1 of ``pcie.0`` upwards (seen: 00:01.0-00:01.2) and
keeps 0x1d-0x1f for q35's fixed devices, so slot 0x1c (up to 8 functions) is left alone (on
``virt`` too).

The domain is a starting point: no disk, no kernel, no console, no network; add those.
"""

from __future__ import annotations

import json
import re
import shlex
import xml.etree.ElementTree as ET

from vgpud.qemu_args import (
    Q35_DEFAULT_HOLE64,
    VIRT_DEFAULT_HIGHMEM_MMIO,
    Machine,
    device_add_commands,
    generic_initiator,
    port_id,
    qemu_size,
    virt_highmem_mmio,
)

QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"
# Where the GPUs' root ports go on pcie.0 (see the module docstring): one function each.
ROOT_PORT_SLOT = 0x1C
MAX_DEVICES = 8


def domain_xml(machine: Machine, *, name: str = "vgpud") -> str:
    """The libvirt domain for ``machine`` (from :func:`vgpud.qemu_args.plan`). ValueError
    for what this form cannot express.

    ``machine.hotplug``: the GPUs' root ports reserve room for their BARs and the GPUs are
    left out; a comment at the end gives the ``virsh qemu-monitor-command`` that adds each
    (QMP ``device_add``: libvirt's own attach-device has no vfio-user device)."""
    if len(machine.devices) > MAX_DEVICES:
        raise ValueError(f"--libvirt attaches at most {MAX_DEVICES} devices")
    domain = ET.Element("domain", type="kvm" if machine.accel == "kvm" else "qemu")
    domain.set("xmlns:qemu", QEMU_NS)
    _text(domain, "name", name)
    _text(domain, "memory", str(machine.ram_size >> 20), unit="MiB")
    _text(domain, "vcpu", str(machine.smp))
    domain.append(_memory_backing(machine))
    x86 = machine.arch == "x86_64"
    # aarch64: the guest must boot UEFI to get ACPI (libvirt refuses <acpi/> otherwise);
    # libvirt picks the edk2 build from the host's firmware descriptors.
    os_element = ET.SubElement(domain, "os", {} if x86 else {"firmware": "efi"})
    _text(os_element, "type", "hvm", arch=machine.arch, machine="q35" if x86 else "virt")
    features = ET.SubElement(domain, "features")
    ET.SubElement(features, "acpi")
    if x86:
        ET.SubElement(features, "apic")
    else:
        ET.SubElement(features, "gic", version="3")
    domain.append(_cpu(machine))
    devices = ET.SubElement(domain, "devices")
    root = ET.SubElement(devices, "controller", type="pci", index="0", model="pcie-root")
    if x86 and machine.window > Q35_DEFAULT_HOLE64:
        _text(root, "pcihole64", str(machine.window >> 10), unit="KiB")
    domain.append(_commandline(machine))
    rendered = _render(domain)
    if machine.hotplug:  # the last thing in the domain, before its closing tag
        closing = "</domain>\n"
        assert rendered.endswith(closing)
        comment = f"  <!--{_hotplug_comment(machine, name)}-->\n"
        rendered = rendered.removesuffix(closing) + comment + closing
    return rendered


def hotplug_commands(machine: Machine, name: str) -> list[str]:
    """The shell commands that hot-add each GPU of a ``hotplug`` machine to the running
    domain ``name``, one per GPU, in port order."""
    return [
        shlex.join(
            ["virsh", "qemu-monitor-command", name, json.dumps(command, separators=(",", ":"))]
        )
        for command in device_add_commands(machine.devices)
    ]


def _hotplug_comment(machine: Machine, name: str) -> str:
    lines = [
        " The GPUs are hot-plugged: once the domain runs, add each with",
        *(f"   {command}" for command in hotplug_commands(machine, name)),
        # Seen with QEMU 11.1.3 (captures README), as the QEMU form says too.
        " Removing one (device_del) aborts QEMU 11.1.3 unless vgpud serves that GPU",
        " without MSI-X (its no-msix flag). ",
    ]
    # A comment may not hold "--" (nor end in "-"). A dash before another is written "-''",
    # which the shell reads as that dash in a bare word and in a single-quoted one alike (all
    # shlex quotes), so the commands paste as they are meant: the JSON's socket path, and the
    # domain name, where a JSON escape would not do.
    return re.sub("-(?=-)", "-''", "\n".join(lines))


def _memory_backing(machine: Machine) -> ET.Element:
    backing = ET.Element("memoryBacking")
    if machine.hugepage_size is not None:
        pages = ET.SubElement(backing, "hugepages")
        ET.SubElement(pages, "page", size=str(machine.hugepage_size >> 10), unit="KiB")
    ET.SubElement(backing, "source", type="memfd")
    ET.SubElement(backing, "access", mode="shared")
    return backing


def _cpu(machine: Machine) -> ET.Element:
    x86 = machine.arch == "x86_64"
    if machine.accel == "kvm":
        cpu = ET.Element("cpu", mode="host-passthrough", check="none")
        if x86:
            ET.SubElement(cpu, "maxphysaddr", mode="passthrough")
    else:
        cpu = ET.Element("cpu", mode="maximum", match="exact", check="none")
        if x86:  # arm64's address width is the CPU model's own (libvirt: x86 only)
            ET.SubElement(cpu, "maxphysaddr", mode="emulate", bits=str(machine.phys_bits))
    if machine.numa:
        numa = ET.SubElement(cpu, "numa")
        ram = str(machine.ram_size >> 20)
        ET.SubElement(numa, "cell", id="0", cpus=machine.cpus(), memory=ram, unit="MiB")
        for _, node in machine.initiator_nodes():
            ET.SubElement(numa, "cell", id=str(node), memory="0", unit="KiB")
    return cpu


def _commandline(machine: Machine) -> ET.Element:
    commandline = ET.Element("qemu:commandline")

    def arg(option: str, value: str) -> None:
        ET.SubElement(commandline, "qemu:arg", value=option)
        ET.SubElement(commandline, "qemu:arg", value=value)

    highmem = virt_highmem_mmio(machine)
    if machine.arch == "aarch64" and highmem > VIRT_DEFAULT_HIGHMEM_MMIO:
        # No libvirt element for it; QEMU merges a second -machine into libvirt's.
        arg("-machine", f"highmem-mmio-size={qemu_size(highmem)}")
    initiators = machine.initiator_nodes()
    for index, device in enumerate(machine.devices):
        port = port_id(index)
        # chassis/slot as the QEMU form numbers them; libvirt's own root ports have slot 0,
        # so the pairs cannot collide.
        root_port = (
            f"pcie-root-port,id={port},bus=pcie.0,addr={ROOT_PORT_SLOT:#x}.{index:#x},"
            f"chassis={index + 1},slot={index + 1}"
        )
        if index == 0 and len(machine.devices) > 1:
            root_port += ",multifunction=on"
        if machine.hotplug:
            # Room for BARs that are not there when the firmware sizes the bridge windows
            # (the QEMU form's reasons, vgpud/qemu_args.py).
            reserves = device.port_reserves()
            arg("-device", f"{root_port},{reserves}" if reserves else root_port)
            continue
        arg("-device", root_port)
        # JSON: the dotted form cannot build the socket object (spec vfio-user.md §5.1).
        arg("-device", json.dumps(device.device_spec(port), separators=(",", ":")))
        for owner, node in initiators:
            if owner is device:
                arg("-object", generic_initiator(device, node))
    return commandline


def _text(parent: ET.Element, tag: str, text: str, **attributes: str) -> ET.Element:
    element = ET.SubElement(parent, tag, attributes)
    element.text = text
    return element


def _render(element: ET.Element, depth: int = 0) -> str:
    """XML as libvirt writes it: two-space indents and single-quoted attributes, so the
    JSON device reads as itself rather than as a wall of ``&quot;``."""
    pad = "  " * depth
    attributes = "".join(f" {key}='{_escape(value)}'" for key, value in element.attrib.items())
    children = list(element)
    if not children and element.text is None:
        return f"{pad}<{element.tag}{attributes}/>\n"
    if not children:
        return f"{pad}<{element.tag}{attributes}>{_escape(element.text or '')}</{element.tag}>\n"
    inner = "".join(_render(child, depth + 1) for child in children)
    return f"{pad}<{element.tag}{attributes}>\n{inner}{pad}</{element.tag}>\n"


def _escape(value: str) -> str:
    # Whitespace other than spaces is kept as character references: a parser normalises a
    # literal newline or tab in an attribute to a space.
    for char, reference in (("&", "&amp;"), ("<", "&lt;"), ("'", "&apos;")):
        value = value.replace(char, reference)
    return value.replace("\n", "&#10;").replace("\r", "&#13;").replace("\t", "&#9;")


__all__ = ["MAX_DEVICES", "QEMU_NS", "ROOT_PORT_SLOT", "domain_xml", "hotplug_commands"]
