"""vgpud's variant held against the kernel's own nvgrace-gpu-vfio-pci driver.

The same questions (tests/e2e/nvgrace_facts.py: the fake BARs' region info and sparse area,
the DVSECs that steer the driver, the emulated BAR registers through sizing, address, byte and
spanning accesses, device memory
read and written through REGION_READ/WRITE and through the mmapped fd, the tail past
memlength and the end of the BAR, memory decoding off before and after a reset, what a reset
puts back, and vfio-pci-core's other regions and interrupts) are put to two servers, and the
answers compared:

- the kernel: a guest (trixie's Linux 6.12, and sid's 7.2 for the v6.19+ driver) whose GPU is
  a host vgpud's synthetic GPU of the case's profile (``CASES``), bound to the real driver
  (built for that kernel by the assets: tests/e2e/kernel_module.py), and served by a vgpud
  in the guest with ``--vfio-device``. The guest firmware gives the GPU the properties of a
  Grace host (tests/e2e/acpi_dsd.py) naming guest RAM kept from the guest kernel
  (``memmap=``) as device memory, so the driver runs its full variant over it;
- vgpud: the synthetic GPU of the same profile and memory size, served on the host.

Both answers cross vgpud's protocol layer and client, so what differs is the variant.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import pytest

from tests.e2e.acpi_dsd import gpu_memory_dsd
from tests.e2e.assets import NVGRACE_MODULE_KERNELS, Assets
from tests.e2e.harness import Harness, ScenarioRun, run_scenario
from tests.e2e.initramfs import GuestResults, GuestScript
from tests.e2e.nvgrace_facts import collect
from vgpud.client import VfioUserClient

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

# Device memory for the kernel's driver: guest RAM from 256 MiB, below 4 GiB (q35's ACPI
# integers are 32-bit: tests/e2e/acpi_dsd.py) and clear of the kernel and the initramfs.
MEMPHYS = 0x1000_0000
# 1.625 GiB on a Hopper: usemem 512 MiB in a 1 GiB BAR, resmem 1.125 GiB in a 2 GiB BAR, so
# both fake BARs have a tail (spec nvgrace-gpu.md §3.2).
MEMLENGTH = 0x6800_0000
USEMEM, RESMEM = 512 << 20, 0x4800_0000
# Where QEMU 11.1.3's DSDT puts the GPU: behind `vgpud qemu-args`' root port, in slot 1 of
# pcie.0 (devfn 0x08), function 0 (read back from the guest: firmware_node).
GPU_ACPI_PATH = ("_SB_", "PCI0", "S08_", "S00_")
GUEST_RAM = "3G"  # q35 keeps 2 GiB of it below 4 GiB, where MEMPHYS is

# Where vgpud answers otherwise, each for a reason (docs/device.md, "Checked against the
# kernel's driver"): fact -> (the kernel's answer, vgpud's). A kernel answer of ANY_ADDRESS
# is a BAR register holding whatever address the guest's firmware gave the real BAR.
ANY_ADDRESS = "any address"
KNOWN_DIFFERENCES: dict[str, tuple[Any, Any]] = {
    # vfio-pci lets the VMM mmap a real BAR0 (but its MSI-X table); the synthetic GPU's BAR0
    # is emulated registers, so every access is trapped: read and write, no mmap, no caps.
    "region0": (
        {"size": 16 << 20, "flags": 0xF, "sparse_areas": []},
        {"size": 16 << 20, "flags": 0x3, "sparse_areas": []},
    ),
    # A config write that runs past an emulated register: the kernel takes the register's
    # bytes and answers a short count, which vgpud's /dev/vfio backend turns into EIO; vgpud
    # takes the same bytes and answers the write (decision 2). The registers after each are
    # compared like every other fact, and agree.
    "write_0x26_4": ("errno 5", "ok"),
}
# With resmem (Hopper: region 2 is the driver's too).
HOPPER: dict[str, tuple[Any, Any]] = {
    "write_0x1c_8": ("errno 5", "ok"),  # as write_0x26_4, in BAR3
    # A resmem access across memlength: the driver's resmem path returns the count of the
    # device part (vfio_pci_core_do_io_rw's) as its result, so the kernel answers short and
    # neither fills 0xFF nor drops the rest, unlike its usemem path and its own comment; a
    # short count is an error to vgpud's /dev/vfio backend (EIO). vgpud does what the usemem
    # path does (spec nvgrace-gpu.md §5.2, §5.3). QEMU never asks this: its accesses are
    # aligned and memlength is a multiple of 512 MiB.
    "bar2_straddle": ("errno 5", "a4a5a6a7ffffffff"),
    "bar2_straddle_write": ("errno 5", "ok"),
    "bar2_straddle_after_write": ("errno 5", "a0a1a2a3ffffffff"),
}
# Without (Blackwell: region 2 is the real BAR1, vfio-pci's). vfio-pci's copy of a real BAR
# register starts as the device's, i.e. the address the guest's firmware assigned; the
# synthetic GPU's BAR1 has never been given one.
BLACKWELL: dict[str, tuple[Any, Any]] = {
    "bar_register_0x18_at_open": (ANY_ADDRESS, "0c000000"),
    "bar_register_0x1c_at_open": (ANY_ADDRESS, "00000000"),
}
# Before v6.19 (trixie's 6.12) the driver has no gate after a reset: memory decoding off or
# not, the first access is served. vgpud is the newer driver (spec nvgrace-gpu.md §7.4).
BEFORE_6_19: dict[str, tuple[Any, Any]] = {
    "after_reset_memory_off_bar2_read": ("5a5a5a5a", "errno 5"),
    "after_reset_memory_off_bar4_read": ("5a5a5a5a", "errno 5"),
}


def known_differences(suite: str, profile: str) -> dict[str, tuple[Any, Any]]:
    """What vgpud answers otherwise than ``suite``'s kernel for ``profile``, and both answers."""
    return {
        **KNOWN_DIFFERENCES,
        **(BLACKWELL if profile in BLACKWELLS else HOPPER),
        **(BEFORE_6_19 if suite == "trixie" else {}),
    }


