"""The /dev/vfio backend on a real kernel VFIO device (``vgpud serve --vfio-device``).

There is no VFIO on the build machine, so the device comes from a guest: the host's vgpud
serves a gh200 to QEMU, the guest binds it to its vfio-pci behind an emulated VT-d
(``Harness.boot(..., vfio=True)``), and tests/e2e/guest_vfio.py runs a second vgpud in the
guest with the vfio backend on it and drives that daemon with the project's client. Every
request then crosses the real kernel VFIO uAPI (group/container, type1 IOMMU, region
pread/pwrite and mmap of the device fd, SET_IRQS with eventfds, DEVICE_RESET), and the facts
are checked against what the host's synthetic GPU holds -- its usemem file included.

One guest boot per guest kernel (module-scoped scenario, bookworm 6.1 and trixie 6.12); each
test asserts one fact of it.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass

import pytest

from tests.e2e.assets import DEFAULT_KERNEL, Assets, default_cache_dir, kernel_suites
from tests.e2e.expect import NVIDIA, read_backing_bytes
from tests.e2e.guest_vfio import (
    DMA_SIZE,
    MMAP_OFFSET,
    MMAP_PATTERN,
    UPGRADE_SCRATCH,
    WRITE_OFFSET,
    WRITE_PATTERN,
)
from tests.e2e.harness import Device, Harness, ScenarioRun, run_scenario
from tests.e2e.initramfs import GuestResults, GuestScript

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

REGION_READ_WRITE_MMAP = 0x7
DEVICE_FLAGS_RESET_PCI = 0x3
READY = 0xFF  # the BAR0 readiness registers (spec nvgrace-gpu.md §7.1)


@dataclass
class Run:
    device: Device
    results: GuestResults
    usemem: bytes  # the host's usemem file, the bytes the test wrote to
    qemu_stderr: str
    kernel_suite: str  # the Debian suite whose kernel the guest was asked to boot


@pytest.fixture(scope="module", params=kernel_suites("x86_64"))
def scenario(assets: Assets, request: pytest.FixtureRequest) -> ScenarioRun:
    """The scenario once per guest kernel: bookworm's 6.1 and trixie's 6.12, whose vfio/type1
    moves pinned pages' accounting to the new owner on VFIO_DMA_MAP_FLAG_VADDR (6.2)."""
    suite: str = request.param
    assets = assets.with_kernel(suite)

    async def body(h: Harness) -> Run:
        device = h.device("gh200", memory_size="2GiB")
        await h.start_vgpud(device)
        script = (
            GuestScript()
            .find_device()
            .vfio_bind()
            .host_chroot()
            .host_python("tests.e2e.guest_vfio", "$BDF", "/run/vfio")
        )
        qemu = await h.start_qemu(device, script, vfio=True)
        results = await qemu.run_guest(240)
        data = read_backing_bytes(device.files["usemem"], 0, WRITE_OFFSET + len(WRITE_PATTERN))
        return Run(device, results, data, qemu.stderr.text(), suite)

    return run_scenario(assets, body)


def _run(scenario: ScenarioRun) -> Run:
    run: Run = scenario.get()
    return run


def _values(scenario: ScenarioRun) -> dict[str, str]:
    return _run(scenario).results.values


def test_the_guest_runs_the_kernel_asked_for(scenario: ScenarioRun) -> None:
    # Against the fetched kernel's own manifest, not what Assets.with_kernel made of it.
    run = _run(scenario)
    name = "kernel" if run.kernel_suite == DEFAULT_KERNEL else f"kernel-{run.kernel_suite}"
    manifest = json.loads((default_cache_dir() / "x86_64" / name / "manifest.json").read_text())
    assert manifest["version"].split()[0] == run.results.values["kernel"]


def test_guest_program_finished(scenario: ScenarioRun) -> None:
    run = _run(scenario)
    assert run.results.values.get("daemon") == "ready", "the guest vgpud did not start"
    assert run.results.done_rc == 0, "the guest program stopped early (see the serial log)"


