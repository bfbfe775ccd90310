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
from tests.e2e.initramfs import GuestScript
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


# A word of usemem the guest writes and reads through the trapped BAR4.
_WORD_OFFSET = 0x1000
_WORD = 0x600DF00D
# The synthetic GPU reports not-ready for this long after every function reset; long enough
# that the read right after the guest's FLR lands inside it even on a slow TCG host.
_READY_DELAY = "6"
# Bounded polling in the guest: 240 x 0.25 s, far past the delay.
_POLLS = 240


async def test_guest_flr_rearms_the_readiness_gate(harness: Harness) -> None:
    """A guest FLR (sysfs ``reset``: Linux writes DEVCTL.BCR_FLR, QEMU forwards the config
    write) is a function reset: the gate of spec nvgrace-gpu.md §7.4 fails accesses until the
    GPU is ready again, and the device memory is kept."""
    device = harness.device("gh200", "8448MiB")
    await harness.start_vgpud(device, extra=["--no-mmap", "--ready-delay", _READY_DELAY])
    script = GuestScript().find_device().enable().bar_base(4)
    word = f"$((BAR4 + {_WORD_OFFSET:#x}))"
    printed = f"0x{_WORD:08X}"  # as busybox devmem prints it
    # QEMU's machine reset at boot armed the gate too: write until the word sticks (a
    # write the gate refuses is dropped, a gated read gives all-ones).
    script.raw(
        f"i=0; while [ $i -lt {_POLLS} ]; do vg_write {word} 32 {_WORD:#x}; "
        f'[ "$(devmem $(hex {word}) 32)" = {printed} ] && break; '
        "i=$((i + 1)); sleep 0.25; done"
    )
    script.raw(f"vg_read before_flr {word} 32")
    script.raw('echo 1 > "$DEV/reset"')
    script.raw(f"vg_read after_flr {word} 32")
    script.raw(
        f"i=0; while [ $i -lt {_POLLS} ]; do "
        f'[ "$(devmem $(hex {word}) 32)" = {printed} ] && break; '
        "i=$((i + 1)); sleep 0.25; done; vg_kv polls $i"
    )
    script.raw(f"vg_read after_ready {word} 32")
    results = await harness.boot(device, script)
    assert results.as_int("before_flr") == _WORD
    assert results.as_int("after_flr") == 0xFFFF_FFFF, "the read right after the FLR was not gated"
    assert 0 < results.as_int("polls") < _POLLS
    assert results.as_int("after_ready") == _WORD, "device memory lost across the FLR"