def _as_known(kernel: Any, vgpud: Any, known: tuple[Any, Any]) -> tuple[Any, Any]:
    """The pair, with a kernel address the table does not pin replaced by ANY_ADDRESS."""
    if known[0] == ANY_ADDRESS and kernel != vgpud:
        return ANY_ADDRESS, vgpud
    return kernel, vgpud


@dataclass(frozen=True)
class Case:
    suite: str  # the guest kernel's Debian suite (the driver is built for that kernel)
    profile: str
    # A CXL Device DVSEC on the GPU (`vgpud serve --cxl-dvsec`): the v7.2 driver then takes
    # its readiness from the DVSEC's MEM_INFO_VALID/MEM_ACTIVE bits, at probe and after a
    # reset, instead of BAR0 (spec nvgrace-gpu.md §2.3, §7.3); so does vgpud's variant.
    cxl: bool = False

    @property
    def id(self) -> str:
        return f"{self.suite}-{self.profile}" + ("-cxl" if self.cxl else "")

    @property
    def serve_flags(self) -> list[str]:
        return ["--cxl-dvsec"] if self.cxl else []


# Every kernel the driver is built for with a Hopper; the other Hoppers once each, where the
# driver's ID table has them (the 480 GB 0x2345 from the start, the SKU 0x2348 since v6.13:
# spec nvgrace-gpu.md §1; even with driver_override the driver probes only IDs in its table);
# the Blackwells where the driver knows them (GB200 0x2941 since v6.14, GB300 0x31C2 since
# v6.18: neither in trixie's 6.12); and the CXL readiness path, which only 7.2 has (the
# "Blackwell-Next" of its commit, so a GB300).
BLACKWELLS = ("gb200", "gb300")
CASES = (
    [Case(suite, "gh200") for suite in NVGRACE_MODULE_KERNELS]
    + [Case("trixie", "gh200-480g"), Case("sid", "gh200-sku")]
    + [Case("sid", profile) for profile in BLACKWELLS]
    + [Case("sid", "gb300", cxl=True)]
)


@dataclass
class Run:
    case: Case
    kernel_version: str  # the kernel asset's, e.g. "7.2.13+deb14-amd64 (7.2.13-1)"
    results: GuestResults
    kernel: dict[str, Any]  # the facts the kernel's driver gave, through the guest's vgpud
    vgpud: dict[str, Any]  # the facts the host's vgpud gave for the same memory size


