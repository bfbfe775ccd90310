"""One e2e scenario's processes: vgpud(s), QEMU(s), the guest initramfs, and all their logs.

Used by the tests (through conftest fixtures) and by ``tests/e2e/demo.py``.
"""

from __future__ import annotations

import os
import shlex
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import trio

from tests.e2e.assets import Assets
from tests.e2e.expect import BackingFile, Expected, backing_files
from tests.e2e.initramfs import GuestResults, GuestScript, build_initramfs
from tests.e2e.libvirt import LibvirtDaemon, with_kernel
from tests.e2e.qemu import (
    REPO,
    E2EError,
    OutputLog,
    Qemu,
    QemuConfig,
    Vgpud,
    VgpudConfig,
    kernel_cmdline,
    machine_args,
    make_workdir,
    qemu_device_args,
    remove_workdir,
    vgpud_json,
)
from vgpud.units import parse_size

T = TypeVar("T")
ECHO = os.environ.get("VGPUD_E2E_ECHO") == "1"  # stream every log line live to stderr

# A VFIO guest (``vfio=True``): the guest kernel drives the device through vfio-pci, and the
# project's own Python runs against it inside ``chroot /host``.
# * vfio-pci needs an IOMMU (Debian's kernel has no no-IOMMU mode), hence an emulated VT-d,
#   before the PCI devices it translates for. caching-mode=on makes the guest report every
#   mapping, which QEMU needs to forward DMA maps to the vfio-user server. intremap=on because
#   vfio_iommu_type1 refuses VFIO_SET_IOMMU (EPERM) without interrupt remapping; under TCG
#   that needs no kernel-irqchip setting (that constraint is KVM's).
VFIO_IOMMU = ["-device", "intel-iommu,caching-mode=on,intremap=on"]
# * the host's / read-only (mount tag "host") for the repository, the venv and its libraries.
#   A host-Python guest (``host_python=True``: the benchmarks' guests) has this part alone.
VFIO_HOSTFS = [
    *("-fsdev", "local,id=hostfs,path=/,security_model=none,readonly=on"),
    *("-device", "virtio-9p-pci,fsdev=hostfs,mount_tag=host"),
]
VFIO_KERNEL_ARGS = "intel_iommu=on"


@dataclass
class Device:
    """A vgpud device as a test sees it: how it was started and what it must look like."""

    profile: str
    memory_size: str | None
    socket_path: Path
    backing_dir: Path
    expected: Expected
    layout: dict[str, Any] | None
    files: dict[str, BackingFile]


