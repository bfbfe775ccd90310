"""Every BAR access trapped (``vgpud serve --no-mmap``): the daemon carries all guest traffic.

With no mmappable region QEMU posts BAR writes (NO_REPLY) and forwards every read
(captures README, "nommap"), so this boot exercises the daemon's ordering guarantee (R11: a
posted write lands before a later read) and the variant's read/write path for the whole of
BAR2/BAR4, not just the tails.
"""

from __future__ import annotations

import pytest

from tests.e2e.expect import NVIDIA
from tests.e2e.harness import Harness
from tests.e2e.plans import bar_facts, describe_script, memory_plan

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]


async def test_guest_uses_fully_trapped_bars(harness: Harness) -> None:
    device = harness.device("gh200", "8448MiB")
    plan = memory_plan(device.expected)
    await harness.start_vgpud(device, extra=["--no-mmap"])
    results = await harness.boot(device, plan.script(describe_script()))
    assert int(results.values["vendor"], 16) == NVIDIA
    assert bar_facts(results, 4)["size"] == device.expected.usemem_bar
    assert bar_facts(results, 2)["size"] == device.expected.resmem_bar
    bad = plan.mismatches(results) + plan.host_mismatches(device.files)
    assert not bad, "\n".join(bad)
