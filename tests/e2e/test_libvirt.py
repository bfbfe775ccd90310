"""The domain ``vgpud qemu-args --libvirt`` prints, booted by a real libvirt (sid's 12.8, in
session mode: tests/e2e/libvirt.py) on the QEMU 11.1 asset. Last, a GPU hot-added to a
running domain with the command ``--libvirt --hotplug`` prints.

One guest (module-scoped scenario), attached with ``--numa``: the test adds only what the
domain leaves to its user (kernel, initrd, console, emulator path), then checks what the guest
saw (the GPU, its BARs, its memory through them, the generic-initiator NUMA nodes), what
libvirt made of the domain (the QEMU command line in its domain log), and what vgpud served.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from typing import Any

import pytest
import trio

from tests.e2e.assets import Assets
from tests.e2e.expect import NVIDIA
from tests.e2e.harness import Device, Harness, ScenarioRun, run_scenario
from tests.e2e.initramfs import GuestResults, GuestScript
from tests.e2e.numa import NUMA_SCRIPT, numa_mismatches
from tests.e2e.plans import Plan, assert_bars_assigned, bar_facts, describe_script, memory_plan
from tests.e2e.qemu import vgpud_output

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

DOMAIN = "vgpud-e2e"


@dataclass
class LibvirtRun:
    device: Device
    plan: Plan
    domain_xml: str
    results: GuestResults
    domain_log: str
    host_mismatches: list[str]
    events: list[dict[str, Any]]
    libvirtd_log: str
    expected_version: str  # the libvirt asset's


def _qemu_args_libvirt(device: Device) -> str:
    """What a user runs: ``vgpud qemu-args --libvirt`` for the device."""
    argv = ["qemu-args", "--libvirt", "--numa", "--domain-name", DOMAIN]
    argv += ["--socket-path", str(device.socket_path), "--profile", device.profile]
    if device.memory_size:
        argv += ["--memory-size", device.memory_size]
    return vgpud_output(*argv)


@pytest.fixture(scope="module")
def libvirt_guest(assets: Assets) -> ScenarioRun:
    async def body(h: Harness) -> LibvirtRun:
        # The default size (96 GiB): its 128 GiB BAR4 needs more than q35's default 32 GiB
        # window, so the domain carries a <pcihole64>.
        device = h.device("gh200")
        plan = memory_plan(device.expected)
        daemon = await h.start_vgpud(device)
        domain_xml = _qemu_args_libvirt(device)
        libvirtd = await h.start_libvirt()
        results = await h.boot_libvirt(
            libvirtd, domain_xml, plan.script(describe_script()).raw(NUMA_SCRIPT)
        )
        with trio.fail_after(30):  # QEMU has exited; vgpud sees its socket close
            await daemon.log.wait_for('"event": "client disconnected"')
        return LibvirtRun(
            device,
            plan,
            domain_xml,
            results,
            libvirtd.domain_log(DOMAIN),
            plan.host_mismatches(device.files),
            daemon.events(),
            libvirtd.log.text(),
            libvirtd.libvirt.version,
        )

    return run_scenario(assets, body)


def _run(scenario: ScenarioRun) -> LibvirtRun:
    run: LibvirtRun = scenario.get()
    return run


def test_libvirt_guest_finished(libvirt_guest: ScenarioRun) -> None:
    run = _run(libvirt_guest)
    assert f"libvirt version: {run.expected_version}," in run.libvirtd_log, run.libvirtd_log
    assert run.results.values.get("device_found") == "yes"
    assert run.results.done_rc == 0, "the guest script stopped early (see the serial log)"


def test_libvirt_guest_sees_the_gpu_and_its_bars(libvirt_guest: ScenarioRun) -> None:
    run = _run(libvirt_guest)
    values, expected = run.results.values, run.device.expected
    assert int(values["vendor"], 16) == NVIDIA
    assert int(values["device"], 16) == expected.device_id
    bar4 = bar_facts(run.results, 4)
    assert bar4["size"] == expected.usemem_bar and bar4["prefetch"] and bar4["mem64"], bar4
    assert bar4["start"] % bar4["size"] == 0, "BAR4 not naturally aligned"
    assert bar_facts(run.results, 2)["size"] == expected.resmem_bar


def test_libvirt_guest_memory_reaches_the_backing_files(libvirt_guest: ScenarioRun) -> None:
    run = _run(libvirt_guest)
    bad = run.plan.mismatches(run.results) + run.host_mismatches
    assert not bad, "\n".join(bad)


def test_libvirt_guest_has_the_generic_initiator_nodes(libvirt_guest: ScenarioRun) -> None:
    """``--numa`` as libvirt cells with memory='0' plus the passthrough initiators."""
    bad = numa_mismatches(_run(libvirt_guest).results)
    assert not bad, "\n".join(bad)


def test_libvirt_made_the_machine_from_its_own_elements(libvirt_guest: ScenarioRun) -> None:
    """What the domain says the libvirt way reached QEMU: shared memfd RAM (for DMA), the
    64-bit window, the address width, the memory-less nodes; and the GPU sits in slot 0 of
    the root port at 00:1c (libvirt put none of its own devices there)."""
    log = _run(libvirt_guest).domain_log
    assert '"qom-type":"memory-backend-memfd"' in log and '"share":true' in log, log
    assert "q35-pcihost.pci-hole64-size=" in log, log
    assert "phys-bits=46" in log, log
    assert "-numa node,nodeid=8" in log, log
    assert "addr=0x1c.0x0" in log, log
    assert log.count('"bus":"rp0"') == 1, "libvirt placed a device of its own on the GPU's port"
    assert "not valid for vfio-user-pci" not in log, log


def test_vgpud_served_the_libvirt_guest(libvirt_guest: ScenarioRun) -> None:
    events = [e.get("event") for e in _run(libvirt_guest).events]
    assert events.count("client connected") == 1, events
    assert "negotiated" in events and "client disconnected" in events, events


async def test_libvirt_hot_added_gpu_gets_its_bars(harness: Harness) -> None:
    """``qemu-args --libvirt --hotplug``: the domain boots with the GPU's root port only (its
    reserve hints on it), and the ``virsh qemu-monitor-command`` its closing comment gives
    adds the GPU to the running guest, which finds it with its BARs assigned and uses them."""
    device = harness.device("gh200")
    expected = device.expected
    plan = memory_plan(expected)
    daemon = await harness.start_vgpud(device)
    domain = vgpud_output(
        "qemu-args", "--libvirt", "--hotplug", "--domain-name", "vgpud-hotplug",
        "--socket-path", str(device.socket_path),
    )  # fmt: skip
    commands = [
        shlex.split(line.strip())
        for line in domain.splitlines()
        if line.strip().startswith("virsh qemu-monitor-command")
    ]
    assert len(commands) == 1, domain
    script = GuestScript().kv("booted", "yes").wait_for_device(within_s=60)
    script.describe().enable().bar_base(2).bar_base(4)
    libvirtd = await harness.start_libvirt()
    guest = await harness.start_libvirt_guest(libvirtd, domain, plan.script(script))
    with trio.fail_after(240):
        await guest.serial.wait_for(r"^VGTEST booted=yes")
    assert "client connected" not in [e.get("event") for e in daemon.events()]
    await libvirtd.virsh(*commands[0][1:])  # as printed, with the test's virsh
    results = await guest.run(240)
    assert results.values.get("device_found") == "yes", "the guest never saw the hot-added GPU"
    assert int(results.values["device"], 16) == expected.device_id
    assert_bars_assigned(results, {2: expected.resmem_bar, 4: expected.usemem_bar})
    bad = plan.mismatches(results) + plan.host_mismatches(device.files)
    assert not bad, "\n".join(bad)
    log = libvirtd.domain_log("vgpud-hotplug")
    assert "pref64-reserve=512G" in log and '"vfio-user-pci"' not in log, log
    # libvirt notes that the domain was changed behind its back (docs/operations.md).
    assert "tainted: custom-monitor" in log, log
