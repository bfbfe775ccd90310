"""A Linux guest (q35, TCG) looks at and uses the GPU; the host checks the backing files.

Each profile/size boots ONE guest (module-scoped scenario) and many small tests assert on
what it printed, so a red run names exactly which fact is wrong.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest

from tests.e2e.assets import Assets
from tests.e2e.expect import NVIDIA, Expected
from tests.e2e.harness import Device, Harness, ScenarioRun, run_scenario
from tests.e2e.initramfs import GuestResults
from tests.e2e.plans import Plan, bar_facts, describe_script, memory_plan

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]


@dataclass
class GuestRun:
    device: Device
    plan: Plan
    results: GuestResults
    host_mismatches: list[str]
    files: dict[str, Any]
    prealloc: bool
    # Bytes each memory file holds on its filesystem once the guest is done.
    allocated: dict[str, int]
    events: list[dict[str, Any]]


def _scenario(assets: Assets, profile: str, memory_size: str | None, prealloc: bool) -> ScenarioRun:
    async def body(h: Harness) -> GuestRun:
        device = h.device(profile, memory_size)
        plan = memory_plan(device.expected)
        daemon = await h.start_vgpud(device, ["--prealloc"] if prealloc else [])
        results = await h.boot(device, plan.script(describe_script()))
        paths = sorted(device.backing_dir.iterdir())
        files = {path.name: path.stat().st_size for path in paths}
        allocated = {path.name: path.stat().st_blocks * 512 for path in paths}
        return GuestRun(
            device,
            plan,
            results,
            plan.host_mismatches(device.files),
            files,
            prealloc,
            allocated,
            daemon.events(),
        )

    return run_scenario(assets, body)


# The gb200 guest runs against a preallocated device (``--prealloc``): same checks.
@pytest.fixture(scope="module", params=["gh200-8448MiB", "gh200-default", "gb200-6GiB-prealloc"])
def guest(request: pytest.FixtureRequest, assets: Assets) -> ScenarioRun:
    profile, size, *options = request.param.split("-")
    return _scenario(assets, profile, None if size == "default" else size, "prealloc" in options)


def _run(guest: ScenarioRun) -> GuestRun:
    run: GuestRun = guest.get()
    return run


def test_guest_finished(guest: ScenarioRun) -> None:
    run = _run(guest)
    assert run.results.values.get("device_found") == "yes"
    assert run.results.done_rc == 0, "the guest script stopped early (see the serial log)"


def test_ids_and_class(guest: ScenarioRun) -> None:
    run = _run(guest)
    values, expected = run.results.values, run.device.expected
    assert int(values["vendor"], 16) == NVIDIA
    assert int(values["device"], 16) == expected.device_id
    assert values["class"] == "0x030200"  # 3D controller, as the real GPU


def test_bar4_is_usemem(guest: ScenarioRun) -> None:
    run = _run(guest)
    bar = bar_facts(run.results, 4)
    assert bar["size"] == run.device.expected.usemem_bar
    assert bar["mem"] and bar["mem64"] and bar["prefetch"], bar
    assert bar["start"] % bar["size"] == 0, "BAR not naturally aligned"


def test_bar2(guest: ScenarioRun) -> None:
    run = _run(guest)
    expected: Expected = run.device.expected
    bar = bar_facts(run.results, 2)
    assert bar["mem"] and bar["mem64"] and bar["prefetch"], bar
    if expected.resmem_len:
        assert bar["size"] == expected.resmem_bar
    else:
        # Blackwell: BAR2 is the GPU's real BAR1, not a carve-out (nvgrace-gpu.md §3.3).
        assert bar["size"] == expected.bar1_size
    # 64-bit BARs use two registers; the upper halves show up as empty resources.
    assert bar_facts(run.results, 3)["size"] == 0
    assert bar_facts(run.results, 5)["size"] == 0


def test_config_bar_registers_read_64bit_prefetchable(guest: ScenarioRun) -> None:
    config = bytes.fromhex(_run(guest).results.values["config"])
    for register in (0x18, 0x20):
        assert config[register] & 0xF == 0xC, f"config[{register:#x}] = {config[register]:#x}"


def test_guest_reads_back_its_writes(guest: ScenarioRun) -> None:
    run = _run(guest)
    bad = [m for m in run.plan.mismatches(run.results) if "tail" not in m and "straddl" not in m]
    assert not bad, "\n".join(bad)


def test_tails_read_ones_and_drop_writes(guest: ScenarioRun) -> None:
    run = _run(guest)
    bad = [m for m in run.plan.mismatches(run.results) if "tail" in m or "straddl" in m]
    assert not bad, "\n".join(bad)


def test_host_backing_files_hold_guest_writes(guest: ScenarioRun) -> None:
    run = _run(guest)
    assert not run.host_mismatches, "\n".join(run.host_mismatches)
    if not run.device.expected.resmem_len:
        assert "resmem" not in run.files, f"no-carve-out profile created a resmem file: {run.files}"


def test_prealloc_allocated_the_memory_before_serving(guest: ScenarioRun) -> None:
    """``--prealloc``: every mappable byte was allocated before the daemon served (its
    "device memory allocated" line comes before "ready"), and the guest's checks above pass
    on it; without it the files stay sparse."""
    run = _run(guest)
    events = [e.get("event") for e in run.events]
    for name, size in run.files.items():
        if run.prealloc:
            assert run.allocated[name] >= size, f"{name}: {run.allocated[name]} of {size} bytes"
        else:
            assert run.allocated[name] < size // 2, f"{name} is no longer sparse"
    if run.prealloc:
        assert events.index("device memory allocated") < events.index("ready"), events
    else:
        assert "device memory allocated" not in events
