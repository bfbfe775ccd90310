"""A second QEMU pointed at a device in use: refused, and the first guest never notices.

One client per device (DESIGN.md "Engines"; spec vfio-user.md §1), for both engines. QEMU
realizes vfio-user-pci before its monitor is up, so the refused QEMU exits at start-up with
the error it was given; the first guest goes on with the device and its memory as they were.
"""

from __future__ import annotations

import pytest

from tests.e2e.engines import ENGINES
from tests.e2e.harness import Harness
from tests.e2e.plans import describe_script, persistence_plan
from tests.e2e.qemu import E2EError

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

SIZE = "8448MiB"
# A usemem word the host writes once the second QEMU is gone; the first guest waits for it.
GO_OFFSET = 0x300
GO = 0x600DF00D


@pytest.mark.parametrize("engine", ENGINES)
async def test_second_qemu_is_refused_and_the_first_guest_goes_on(
    harness: Harness, engine: list[str]
) -> None:
    device = harness.device("gh200", SIZE)
    plan = persistence_plan(device.expected, tag=0x44)
    script = plan.script(describe_script(), reads=False).raw(
        "vg_kv written yes\n"
        # The host's go-ahead comes through device memory (BAR4 is the usemem file).
        f'until [ "$(devmem "$(hex $((BAR4 + {GO_OFFSET:#x})))" 32)" = 0x{GO:08X} ]; do\n'
        "  usleep 10000\n"
        "done\n"
        "vg_kv resumed yes"
    )
    plan.script(script, writes=False)
    daemon = await harness.start_vgpud(device, extra=engine)
    first = await harness.start_qemu(device, script)
    await first.wait_line(r"^VGTEST written=yes", 240)

    # Told EBUSY in reply to its VERSION (vgpud/server/refusal.py), QEMU fails the device
    # and says why; a plain close made 3 of 20 QEMU 11.1.3s abort on an assertion instead.
    with pytest.raises(E2EError, match=r"exited \(rc 1\) before QMP was up") as refused:
        await harness.start_qemu(device)
    assert "version reply: Device or resource busy" in str(refused.value), refused.value
    refusals = [e for e in daemon.events() if e.get("event", "").startswith("refusing")]
    assert len(refusals) == 1, refusals
    assert refusals[0]["event"] == "refusing a second client: the device already has one"

    device.files["usemem"].write(GO_OFFSET, GO.to_bytes(4, "little"))
    results = await first.run_guest(240)
    assert results.values.get("resumed") == "yes"
    bad = plan.mismatches(results) + plan.host_mismatches(device.files)
    assert not bad, "\n".join(bad)
    assert daemon.running
