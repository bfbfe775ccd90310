"""GPU hot-plug: ``vgpud qemu-args --hotplug`` starts the guest with an empty root port whose
resource-reserve hints leave room for the GPU's BARs, and QMP ``device_add`` (the command it
prints) attaches the device to the running guest.

Without the hints the hot-added GPU is enumerated with none of its BARs assigned: the firmware
gives an empty port no room for a 128 GiB BAR (seen with QEMU 11.1.3, SeaBIOS, Linux 6.1).
"""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import trio

from tests.e2e.engines import ENGINES
from tests.e2e.harness import Device, Harness
from tests.e2e.initramfs import GuestScript
from tests.e2e.plans import assert_bars_assigned, bar_facts, memory_plan
from tests.e2e.qemu import vgpud_json

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]


@pytest.mark.parametrize("engine", ENGINES)
async def test_hot_added_gpu_gets_its_bars_and_serves_its_memory(
    harness: Harness, engine: list[str]
) -> None:
    # The default 96 GiB gh200: a 128 GiB BAR4 and a 1 GiB BAR2 (a 512 GiB reserve).
    await hot_add_and_check(harness, harness.device("gh200"), engine)


async def hot_add_and_check(harness: Harness, device: Device, engine: Sequence[str] = ()) -> None:
    """Boot without the GPU, hot-add it, and check its BARs from the guest and the host."""
    expected = device.expected
    arch = harness.assets.arch
    # arm64 faults on unaligned device-memory accesses (vfio-user.md §14).
    plan = memory_plan(expected, unaligned=arch == "x86_64")
    daemon = await harness.start_vgpud(device, engine)
    args = ["qemu-args", "--socket-path", str(device.socket_path), "--profile", device.profile]
    if device.memory_size:
        args += ["--memory-size", device.memory_size]
    hotplug = vgpud_json(*args, "--arch", arch, "--hotplug")
    script = GuestScript().kv("booted", "yes").wait_for_device(within_s=60)
    script.describe().enable().bar_base(2).bar_base(4)
    qemu = await harness.start_qemu(device, plan.script(script), qemu_args=hotplug["args"])
    await qemu.wait_line(r"^VGTEST booted=yes", 240)
    assert not [e for e in daemon.events() if e.get("event") == "client connected"], (
        "QEMU connected before the device was added"
    )
    assert qemu.qmp is not None
    for command in hotplug["qmp"]:
        await qemu.qmp.execute(command["execute"], **command["arguments"])

    results = await qemu.run_guest(240)
    assert results.values.get("device_found") == "yes", "the guest never saw the hot-added GPU"
    assert int(results.values["device"], 16) == expected.device_id
    assert bar_facts(results, 0)["size"] == 16 << 20
    assert_bars_assigned(results, {2: expected.resmem_bar, 4: expected.usemem_bar})
    mismatches = plan.mismatches(results) + plan.host_mismatches(device.files)
    assert not mismatches, "\n".join(mismatches)
    assert results.done_rc == 0


MARKER = 0x600DCAFE


@pytest.mark.parametrize("engine", ENGINES)
async def test_a_gpu_without_msix_unplugs_and_plugs_back_in(
    harness: Harness, engine: list[str]
) -> None:
    """``serve --no-msix``: QEMU 11.1.3 aborts on device_del of a device with MSI-X
    (captures README fact 14; without ``--no-msix`` this test fails on that assertion), not
    of one without. Hot-add, write, device_del: the guest sees the GPU go and vgpud its
    client leave; hot-add again: the guest finds the GPU once more, with what it wrote."""
    await unplug_and_plug_back(harness, engine)


async def unplug_and_plug_back(harness: Harness, engine: Sequence[str] = ()) -> None:
    """The body of the test above, for either architecture."""
    device = harness.device("gh200", "8448MiB")
    daemon = await harness.start_vgpud(device, [*engine, "--no-msix"])
    hotplug = vgpud_json(
        "qemu-args", "--socket-path", str(device.socket_path), "--memory-size", "8448MiB",
        "--arch", harness.assets.arch, "--hotplug",
    )  # fmt: skip
    script = (
        GuestScript()
        .kv("booted", "yes")
        .wait_for_device(within_s=60)
        .enable()
        .bar_base(4)
        .write(4, 0x200, MARKER)
        .raw(
            "vg_kv plugged 1\n"
            "tries=0; while vg_find_dev 0x10de; do\n"
            "  tries=$((tries + 1)); [ $tries -gt 300 ] && { vg_kv unplugged no; exit 1; }\n"
            "  sleep 0.2\n"
            "done\n"
            "vg_kv unplugged yes\n"
            "tries=0; until vg_find_dev 0x10de; do\n"
            "  tries=$((tries + 1)); [ $tries -gt 300 ] && { vg_kv replugged no; exit 1; }\n"
            "  sleep 0.2\n"
            "done\n"
            "vg_kv replugged yes"
        )
        .enable()
        .bar_base(4)
        .read("marker_after", 4, 0x200)
    )
    qemu = await harness.start_qemu(device, script, qemu_args=hotplug["args"])
    assert qemu.qmp is not None
    (add,) = hotplug["qmp"]
    await qemu.wait_line(r"^VGTEST booted=yes", 240)
    await qemu.qmp.execute(add["execute"], **add["arguments"])
    await qemu.wait_line(r"^VGTEST plugged=1", 120)

    await qemu.qmp.execute("device_del", id="gpu0")
    # The guest's pciehp takes the slot down (after its 5 s attention-button grace); QEMU
    # then finalizes the device and says so. Until then the id is taken.
    with trio.fail_after(60):
        while not any(
            e.get("event") == "DEVICE_DELETED" and e.get("data", {}).get("device") == "gpu0"
            for e in qemu.qmp.events
        ):
            await qemu.qmp.execute("query-status")  # reads the events that came meanwhile
            await trio.sleep(0.1)
    assert qemu.returncode is None, f"QEMU died on the unplug:\n{qemu.stderr.text()}"
    await qemu.wait_line(r"^VGTEST unplugged=yes", 60)
    await qemu.qmp.execute(add["execute"], **add["arguments"])

    results = await qemu.run_guest(120)
    assert results.values.get("replugged") == "yes"
    assert int(results.values["marker_after"], 16) == MARKER
    events = [e.get("event") for e in daemon.events()]
    assert events.count("client connected") == 2, events
    assert events.index("client disconnected") < len(events) - events[::-1].index(
        "client connected"
    ), events