def test_device_info_is_the_kernels(scenario: ScenarioRun) -> None:
    values = _values(scenario)
    assert int(values["device_flags"]) == DEVICE_FLAGS_RESET_PCI
    assert int(values["num_regions"]) == 9
    assert int(values["num_irqs"]) == 5


def test_regions_are_the_host_devices_bars(scenario: ScenarioRun) -> None:
    run = _run(scenario)
    expected = run.device.expected
    sizes = {0: 16 << 20, 2: expected.resmem_bar, 4: expected.usemem_bar}
    for index, size in sizes.items():
        got_size, flags = (int(x, 16) for x in run.results.values[f"region{index}"].split(","))
        assert got_size == size, f"region {index}"
        # vfio-pci lets a whole page-aligned BAR be mmapped: the daemon hands the VMM the
        # device fd at the region's offset (spec nvgrace-gpu.md §14).
        assert flags & REGION_READ_WRITE_MMAP == REGION_READ_WRITE_MMAP, f"region {index}"
    config_size, config_flags = (int(x, 16) for x in run.results.values["region7"].split(","))
    assert config_size > 0
    assert config_flags & REGION_READ_WRITE_MMAP == 0x3  # config space: read/write, no mmap


def test_probe_shows_bar4_as_the_device_fd(scenario: ScenarioRun) -> None:
    run = _run(scenario)
    size, kind = run.results.values["probe_bar4"].split(",")
    assert int(size, 16) == run.device.expected.usemem_bar
    assert kind == "device", "vgpud probe did not see the VFIO device fd for BAR4"


def test_config_read_reaches_the_synthetic_gpu(scenario: ScenarioRun) -> None:
    run = _run(scenario)
    vendor, device_id = struct.unpack("<HH", bytes.fromhex(run.results.values["config_ids"]))
    assert (vendor, device_id) == (NVIDIA, run.device.expected.device_id)


def test_bar0_register_read(scenario: ScenarioRun) -> None:
    assert int(_values(scenario)["c2c_link"], 16) == READY


def test_usemem_writes_land_in_the_host_file(scenario: ScenarioRun) -> None:
    run = _run(scenario)
    assert run.results.values["bar4_readback"] == "True"
    mmapped = run.usemem[MMAP_OFFSET : MMAP_OFFSET + len(MMAP_PATTERN)]
    assert mmapped == MMAP_PATTERN, "a write through the mmapped device fd is not in usemem"
    written = run.usemem[WRITE_OFFSET : WRITE_OFFSET + len(WRITE_PATTERN)]
    assert written == WRITE_PATTERN, "a REGION_WRITE is not in usemem"


def test_msix_doorbell_signals_the_clients_eventfd(scenario: ScenarioRun) -> None:
    # The host GPU's interrupt, through QEMU's MSI-X and the guest's vfio-pci handler, to the
    # eventfd the client gave the guest vgpud, which gave it to the kernel.
    assert int(_values(scenario)["msix_count"]) >= 1


def test_dma_map_goes_into_the_iommu(scenario: ScenarioRun) -> None:
    values = _values(scenario)
    assert values["dma_map"] == "ok"
    assert values["dma_unmap"] == "ok"


def test_qemu_saw_no_failed_dma_unmap(scenario: ScenarioRun) -> None:
    # Under the vIOMMU QEMU unmaps whole ranges in power-of-two pieces, most holding no
    # mapping; type1 semantics make those succeed (vgpud/server/dma.py DmaTable.unmap).
    failed = [line for line in _run(scenario).qemu_stderr.splitlines() if "dma_unmap" in line]
    assert not failed, f"{len(failed)} failed unmaps, first: {failed[0]}"


def test_reset_resets_the_device(scenario: ScenarioRun) -> None:
    before, after = (int(x, 16) for x in _values(scenario)["scratch"].split(","))
    assert before == 0x5CA7C4
    assert after == 0, "VFIO_DEVICE_RESET did not reach the GPU (SCRATCH survived)"


