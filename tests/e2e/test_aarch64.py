"""The qemu-system-aarch64 tier: ``virt`` + edk2 (UEFI, so the guest uses ACPI), TCG.

Skipped with the fetch command when the aarch64 assets are absent
(``python -m tests.e2e.assets fetch --arch aarch64``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import trio

from tests.e2e.assets import Assets
from tests.e2e.expect import NVIDIA
from tests.e2e.harness import Harness
from tests.e2e.plans import bar_facts, describe_script, memory_plan

pytestmark = [pytest.mark.e2e, pytest.mark.aarch64, pytest.mark.timeout(600)]


@pytest.fixture
async def arm(assets_aarch64: Assets, nursery: trio.Nursery) -> AsyncIterator[Harness]:
    h = Harness(assets_aarch64, nursery)
    try:
        yield h
    finally:
        await h.aclose()
        h.cleanup()


async def test_aarch64_guest_boots(arm: Harness) -> None:
    results = await arm.boot(None, 'vg_kv arch "$(uname -m)"')
    assert results.values["arch"] == "aarch64"
    assert results.done_rc == 0


async def test_aarch64_guest_uses_gpu_memory(arm: Harness) -> None:
    device = arm.device("gh200", "8448MiB")
    plan = memory_plan(device.expected, unaligned=False)
    await arm.start_vgpud(device)
    results = await arm.boot(device, plan.script(describe_script()))
    assert int(results.values["vendor"], 16) == NVIDIA
    assert int(results.values["device"], 16) == device.expected.device_id
    bar4 = bar_facts(results, 4)
    assert bar4["size"] == device.expected.usemem_bar and bar4["prefetch"] and bar4["mem64"]
    assert bar_facts(results, 2)["size"] == device.expected.resmem_bar
    bad = plan.mismatches(results) + plan.host_mismatches(device.files)
    assert not bad, "\n".join(bad)
