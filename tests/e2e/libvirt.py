"""A private libvirt daemon for the e2e tier: boots the domain ``vgpud qemu-args --libvirt``
prints, as a libvirt user would.

libvirtd runs in *session* mode (the unprivileged per-user daemon, qemu:///session), which
keeps all its state under the XDG directories we give it, here the scenario's work directory:
nothing on the host's /etc, /run or /var is read or written. It runs as the invoking user,
root included, through two nested user namespaces:

* the outer one (root inside) holds a mount namespace where the libvirt asset's
  ``share/libvirt`` is laid over /usr/share, because libvirt reads its CPU map from
  /usr/share/libvirt/cpu_map only (no variable moves it) and needs it for ``<cpu>``;
* the inner one maps uid 1000 to the invoking user: libvirtd sees a non-zero uid and runs as a
  session daemon, while the kernel checks files and sockets as the invoking user, so QEMU can
  reach vgpud's owner-only socket and the cached assets.

QEMU is the qemu asset's, through a wrapper script named as the domain's ``<emulator>``
(libvirt execs it; it needs sid's loader and QEMU's module dir). The domain log libvirt writes
for QEMU (its command line, its stderr) is kept with the other logs. Nothing sleeps to
synchronise: libvirtd's READY=1 arrives on our NOTIFY_SOCKET, the guest's serial console is a
socket QEMU connects to (EOF when QEMU exits), and virsh calls return when libvirt is done.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path

import trio

from tests.e2e.assets import Assets
from tests.e2e.qemu import E2EError, OutputLog, pump, wait_ready
from vgpud.libvirt_domain import QEMU_NS

# Lays share/libvirt over /usr/share in the outer namespace, then enters the inner one.
_ENTER = (
    'mount -t overlay vgpud-libvirt -o "lowerdir=$1:/usr/share" /usr/share && shift && '
    'exec unshare --user --map-user=1000 --map-group=1000 -- "$@"'
)
QEMU_CONF = 'stdio_handler = "file"\n'  # QEMU's output to the domain log, without virtlogd


class LibvirtDaemon:
    """One private libvirtd and the domains it runs for a scenario."""

    def __init__(self, assets: Assets, workdir: Path, name: str = "libvirtd") -> None:
        if assets.libvirt is None:
            raise E2EError("no libvirt asset (run `make assets`)")
        self.assets = assets
        self.libvirt = assets.libvirt
        self.name = name
        self.base = workdir / name
        self.log = OutputLog(f"{name} log")
        self.domain_logs: list[OutputLog] = []
        self.process: trio.Process | None = None
        self._domains: list[str] = []

    @property
    def socket_path(self) -> Path:
        return self.base / "run/libvirt/libvirt-sock"

    @property
    def emulator(self) -> Path:
        return self.base / f"qemu-system-{self.assets.arch}"

    def _environment(self) -> dict[str, str]:
        env = {key: value for key, value in os.environ.items() if not key.startswith("LIBVIRT")}
        for key, sub in (
            ("HOME", "home"),
            ("XDG_CONFIG_HOME", "config"),
            ("XDG_CACHE_HOME", "cache"),
            ("XDG_DATA_HOME", "data"),
            ("XDG_RUNTIME_DIR", "run"),
        ):
            (self.base / sub).mkdir(parents=True, exist_ok=True, mode=0o700)
            env[key] = str(self.base / sub)
        env["LIBVIRT_DRIVER_DIR"] = str(self.libvirt.driver_dir)
        return env

    def _write_emulator(self) -> None:
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in self.assets.qemu_env.items())
        command = shlex.join(self.assets.qemu_cmd_prefix)
        self.emulator.write_text(f'#!/bin/sh\nexport {env}\nexec {command} "$@"\n')
        self.emulator.chmod(0o755)

    def _write_firmware_descriptor(self, bios: Path) -> None:
        """The qemu asset's edk2 as a firmware libvirt can pick for ``<os firmware='efi'>``
        (aarch64). libvirt reads descriptors from /usr/share/qemu/firmware and, in session
        mode, from $XDG_CONFIG_HOME/qemu/firmware; the asset's own point at files it prunes."""
        descriptor = {
            "description": "edk2 from the qemu asset (tests/e2e/assets.py)",
            "interface-types": ["uefi"],
            "mapping": {"device": "memory", "filename": str(bios)},  # loaded as -bios
            "targets": [{"architecture": self.assets.arch, "machines": ["virt-*"]}],
            "features": ["acpi"],
            "tags": [],
        }
        firmware = self.base / "config/qemu/firmware"
        firmware.mkdir(parents=True, exist_ok=True)
        (firmware / "50-vgpud-e2e.json").write_text(json.dumps(descriptor, indent=2))

    async def start(self, nursery: trio.Nursery, *, echo: bool = False) -> None:
        """Start libvirtd; returns once it sent READY=1."""
        self.base.mkdir(mode=0o700)
        env = self._environment()
        conf = self.base / "config/libvirt"
        conf.mkdir(parents=True, exist_ok=True)
        (conf / "qemu.conf").write_text(QEMU_CONF)
        if self.assets.bios is not None:
            self._write_firmware_descriptor(self.assets.bios)
        self._write_emulator()
        notify_path = self.base / "notify"
        notify = trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        await notify.bind(str(notify_path))
        env["NOTIFY_SOCKET"] = str(notify_path)
        argv = [
            *("unshare", "--user", "--map-root-user", "--mount", "--"),
            *("sh", "-c", _ENTER, "sh", str(self.libvirt.share)),
            *self.libvirt.command("usr/sbin/libvirtd"),
        ]
        try:
            self.process = await trio.lowlevel.open_process(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
            nursery.start_soon(pump, self.process.stdout, self.log, echo)
            await wait_ready(notify, self.process, self.log, "libvirtd", within=60)
        finally:
            notify.close()
            notify_path.unlink(missing_ok=True)

    async def virsh(self, *args: str, within: float = 120) -> str:
        """Run ``virsh`` against this daemon; E2EError with its message if it fails."""
        uri = f"qemu:///session?socket={self.socket_path}"
        argv = [*self.libvirt.command("usr/bin/virsh"), "-c", uri, *args]
        with trio.fail_after(within):
            proc = await trio.run_process(
                argv, capture_stdout=True, capture_stderr=True, check=False
            )
        if proc.returncode != 0:
            raise E2EError(f"virsh {' '.join(args)} failed: {proc.stderr.decode().strip()}")
        return str(proc.stdout.decode())

    async def start_domain(
        self, domain_xml: str, serial: OutputLog, *, nursery: trio.Nursery
    ) -> str:
        """``virsh create`` the domain with its serial console wired to ``serial``; returns
        the domain's name once QEMU runs and the console is connected."""
        name = _domain_name(domain_xml)
        console = self.base / f"{name}.serial"
        listener = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            await listener.bind(str(console))
            listener.listen(1)
            xml_file = self.base / f"{name}.xml"
            xml_file.write_text(with_serial(domain_xml, console, self.emulator))
            self._domains.append(name)
            # QEMU connects to the console while it starts, before virsh create returns.
            await self.virsh("create", str(xml_file))
            with trio.fail_after(30):
                connection, _ = await listener.accept()
        finally:
            listener.close()
        nursery.start_soon(pump, trio.SocketStream(connection), serial, False)
        return name

    async def wait_domain(self, name: str, serial: OutputLog, *, within: float) -> None:
        """Until QEMU closes the console (the guest powered off: libvirt then ends the
        domain); the domain's log is collected either way."""
        with trio.move_on_after(within) as scope:
            await serial.wait_closed()
        self._collect_domain_log(name)
        if scope.cancelled_caught:
            raise E2EError(f"domain {name}: the guest did not finish within {within:.0f} s")

    def _collect_domain_log(self, name: str) -> None:
        path = self.base / f"cache/libvirt/qemu/log/{name}.log"
        log = OutputLog(f"libvirt domain {name} (QEMU command line and stderr)")
        try:
            for line in path.read_text(errors="replace").splitlines():
                log.append(line)
        except OSError as exc:
            log.append(f"(no domain log: {exc})")
        log.close()
        self.domain_logs.append(log)

    def domain_log(self, name: str) -> str:
        for log in self.domain_logs:
            if log.name.startswith(f"libvirt domain {name} "):
                return log.text()
        raise E2EError(f"no log collected for domain {name}")

    async def aclose(self) -> None:
        """Destroy what still runs (libvirtd leaves its QEMUs running when it stops), then
        stop libvirtd."""
        with trio.CancelScope(shield=True):
            if self.process is not None and self.process.returncode is None:
                for name in self._domains:
                    try:
                        await self.virsh("destroy", name, within=30)
                    except (E2EError, trio.TooSlowError):
                        pass  # already gone: the usual case
                self.process.send_signal(signal.SIGTERM)
                with trio.move_on_after(15):
                    await self.process.wait()
                if self.process.returncode is None:
                    self.process.kill()
                    await self.process.wait()


def with_serial(domain_xml: str, console: Path, emulator: Path) -> str:
    """The domain with the test's own ``<emulator>`` and a serial console that connects to
    ``console`` (the test listens there). Kernel and initrd are the caller's business."""

    def add(devices: ET.Element) -> None:
        ET.SubElement(devices, "emulator").text = str(emulator)
        serial = ET.SubElement(devices, "serial", type="unix")
        ET.SubElement(serial, "source", mode="connect", path=str(console))
        ET.SubElement(serial, "target", port="0")

    return _amended(domain_xml, "devices", add)


def with_kernel(domain_xml: str, kernel: Path, initrd: Path, cmdline: str) -> str:
    """The domain booting ``kernel`` with ``initrd`` directly (no disk, no bootloader)."""

    def add(os_element: ET.Element) -> None:
        ET.SubElement(os_element, "kernel").text = str(kernel)
        ET.SubElement(os_element, "initrd").text = str(initrd)
        ET.SubElement(os_element, "cmdline").text = cmdline

    return _amended(domain_xml, "os", add)


def _amended(domain_xml: str, tag: str, add: Callable[[ET.Element], None]) -> str:
    """``domain_xml`` with ``add`` applied to its ``<tag>`` element."""
    ET.register_namespace("qemu", QEMU_NS)
    domain = ET.fromstring(domain_xml)
    element = domain.find(tag)
    if element is None:
        raise E2EError(f"the domain has no <{tag}>")
    add(element)
    return ET.tostring(domain, encoding="unicode")


def _domain_name(domain_xml: str) -> str:
    name = ET.fromstring(domain_xml).findtext("name")
    if not name:
        raise E2EError("the domain has no <name>")
    return name
