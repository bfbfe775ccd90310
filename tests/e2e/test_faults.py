"""Faults around the device: guest reboot, QEMU killed, vgpud restarted.

Device memory must outlive all of them: it is the GPU's memory, not the VM's.
"""

from __future__ import annotations

import signal

import pytest
import trio

from tests.e2e.expect import read_backing
from tests.e2e.harness import Harness
from tests.e2e.initramfs import GuestResults, GuestScript
from tests.e2e.plans import describe_script, persistence_plan
from tests.e2e.qemu import E2EError, Qemu

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


MARKER = 0xC0FFEE01
TICK_BASE = 0x5000


def _ticking_script() -> GuestScript:
    """Write a marker to BAR4, then once a second: read it back through the mapping, read
    BOOT_0 (BAR0 + 0, trapped: a REGION_READ to the server) and write the tick number to
    BAR4 + 0x300. Each tick prints after its accesses."""
    return (
        describe_script()
        .bar_base(0)
        .raw(
            f"vg_write $((BAR4 + 0x200)) 32 {MARKER:#x}\n"
            "i=0; while [ $i -lt 600 ]; do\n"
            '  m=$(devmem "$(hex $((BAR4 + 0x200)))" 32)\n'
            '  b=$(devmem "$(hex $BAR0)" 32)\n'
            f"  vg_write $((BAR4 + 0x300)) 32 $(({TICK_BASE:#x} + i))\n"
            '  echo "VGTEST tick=$i marker=$m boot0=$b"\n'
            "  i=$((i + 1)); sleep 1\n"
            "done"
        )
    )


async def _tick(qemu: Qemu, within: float = 60) -> dict[str, int]:
    """The first tick that starts after this call (the one in flight may predate it)."""
    start = len(qemu.serial.text().splitlines())
    line_no, _ = await qemu.wait_line(r"^VGTEST tick=", within, start=start)
    _, line = await qemu.wait_line(r"^VGTEST tick=", within, start=line_no + 1)
    fields = dict(word.split("=") for word in line.split()[1:])
    return {key: int(value, 0) for key, value in fields.items()}


async def test_vgpud_restart_under_a_running_vm(harness: Harness) -> None:
    """vgpud stops and starts again while its VM runs. QEMU does not reconnect (spec
    vfio-user.md §5.8), so trapped accesses fail from then on, but BAR2/BAR4 stay mapped and
    keep reaching the same memory files: the restarted daemon opens them again and never
    replaces them, so what the VM writes meanwhile is there for the next VM. The restarted
    daemon says which process still maps the memory."""
    device = harness.device("gh200", SIZE)
    first = await harness.start_vgpud(device)
    qemu = await harness.start_qemu(device, _ticking_script())
    before = await _tick(qemu, 240)
    assert before["marker"] == MARKER
    assert before["boot0"] not in (0, 0xFFFF_FFFF), before
    assert await first.stop() == 0
    second = await harness.start_vgpud(device)
    # The restarted daemon names the VM that still maps the device memory (vgpud/mappers.py).
    assert qemu.process is not None
    warnings = [e for e in second.events() if "still mapped by another" in e.get("event", "")]
    assert [w["pids"] for w in warnings] == [[qemu.process.pid]], second.events()
    after = await _tick(qemu)
    assert after["marker"] == MARKER, "the mapped BAR4 lost the memory file"
    assert after["boot0"] == 0xFFFF_FFFF, "a trapped read still answered: QEMU reconnected?"
    written = read_backing(device.files["usemem"], 0x300, 32)
    assert written >= TICK_BASE + after["tick"], "BAR4 writes after the restart missed the file"
    await qemu.kill(signal.SIGKILL)
    script = describe_script().read("marker", 4, 0x200).read("ticks", 4, 0x300)
    results = await harness.boot(device, script)
    assert int(results.values["marker"], 16) == MARKER
    assert int(results.values["ticks"], 16) >= written
    assert second.running
    # The old VM was gone by then: the next one shares its memory with nobody.
    assert not [e for e in second.events() if "also mapped by another" in e.get("event", "")]


async def test_migration_is_refused_locally_and_carries_no_device_state(
    harness: Harness,
) -> None:
    """QEMU 11.1.3 migrates no vfio-user device state, and blocks no migration either (spec
    vfio-user.md §5.8 left that to verify; docs/operations.md has what follows).

    To a QEMU on the same vgpud: the destination is refused at realize (one client per
    device) and exits, and the source VM goes on undisturbed. To a QEMU on another vgpud: the
    migration completes, and on the destination the guest's GPU accesses reach neither
    daemon; the GPU memory stays with the source's daemon. If this fails, QEMU changed: the
    operations guide must change with it.
    """
    device = harness.device("gh200", SIZE)
    await harness.start_vgpud(device)
    script = _ticking_script()
    source = await harness.start_qemu(device, script)
    before = await _tick(source, 240)
    incoming = harness.workdir / "incoming.sock"

    with pytest.raises(E2EError, match="Device or resource busy"):
        await harness.start_qemu(
            device,
            script,
            qemu_args=[*harness.device_args(device), "-incoming", f"unix:{incoming}"],
        )
    still = await _tick(source)
    assert (still["marker"], still["boot0"]) == (MARKER, before["boot0"])

    other = harness.device("gh200", SIZE)
    await harness.start_vgpud(other)
    destination = await harness.start_qemu(
        other, script, qemu_args=[*harness.device_args(other), "-incoming", f"unix:{incoming}"]
    )
    assert source.qmp is not None
    await source.qmp.execute("migrate", uri=f"unix:{incoming}")
    status = None
    with trio.move_on_after(120):
        while status not in ("completed", "failed"):
            status = (await source.qmp.execute("query-migrate")).get("status")
            await trio.sleep(0.2)
    assert status == "completed", f"migration {status}: does QEMU block it now?"
    moved = await _tick(destination)
    assert moved["marker"] != MARKER, "the destination's guest reached GPU memory"
    assert read_backing(other.files["usemem"], 0x300, 32) == 0
    assert read_backing(device.files["usemem"], 0x200, 32) == MARKER