def test_device_state_survives_the_client(scenario: ScenarioRun) -> None:
    values = _values(scenario)
    assert values["reconnect_readback"] == "True"
    assert values["daemon_exit"] == "0", "the guest vgpud did not stop cleanly on SIGTERM"


def test_a_client_leaving_stops_the_devices_dma(scenario: ScenarioRun) -> None:
    """The client before the last one left the GPU a bus master: the daemon cleared the bit
    when it went (as the kernel's vfio-pci does when its last user goes), so DMA the departed
    guest programmed cannot land in the memory the next client maps at the same IOVAs. The
    rest of the device's state is kept (test_device_state_survives_the_client)."""
    values = _values(scenario)
    assert values["reconnect_bus_master"] == "False"


def test_a_live_upgrade_keeps_the_passthrough_device_and_its_client(scenario: ScenarioRun) -> None:
    """SIGUSR2 to the guest vgpud with a client attached: the next image carries on with the
    VFIO container, group and device fds, the eventfd the kernel signals and the mapping in
    the IOMMU (backends/vfio/device.py ``handover``)."""
    values = _values(scenario)
    assert values["upgrade_event"] == "upgraded", values.get("upgrade_reason")
    assert values["upgrade_same_pid"] == "True"
    assert values["upgrade_clients"] == "1"
    assert int(values["upgrade_scratch"], 16) == UPGRADE_SCRATCH
    assert int(values["upgrade_msix_count"]) >= 1, "no interrupt through the handed eventfd"
    assert values["upgrade_dma_unmap"] == "ok"
    assert values["upgraded_reconnect_readback"] == "True"


def test_the_pinned_dma_pages_stay_charged_to_the_daemon_across_the_upgrade(
    scenario: ScenarioRun,
) -> None:
    """The 2 MiB the client mapped are pinned, charged to the daemon's locked_vm; after the
    exec VFIO_DMA_MAP_FLAG_VADDR moves the charge to the new image, and the unmap takes it
    off again (without the move, the new image's locked_vm would underflow)."""
    values = _values(scenario)
    dma_kib = DMA_SIZE // 1024
    before = int(values["upgrade_locked_before_kib"])
    assert before >= dma_kib
    assert int(values["upgrade_locked_after_kib"]) == before
    assert int(values["upgrade_locked_unmapped_kib"]) == before - dma_kib


def test_an_upgrade_whose_exec_fails_gives_the_dma_addresses_back(scenario: ScenarioRun) -> None:
    """Before the real upgrade, one whose exec fails (the interpreter's link pointed at
    nothing once the new code was checked), after the mapping's address was taken from the
    kernel (VFIO_DMA_UNMAP_FLAG_VADDR): the daemon serves the client on with the pinned
    pages' charge unchanged, and the real upgrade after it goes through. (That the address
    is given back, VFIO_DMA_MAP_FLAG_VADDR in ``handover_abandoned``, shows nowhere here:
    on a type1 container only mdev-style pinning waits for a valid address, and those
    devices are refused an upgrade; the device's own record keeps the next upgrade right
    either way, so a ``handover_abandoned`` that did nothing would pass here. What is
    checked is that the kernel accepts the give-back: it refuses MAP_FLAG_VADDR for an
    address that is not invalid, and a give-back made twice fails this scenario.)"""
    values = _values(scenario)
    assert values["abandoned_event"] == "upgrade failed; serving on"
    assert values["abandoned_exec_error"] == "True", "the exec failed for another reason"
    assert values["abandoned_read"] == "True", "the message that held the freeze was lost"
    assert values["abandoned_device_errors"] == "0"
    assert int(values["abandoned_locked_kib"]) == int(values["upgrade_locked_before_kib"])
    assert int(values["abandoned_scratch"], 16) == UPGRADE_SCRATCH
    assert values["upgrade_event"] == "upgraded", values.get("upgrade_reason")
