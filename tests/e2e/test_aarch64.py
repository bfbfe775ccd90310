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
from tests.e2e.numa import NUMA_SCRIPT, numa_mismatches
from tests.e2e.plans import bar_facts, describe_script, memory_plan
from tests.e2e.qemu import qemu_device_args, vgpud_output
from tests.e2e.test_hotplug import hot_add_and_check, unplug_and_plug_back

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


async def test_aarch64_guest_with_numa_nodes_uses_gpu_memory(arm: Harness) -> None:
    """Attached with `vgpud qemu-args --arch aarch64 --numa`: the guest sees 8 memory-less,
    CPU-less generic-initiator nodes bound to the GPU, and the q35 BAR checks pass (with
    naturally aligned accesses only: arm64 faults on unaligned device memory)."""
    device = arm.device("gh200", "8448MiB")
    plan = memory_plan(device.expected, unaligned=False)
    await arm.start_vgpud(device)
    args = qemu_device_args(device.socket_path, "gh200", "8448MiB", "aarch64", numa=True)
    script = plan.script(describe_script()).raw(NUMA_SCRIPT)
    results = await arm.boot(device, script, qemu_args=args)
    assert results.done_rc == 0
    assert int(results.values["vendor"], 16) == NVIDIA
    assert int(results.values["device"], 16) == device.expected.device_id
    bar4 = bar_facts(results, 4)
    assert bar4["size"] == device.expected.usemem_bar and bar4["prefetch"] and bar4["mem64"]
    assert bar_facts(results, 2)["size"] == device.expected.resmem_bar
    bad = plan.mismatches(results) + plan.host_mismatches(device.files)
    assert not bad, "\n".join(bad)
    numa = numa_mismatches(results)
    assert not numa, "\n".join(numa)


async def test_aarch64_guest_under_libvirt(arm: Harness) -> None:
    """The domain `vgpud qemu-args --arch aarch64 --libvirt --numa` prints for a default
    gb200 (186 GiB: BAR4 256 GiB, so a 1 TiB ``highmem-mmio-size``, passed as a second
    ``-machine`` that QEMU merges into libvirt's), booted under libvirt with edk2 as its
    ``<loader>``: the GPU, its BARs, the memory plan and the NUMA checks as above."""
    device = arm.device("gb200")
    plan = memory_plan(device.expected, unaligned=False)
    await arm.start_vgpud(device)
    domain = vgpud_output(
        "qemu-args", "--arch", "aarch64", "--libvirt", "--numa", "--profile", "gb200",
        "--socket-path", str(device.socket_path),
    )  # fmt: skip
    libvirtd = await arm.start_libvirt()
    results = await arm.boot_libvirt(
        libvirtd, domain, plan.script(describe_script()).raw(NUMA_SCRIPT)
    )
    assert results.done_rc == 0
    assert int(results.values["device"], 16) == device.expected.device_id
    bar4 = bar_facts(results, 4)
    assert bar4["size"] == device.expected.usemem_bar == 256 << 30
    assert bar4["prefetch"] and bar4["mem64"] and bar4["start"] % bar4["size"] == 0, bar4
    assert bar_facts(results, 2)["size"] == device.expected.bar1_size
    bad = plan.mismatches(results) + plan.host_mismatches(device.files)
    bad += numa_mismatches(results)
    assert not bad, "\n".join(bad)
    log = libvirtd.domain_log("vgpud")
    assert "-machine highmem-mmio-size=1T" in log and "gic-version=3" in log, log


async def test_aarch64_hot_added_gpu_gets_its_bars(arm: Harness) -> None:
    """`vgpud qemu-args --arch aarch64 --hotplug`, then QMP device_add: on ``virt`` the guest
    kernel assigns the BARs itself (it grows the port's windows), the reserves do no harm."""
    await hot_add_and_check(arm, arm.device("gh200", "8448MiB"))


async def test_aarch64_gpu_without_msix_unplugs_and_plugs_back_in(arm: Harness) -> None:
    """The hot-unplug cycle of test_hotplug.py on ``virt`` (Grace hosts run arm64 guests)."""
    await unplug_and_plug_back(arm)