class Harness:
    """Owns a work directory, the processes started in it, and every log they produced."""

    def __init__(
        self,
        assets: Assets,
        nursery: trio.Nursery,
        workdir: Path | None = None,
        *,
        echo: bool = ECHO,
    ):
        self.echo = echo
        self.assets = assets
        self.nursery = nursery
        self.workdir = workdir or make_workdir()
        self.logs: list[OutputLog] = []
        self.notes: list[str] = []
        self._qemus: list[Qemu] = []
        self._daemons: list[Vgpud] = []
        self._libvirts: list[LibvirtDaemon] = []
        self._counter = 0

    # -- for the failure report ---------------------------------------------------------------

    def e2e_logs(self) -> list[tuple[str, str]]:
        sections = [(log.name, log.text() or "(empty)") for log in self.logs]
        for qemu in self._qemus:
            sections.append((f"{qemu.name} argv", shlex.join(qemu.argv)))
        for libvirtd in self._libvirts:
            sections += [(log.name, log.text() or "(empty)") for log in libvirtd.domain_logs]
        if self.notes:
            sections.append(("harness notes", "\n".join(self.notes)))
        return sections

    def _name(self, base: str) -> str:
        self._counter += 1
        return f"{base}{self._counter}"

    # -- devices ------------------------------------------------------------------------------

    def device(self, profile: str = "gh200", memory_size: str | None = None) -> Device:
        """Describe a device (nothing started): socket, backing dir, expected layout."""
        name = self._name("gpu")
        backing_dir = self.workdir / f"{name}-mem"
        args = ["layout", "--profile", profile, "--backing-dir", str(backing_dir)]
        if memory_size:
            args += ["--memory-size", memory_size]
        layout = vgpud_json(*args)
        if not isinstance(layout, dict):
            raise E2EError(f"vgpud layout printed {layout!r}, not an object")
        size = parse_size(memory_size) if memory_size else int(layout["memlength"])
        return Device(
            profile=profile,
            memory_size=memory_size,
            socket_path=self.workdir / f"{name}.sock",
            backing_dir=backing_dir,
            expected=Expected.for_profile(profile, size),
            layout=layout,
            files=backing_files(layout, backing_dir),
        )

    async def start_vgpud(
        self, device: Device, extra: Sequence[str] = (), *, inherited_fd: int | None = None
    ) -> Vgpud:
        """``vgpud serve`` for ``device``; with ``inherited_fd`` (a socket listening at the
        device's socket path) it serves that fd instead of binding the path itself."""
        return await self._start_vgpud(
            VgpudConfig(
                socket_path=device.socket_path,
                backing_dir=device.backing_dir,
                profile=device.profile,
                memory_size=device.memory_size,
                extra=list(extra),
                inherited_fd=inherited_fd,
            )
        )

    async def start_vgpud_config(self, config_file: Path, extra: Sequence[str] = ()) -> Vgpud:
        """``vgpud serve --config config_file`` (plus ``extra`` flags, e.g. an engine's):
        every device of the file."""
        return await self._start_vgpud(VgpudConfig(config_file=config_file, extra=list(extra)))

    async def _start_vgpud(self, config: VgpudConfig) -> Vgpud:
        daemon = Vgpud(config, self.workdir, name=self._name("vgpud"))
        self.logs.append(daemon.log)
        self._daemons.append(daemon)
        await daemon.start(self.nursery, echo=self.echo)
        return daemon

    # -- QEMU ---------------------------------------------------------------------------------

    def device_args(self, device: Device | None, extra: Sequence[str] = ()) -> list[str]:
        """QEMU's machine and device args; ``extra`` flags go to ``vgpud qemu-args``."""
        if device is None:
            return machine_args(self.assets.arch)
        # Always what `vgpud qemu-args` prints: the tier tests that output as users use it.
        return qemu_device_args(
            device.socket_path, device.profile, device.memory_size, self.assets.arch, extra=extra
        )

    def initrd(self, script: GuestScript | str, modules: Sequence[Path] = ()) -> Path:
        body = script.render() if isinstance(script, GuestScript) else script
        path = self.workdir / f"{self._name('initrd')}.cpio.gz"
        path.write_bytes(build_initramfs(self.assets.busybox, body, modules=modules))
        return path

    def vfio_guest_inputs(self) -> dict[str, int | str]:
        """What a VFIO guest's helpers need to run this repository's Python in the chroot."""
        return {"repo": str(REPO), "python": sys.executable}

    async def start_qemu(
        self,
        device: Device | None,
        script: GuestScript | str | None = None,
        *,
        paused: bool = False,
        allow_reboot: bool = False,
        inputs: dict[str, int | str] | None = None,
        qemu_args: Sequence[str] | None = None,
        vfio: bool = False,
        host_python: bool = False,
        extra_modules: Sequence[Path] = (),
        kernel_args: str = "",
    ) -> Qemu:
        """Start QEMU (machine and device args from vgpud unless ``qemu_args`` is given).

        ``host_python``: the guest can run this repository's Python (GuestScript.host_chroot,
        .host_python): the host's / over virtio-9p, the kernel modules loaded before the
        script, and the inputs ``vg.repo`` / ``vg.python`` (this repository, this interpreter).
        ``vfio``: a VFIO guest (see VFIO_IOMMU): all of that, plus a vIOMMU and
        ``intel_iommu=on``. Both x86_64 only. ``extra_modules`` are loaded after the kernel
        asset's ones; ``kernel_args`` go on the guest kernel's command line.
        """
        device_args = list(qemu_args) if qemu_args is not None else self.device_args(device)
        modules: list[Path] = []
        if vfio or host_python:
            if self.assets.arch != "x86_64":
                raise E2EError(
                    f"a VFIO or host-Python guest is x86_64 only, not {self.assets.arch}"
                )
            if not self.assets.kernel_modules:
                raise E2EError("the kernel asset has no modules (re-fetch the assets)")
            for path in (REPO, Path(sys.executable)):
                # The guest mounts its own tmpfs over these (vg_host_chroot).
                if any(path.resolve().is_relative_to(d) for d in ("/run", "/dev/shm")):
                    raise E2EError(f"the guest cannot see {path} (under /run or /dev/shm)")
            device_args = [*(VFIO_IOMMU if vfio else []), *device_args, *VFIO_HOSTFS]
            modules = [*self.assets.kernel_modules, *extra_modules]
            inputs = {**self.vfio_guest_inputs(), **(inputs or {})}
        config = QemuConfig(device_args=device_args, paused=paused, allow_reboot=allow_reboot)
        if script is not None:
            config.kernel = self.assets.kernel
            config.initrd = self.initrd(script, modules)
            config.append = kernel_cmdline(self.assets.arch, **(inputs or {}))
            if vfio:
                config.append += f" {VFIO_KERNEL_ARGS}"
            if kernel_args:
                config.append += f" {kernel_args}"
        qemu = Qemu(self.assets, config, self.workdir, name=self._name("qemu"))
        self.logs += [qemu.serial, qemu.stderr, qemu.firmware]
        self._qemus.append(qemu)
        await qemu.start(self.nursery, echo=self.echo)
        return qemu

    async def boot(
        self,
        device: Device | None,
        script: GuestScript | str,
        *,
        within: float = 240,
        allow_reboot: bool = False,
        inputs: dict[str, int | str] | None = None,
        qemu_args: Sequence[str] | None = None,
        vfio: bool = False,
        host_python: bool = False,
    ) -> GuestResults:
        """Boot a guest running ``script`` to its poweroff; return what it printed."""
        qemu = await self.start_qemu(
            device,
            script,
            allow_reboot=allow_reboot,
            inputs=inputs,
            qemu_args=qemu_args,
            vfio=vfio,
            host_python=host_python,
        )
        results = await qemu.run_guest(within)
        if results.done_rc is None:
            raise E2EError(
                f"{qemu.name}: the guest never reached VGTEST-DONE (rc {qemu.returncode})"
            )
        return results

    # -- libvirt ------------------------------------------------------------------------------

    async def start_libvirt(self) -> LibvirtDaemon:
        """A private session-mode libvirtd (tests/e2e/libvirt.py) running this arch's QEMU."""
        libvirtd = LibvirtDaemon(self.assets, self.workdir, name=self._name("libvirtd"))
        self.logs.append(libvirtd.log)
        self._libvirts.append(libvirtd)
        await libvirtd.start(self.nursery, echo=self.echo)
        return libvirtd

    async def start_libvirt_guest(
        self, libvirtd: LibvirtDaemon, domain_xml: str, script: GuestScript | str
    ) -> LibvirtGuest:
        """Start ``domain_xml`` (as ``vgpud qemu-args --libvirt`` printed it) under
        ``libvirtd``, with the test kernel and ``script``; returns once it runs."""
        domain = with_kernel(
            domain_xml,
            self.assets.kernel,
            self.initrd(script),
            kernel_cmdline(self.assets.arch),
        )
        serial = OutputLog(f"{self._name('libvirt-guest')} serial")
        self.logs.append(serial)
        name = await libvirtd.start_domain(domain, serial, nursery=self.nursery)
        return LibvirtGuest(libvirtd, name, serial)

    async def boot_libvirt(
        self,
        libvirtd: LibvirtDaemon,
        domain_xml: str,
        script: GuestScript | str,
        *,
        within: float = 240,
    ) -> GuestResults:
        """:meth:`start_libvirt_guest`, then :meth:`LibvirtGuest.run` to its poweroff."""
        guest = await self.start_libvirt_guest(libvirtd, domain_xml, script)
        return await guest.run(within)

    # -- teardown -----------------------------------------------------------------------------

    async def aclose(self) -> None:
        with trio.CancelScope(shield=True):
            for qemu in self._qemus:
                await qemu.aclose()
            for libvirtd in self._libvirts:
                await libvirtd.aclose()
            for daemon in self._daemons:
                await daemon.stop()

    def cleanup(self) -> None:
        remove_workdir(self.workdir)


