"""Faults around the device: guest reboot, QEMU killed, vgpud restarted.

Device memory must outlive all of them: it is the GPU's memory, not the VM's.
"""

from __future__ import annotations

import signal

import pytest

from tests.e2e.harness import Harness
from tests.e2e.initramfs import GuestResults
from tests.e2e.plans import describe_script, persistence_plan

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

SIZE = "8448MiB"


def _assert_reads(plan_mismatches: list[str]) -> None:
    assert not plan_mismatches, "\n".join(plan_mismatches)


async def test_guest_reboot_keeps_device_memory(harness: Harness) -> None:
    """``reboot -f`` → system reset → DEVICE_RESET; the second boot finds the first's data."""
    device = harness.device("gh200", SIZE)
    plan = persistence_plan(device.expected, tag=0x11)
    script = describe_script().raw(
        'm=$(devmem "$(hex $((BAR4 + 0x200)))" 32 | tr A-F a-f)\n'
        'if [ "$m" != 0xc0ffee01 ]; then\n'
        "  vg_kv phase 1"
    )
    plan.script(script, reads=False)
    script.raw(
        "  vg_write $((BAR4 + 0x200)) 32 0xc0ffee01\n"
        "  sync; reboot -f\n"
        "  sleep 600\n"
        "fi\n"
        "vg_kv phase 2"
    )
    plan.script(script, writes=False)
    daemon = await harness.start_vgpud(device)
    qemu = await harness.start_qemu(device, script, allow_reboot=True)
    first, _ = await qemu.wait_line(r"^VGTEST phase=1", 240)
    # Next: either the second boot's phase 2, or phase 1 again (memory was lost: fail fast).
    _, line = await qemu.wait_line(r"^VGTEST phase=", 240, start=first + 1)
    assert line.strip() == "VGTEST phase=2", "after the reboot the marker in BAR4 was gone"
    results = await qemu.run_guest(240)
    assert results.boots == 2
    # Realize's reset plus the guest's reboot (SeaBIOS adds a second one, captures README).
    resets = [e for e in daemon.events() if e.get("event") == "device reset"]
    assert len(resets) >= 2, "vgpud logged no DEVICE_RESET for the guest's reboot"
    _assert_reads(plan.mismatches(results))
    _assert_reads(plan.host_mismatches(device.files))


async def test_qemu_sigkill_leaves_vgpud_serving(harness: Harness) -> None:
    """QEMU dies without a word; vgpud keeps serving and a new QEMU sees the data."""
    device = harness.device("gh200", SIZE)
    plan = persistence_plan(device.expected, tag=0x22)
    writer = plan.script(describe_script(), reads=False).raw("vg_kv written yes\nsleep 600")
    daemon = await harness.start_vgpud(device)
    first = await harness.start_qemu(device, writer)
    await first.wait_line(r"^VGTEST written=yes", 240)
    await first.kill(signal.SIGKILL)
    assert first.returncode == -signal.SIGKILL
    assert daemon.running, "vgpud exited when its client was killed"
    results: GuestResults = await harness.boot(device, plan.script(describe_script(), writes=False))
    _assert_reads(plan.mismatches(results))
    assert daemon.running


async def test_vgpud_restart_between_vms_keeps_memory(harness: Harness) -> None:
    """VM 1 writes and powers off; vgpud stops (SIGTERM) and starts again; VM 2 reads."""
    device = harness.device("gh200", SIZE)
    plan = persistence_plan(device.expected, tag=0x33)
    first_daemon = await harness.start_vgpud(device)
    await harness.boot(device, plan.script(describe_script(), reads=False))
    assert await first_daemon.stop(signal.SIGTERM) == 0
    _assert_reads(plan.host_mismatches(device.files))
    second_daemon = await harness.start_vgpud(device)
    results = await harness.boot(device, plan.script(describe_script(), writes=False))
    _assert_reads(plan.mismatches(results))
    assert second_daemon.running