@pytest.fixture(scope="module", params=CASES, ids=[case.id for case in CASES])
def scenario(assets: Assets, request: pytest.FixtureRequest) -> ScenarioRun:
    """Once per guest kernel the driver was built for (trixie's 6.12, sid's 7.x), profile
    and readiness path."""
    case: Case = request.param
    suite, profile = case.suite, case.profile
    assets = assets.with_kernel(suite)
    module = assets.nvgrace_modules[suite]

    async def body(h: Harness) -> Run:
        passed_through = h.device(profile, memory_size="2GiB")  # the guest's GPU
        reference = h.device(profile, memory_size=f"{MEMLENGTH >> 20}MiB")
        await h.start_vgpud(passed_through, case.serve_flags)
        await h.start_vgpud(reference, case.serve_flags)
        ssdt = h.workdir / "nvgrace-dsd.aml"
        ssdt.write_bytes(gpu_memory_dsd(GPU_ACPI_PATH, MEMPHYS, MEMLENGTH))
        args = h.device_args(passed_through, extra=["--ram", GUEST_RAM])
        # rev=2 is the table's own; the integer width follows the DSDT's (acpi_dsd.py).
        args += ["-acpitable", f"sig=SSDT,rev=2,oem_id=VGPUD,oem_table_id=NVGRACE,data={ssdt}"]
        script = (
            GuestScript()
            .find_device()
            .raw('vg_kv firmware_node "$(cat "$DEV/firmware_node/path")"')
            # driver_override takes the driver's name, the module's with underscores (spec §1).
            .vfio_bind("nvgrace_gpu_vfio_pci")
            .raw('vg_kv driver "$(basename "$(readlink "$DEV/driver")")"')
            .host_chroot()
            .host_python("tests.e2e.nvgrace_facts", "$BDF", "/run/facts")
        )
        qemu = await h.start_qemu(
            passed_through,
            script,
            vfio=True,
            qemu_args=args,
            extra_modules=[module],
            kernel_args=f"memmap={MEMLENGTH:#x}${MEMPHYS:#x}",  # reserved: not the kernel's RAM
        )
        results = await qemu.run_guest(300)
        async with await VfioUserClient.connect(reference.socket_path) as client:
            vgpud = await collect(client)
        kernel = json.loads(results.values.get("facts", "{}"))
        return Run(case, assets.versions["kernel"], results, kernel, vgpud)

    return run_scenario(assets, body)


def _run(scenario: ScenarioRun) -> Run:
    run: Run = scenario.get()
    return run


def test_the_guest_kernel_drives_the_gpu_with_the_real_driver(scenario: ScenarioRun) -> None:
    run = _run(scenario)
    results = run.results
    assert results.done_rc == 0, results.values
    assert run.kernel_version.startswith(results.values["kernel"] + " ")
    assert results.values["firmware_node"] == "\\" + ".".join(GPU_ACPI_PATH)
    assert results.values["driver"] == "nvgrace_gpu_vfio_pci"


def test_the_driver_saw_the_dvsecs_that_steer_it(scenario: ScenarioRun) -> None:
    """The NVIDIA DVSEC (ID 3: whether the GPU has the MIG bug, spec §2.2) and, with
    ``--cxl-dvsec``, the CXL Device DVSEC (its presence alone takes 7.2 down the CXL
    readiness path, §2.3) reach the guest's driver through QEMU: neither is hidden."""
    run = _run(scenario)
    expected = [[0x10DE, 3]] + ([[0x1E98, 0]] if run.case.cxl else [])
    assert [dvsec[1:] for dvsec in run.kernel["dvsecs"]] == expected


def test_the_driver_read_the_memory_properties(scenario: ScenarioRun) -> None:
    """Without them it would fall back to plain vfio-pci (spec §8): no fake BARs."""
    run = _run(scenario)
    if run.case.profile in BLACKWELLS:
        # No MIG bug (its DVSEC says so): all of it usemem, and region 2 the real BAR1.
        assert run.kernel["region4"]["sparse_areas"] == [[0, MEMLENGTH]]
        assert run.kernel["region2"]["sparse_areas"] == []
    else:
        assert run.kernel["region4"]["sparse_areas"] == [[0, USEMEM]]
        assert run.kernel["region2"]["sparse_areas"] == [[0, RESMEM]]


def test_vgpud_answers_as_the_kernel_driver_does(scenario: ScenarioRun) -> None:
    run = _run(scenario)
    assert run.kernel.keys() == run.vgpud.keys()
    known = known_differences(run.case.suite, run.case.profile)
    differ = {
        fact: (run.kernel[fact], run.vgpud[fact])
        for fact in run.kernel
        if fact not in known and run.kernel[fact] != run.vgpud[fact]
    }
    assert differ == {}, "fact: (kernel, vgpud)"


def test_the_known_differences_are_as_documented(scenario: ScenarioRun) -> None:
    """Each known difference still holds as written: the day the kernel or vgpud changes,
    this fails and the table (and docs/device.md) are looked at again."""
    run = _run(scenario)
    known = known_differences(run.case.suite, run.case.profile)
    found = {
        fact: _as_known(run.kernel[fact], run.vgpud[fact], expected)
        for fact, expected in known.items()
    }
    assert found == known
