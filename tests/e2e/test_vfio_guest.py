"""The VFIO guest (``Harness.boot(..., vfio=True)``): a gh200 served by the host's vgpud is
handed to the guest kernel's vfio-pci behind an emulated VT-d, and this repository's own Python
(tests/e2e/guest_vfio_smoke.py, run with the host's interpreter from the host's / over
virtio-9p) opens it through /dev/vfio the way a VFIO user does and reports what the kernel
answered. This proves the harness that guest-side tests of the vfio backend build on."""

from __future__ import annotations

import pytest

from tests.e2e.harness import Harness
from tests.e2e.initramfs import GuestScript

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

VFIO_GROUP_FLAGS_VIABLE = 0x1
VFIO_GROUP_FLAGS_CONTAINER_SET = 0x2
VFIO_DEVICE_FLAGS_PCI = 0x2
VFIO_PCI_NUM_REGIONS = 9  # 6 BARs, ROM, config, VGA
VFIO_PCI_NUM_IRQS = 5  # INTx, MSI, MSI-X, ERR, REQ
REGION_READ_WRITE = 0x3


async def test_vfio_guest_opens_the_gpu_through_dev_vfio(harness: Harness) -> None:
    device = harness.device("gh200", memory_size="2GiB")
    await harness.start_vgpud(device)
    script = (
        GuestScript()
        .find_device()
        .vfio_bind()
        .host_chroot()
        .host_python("tests.e2e.guest_vfio_smoke", "$BDF")
    )
    results = await harness.boot(device, script, vfio=True)

    values = results.values
    assert results.done_rc == 0, values
    assert int(values["vfio_group"]) >= 0
    assert values["vfio_api_version"] == "0"
    assert values["vfio_type1v2"] == "1"
    # Viable (every device of the group is bound to vfio-pci or none), not yet in a container.
    assert int(values["vfio_group_flags"], 16) == VFIO_GROUP_FLAGS_VIABLE
    assert int(values["vfio_device_flags"], 16) & VFIO_DEVICE_FLAGS_PCI
    assert int(values["vfio_num_regions"]) == VFIO_PCI_NUM_REGIONS
    assert int(values["vfio_num_irqs"]) == VFIO_PCI_NUM_IRQS
    expected = device.expected
    for index, size in ((2, expected.resmem_bar), (4, expected.usemem_bar)):
        got_size, flags = (int(x, 16) for x in values[f"vfio_region{index}"].split(","))
        assert got_size == size, index
        assert flags & REGION_READ_WRITE == REGION_READ_WRITE, index
    assert int(values["vfio_region0"].split(",")[0], 16) > 0
