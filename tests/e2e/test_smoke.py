"""QEMU attaches to vgpud with no guest OS: realize under ``-S``, then firmware only.

QMP ``query-pci`` shows the device as QEMU and SeaBIOS see it. Devices behind a root port
are listed only after the firmware numbered the buses, so the test lets SeaBIOS run (no
kernel, so it ends at "No bootable device.") and waits for that line of its debug log.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.e2e.expect import NVIDIA
from tests.e2e.harness import Harness

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

PROFILES = [("gh200", "8448MiB"), ("gh200-480g", "8GiB"), ("gb200", "6GiB"), ("gb300", "8GiB")]


def _find_gpu(devices: list[dict[str, Any]]) -> dict[str, Any]:
    gpus = [d for d in devices if d["id"]["vendor"] == NVIDIA]
    assert len(gpus) == 1, f"expected one NVIDIA function in query-pci, got {devices}"
    return gpus[0]


@pytest.mark.parametrize(("profile", "memory_size"), PROFILES)
async def test_layout_matches_spec_formulas(
    harness: Harness, profile: str, memory_size: str
) -> None:
    """``vgpud layout`` agrees with the kernel's formulas as the tests spell them."""
    device = harness.device(profile, memory_size)
    assert device.layout is not None, harness.notes
    sizes = device.layout["bar_sizes"]
    expected = device.expected
    assert device.layout["device_id"] == expected.device_id
    assert sizes["bar4"] == expected.usemem_bar
    assert sizes["bar2"] == (expected.resmem_bar if expected.resmem_len else expected.bar1_size)


@pytest.mark.parametrize(("profile", "memory_size"), PROFILES)
async def test_query_pci_shows_device(harness: Harness, profile: str, memory_size: str) -> None:
    device = harness.device(profile, memory_size)
    daemon = await harness.start_vgpud(device)
    qemu = await harness.start_qemu(device, paused=True)
    assert qemu.qmp is not None
    # Realize (VERSION … DEVICE_RESET) happened before QMP came up; the VM has not run.
    assert (await qemu.qmp.execute("query-status"))["status"] == "prelaunch"
    await qemu.qmp.execute("cont")
    await qemu.wait_firmware(r"No bootable device", 60)
    gpu = _find_gpu(await qemu.qmp.query_pci())
    expected = device.expected
    assert gpu["id"]["device"] == expected.device_id
    assert gpu["id"]["subsystem-vendor"] == NVIDIA
    assert gpu["class_info"]["class"] == 0x0302  # 3D controller
    bars = {r["bar"]: r for r in gpu["regions"]}
    assert set(bars) == {0, 2, 4}, bars  # 64-bit BARs: 1, 3, 5 are their upper halves
    assert bars[4]["size"] == expected.usemem_bar
    assert bars[2]["size"] == (expected.resmem_bar if expected.resmem_len else expected.bar1_size)
    for n in (2, 4):
        assert bars[n]["mem_type_64"] and bars[n]["prefetch"], bars[n]
        assert bars[n]["address"] % bars[n]["size"] == 0, f"BAR{n} placed unaligned"
    await qemu.aclose()
    assert qemu.returncode == 0
    assert daemon.running, "QEMU's quit must leave vgpud serving"
