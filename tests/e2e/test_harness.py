"""The tier's own machinery, checked without vgpud: serial results, guest script failures,
and devmem through a 64-bit prefetchable BAR whose memory the host can read (QEMU's
ivshmem-plain on a shared file), which is the same path the GPU tests use.
"""

from __future__ import annotations

import pytest

from tests.e2e.expect import BackingFile
from tests.e2e.harness import Harness
from tests.e2e.initramfs import GuestScript
from tests.e2e.plans import REGION_OF_BAR, Plan, bar_facts
from tests.e2e.qemu import E2EError, machine_args

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

IVSHMEM_VENDOR = 0x1AF4
IVSHMEM_SIZE = 64 << 20


async def test_guest_results_and_inputs(harness: Harness) -> None:
    results = await harness.boot(None, 'vg_kv hello world\nvg_kv input "$VG_X"', inputs={"x": 7})
    assert results.values["hello"] == "world"
    assert results.values["input"] == "0x7"
    assert results.done_rc == 0
    assert results.boots == 1


async def test_guest_script_failure_is_reported(harness: Harness) -> None:
    """A failing guest command stops the script and shows as a non-zero VGTEST-DONE."""
    script = GuestScript().kv("before", "1").raw("false").kv("after", "1")
    results = await harness.boot(None, script)
    assert "before" in results.values and "after" not in results.values
    assert results.done_rc == 1


async def test_devmem_through_64bit_bar_reaches_host_file(harness: Harness) -> None:
    shared = harness.workdir / "ivshmem"
    qemu_args = [
        *machine_args(harness.assets.arch),
        *("-object", f"memory-backend-file,id=shm,mem-path={shared},size=64M,share=on"),
        *("-device", "pcie-root-port,id=rp0,bus=pcie.0,chassis=1,slot=1"),
        *("-device", "ivshmem-plain,memdev=shm,bus=rp0"),
    ]
    plan = Plan()
    plan.write(2, 0x0, 32, 0x1234_5678)
    plan.write(2, 0x10, 64, 0x0102_0304_0506_0708)
    plan.write(2, IVSHMEM_SIZE - 4, 32, 0xCAFE_F00D)
    plan.read("w0", 2, 0x0, 32, 0x1234_5678, why="32-bit")
    plan.read("w10", 2, 0x10, 64, 0x0102_0304_0506_0708, why="64-bit")
    plan.read("last", 2, IVSHMEM_SIZE - 4, 32, 0xCAFE_F00D, why="last word")
    script = GuestScript().find_device(IVSHMEM_VENDOR).describe().enable().bar_base(2)
    results = await harness.boot(None, plan.script(script), qemu_args=qemu_args)
    bar = bar_facts(results, 2)
    assert bar["size"] == IVSHMEM_SIZE and bar["mem64"] and bar["prefetch"], bar
    assert not plan.mismatches(results), plan.mismatches(results)
    files = {REGION_OF_BAR[2]: BackingFile(shared, 0)}
    assert not plan.host_mismatches(files), plan.host_mismatches(files)


async def test_qemu_startup_error_is_reported(harness: Harness) -> None:
    """QEMU refusing its arguments surfaces as one E2EError carrying QEMU's own message."""
    with pytest.raises(E2EError, match="'bogus' is not a valid device model name"):
        await harness.start_qemu(None, qemu_args=[*machine_args(), "-device", "bogus"])