@dataclass
class LibvirtGuest:
    """A domain running under a test's libvirtd, and its serial console."""

    libvirtd: LibvirtDaemon
    name: str
    serial: OutputLog

    async def run(self, within: float) -> GuestResults:
        """Until the guest powered off; what it printed. E2EError without VGTEST-DONE."""
        await self.libvirtd.wait_domain(self.name, self.serial, within=within)
        results = GuestResults.parse(self.serial.text())
        if results.done_rc is None:
            raise E2EError(f"libvirt domain {self.name}: the guest never reached VGTEST-DONE")
        return results


@dataclass
class ScenarioRun:
    """Result of a whole scenario run outside a test (module-scoped fixtures, the demo)."""

    value: Any = None
    error: str | None = None
    sections: list[tuple[str, str]] = field(default_factory=list)

    def e2e_logs(self) -> list[tuple[str, str]]:
        return self.sections

    def get(self) -> Any:
        """The scenario's value; AssertionError with the reason if the scenario failed."""
        if self.error is not None:
            raise AssertionError(f"the e2e scenario failed: {self.error}")
        return self.value


def run_scenario(
    assets: Assets,
    body: Callable[[Harness], Awaitable[T]],
    *,
    keep_workdir: bool = False,
    echo: bool = ECHO,
) -> ScenarioRun:
    """trio.run a scenario to completion; never raises for scenario failures."""
    run = ScenarioRun()

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            harness = Harness(assets, nursery, echo=echo)
            try:
                run.value = await body(harness)
            except (E2EError, AssertionError, OSError, trio.TooSlowError) as exc:
                run.error = f"{type(exc).__name__}: {exc}"
            finally:
                await harness.aclose()
                run.sections = harness.e2e_logs()
                if not keep_workdir:
                    harness.cleanup()
                nursery.cancel_scope.cancel()

    trio.run(main)
    return run
