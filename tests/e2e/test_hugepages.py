"""Guest RAM in huge pages: QEMU's DMA_MAP offsets are not huge-page aligned.

QEMU maps guest RAM section by section, each at its place in the RAM block: on q35 the low
RAM comes as [0, 0xa0000), [0xc0000, ...), [0x100000, ...), none a whole 2 MiB page (spec
vfio-user.md §5.7). With ``memory-backend-memfd,hugetlb=on`` those are offsets into a
hugetlb file, which can only be mapped in whole huge pages. The daemon must take every map
(tests/daemon/test_dma.py has the arithmetic; this is the real client).

Needs reserved huge pages for the guest's RAM, which CI machines do not have: skips unless
/proc/meminfo shows enough free ones (as root: ``echo 300 > /proc/sys/vm/nr_hugepages``).
"""

from __future__ import annotations

import pytest

from tests.e2e.expect import NVIDIA
from tests.e2e.harness import Harness
from tests.e2e.plans import describe_script, memory_plan
from tests.hugepages import HUGE, free_huge_pages

GUEST_RAM = 512 << 20
NEEDED = GUEST_RAM // HUGE

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.timeout(600),
    # Decided at collection: a skip raised inside a trio test loses its reason.
    pytest.mark.skipif(
        free_huge_pages() < NEEDED,
        reason=f"needs {NEEDED} free 2 MiB huge pages for the guest's RAM (/proc/meminfo "
        f"HugePages_Free); as root: echo {NEEDED + 16} > /proc/sys/vm/nr_hugepages",
    ),
]


async def test_guest_ram_in_huge_pages(harness: Harness) -> None:
    device = harness.device("gh200", "8448MiB")
    plan = memory_plan(device.expected)
    await harness.start_vgpud(device, extra=["--log-level", "debug"])
    args = harness.device_args(device, ["--ram", f"{GUEST_RAM >> 20}M", "--hugepages", "2M"])
    results = await harness.boot(device, plan.script(describe_script()), qemu_args=args)
    assert int(results.values["vendor"], 16) == NVIDIA
    bad = plan.mismatches(results) + plan.host_mismatches(device.files)
    assert not bad, "\n".join(bad)
    log = "\n".join(entry.text() for entry in harness.logs)
    # A refused DMA_MAP: vgpud logs the refusal (debug), QEMU an error reply it cannot act on.
    assert '"command": "DMA_MAP"' not in log, "vgpud refused a DMA_MAP"
    assert "error reply" not in log
