"""QEMU attaches to vgpud without booting a guest: realize + QMP ``query-pci`` (``-S``)."""

from __future__ import annotations

from typing import Any

import pytest

from tests.e2e.expect import NVIDIA
from tests.e2e.harness import Harness

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]


def _find_gpu(devices: list[dict[str, Any]]) -> dict[str, Any]:
    gpus = [d for d in devices if d["id"]["vendor"] == NVIDIA]
    assert len(gpus) == 1, f"expected one NVIDIA function in query-pci, got {devices}"
    return gpus[0]


@pytest.mark.parametrize(
    ("profile", "memory_size"),
    [("gh200", "8448MiB"), ("gh200-480g", "8GiB"), ("gb200", "8GiB"), ("gb300", "8GiB")],
)
async def test_query_pci_shows_device(harness: Harness, profile: str, memory_size: str) -> None:
    device = harness.device(profile, memory_size)
    daemon = await harness.start_vgpud(device)
    qemu = await harness.start_qemu(device, paused=True)
    assert qemu.qmp is not None
    status = await qemu.qmp.execute("query-status")
    assert status["status"] == "prelaunch"
    gpu = _find_gpu(await qemu.qmp.query_pci())
    expected = device.expected
    assert gpu["id"]["device"] == expected.device_id
    assert gpu["class_info"]["class"] == 0x0302  # 3D controller
    bars = {r["bar"]: r for r in gpu["regions"]}
    assert bars[4]["size"] == expected.usemem_bar
    assert bars[4]["mem_type_64"] and bars[4]["prefetch"]
    if expected.resmem_len:
        assert bars[2]["size"] == expected.resmem_bar
    assert 2 in bars and bars[2]["mem_type_64"] and bars[2]["prefetch"]
    # 64-bit BARs take two registers: nothing may be reported at 3 or 5.
    assert 3 not in bars and 5 not in bars
    await qemu.aclose()
    assert qemu.returncode == 0
    # QEMU's quit must leave the daemon serving.
    assert daemon.running
