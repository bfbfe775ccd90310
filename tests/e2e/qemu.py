"""Run real QEMU (and vgpud) for the e2e tier, with trio.

No sleeps are used for synchronisation. Everything waits on a real event with a deadline:

* QMP: we create the listening socket ourselves and pass its fd to QEMU
  (``-chardev socket,fd=N,server=on``). We connect before QEMU even runs, so the greeting
  is the "monitor is up" event.
* the serial console is QEMU's stdout pipe, read line by line. Tests wait for a line or
  for process exit.
* vgpud readiness: ``READY=1`` arrives on our own ``NOTIFY_SOCKET`` datagram socket.

Every process's output is kept in memory (:class:`OutputLog`). The conftest attaches the
logs to a failing test's report, so CI output alone is enough to diagnose the failure.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from tests.e2e.assets import Assets
from tests.e2e.initramfs import GuestResults

REPO = Path(__file__).resolve().parents[2]
VGPUD = os.environ.get("VGPUD_BIN") or str(
    REPO / ".venv" / "bin" / "vgpud" if (REPO / ".venv/bin/vgpud").exists() else "vgpud"
)
# What the guest gets on its command line besides the vg.* inputs.
KERNEL_CMDLINE = "panic=-1 iomem=relaxed quiet loglevel=4"
# no_timer_check (x86 only; elsewhere the kernel would hand it to init as an argument): x86's
# boot-time test that the timer interrupt arrives through the IO-APIC counts ticks over a
# busy-wait, which a TCG vCPU on a loaded host can fail; with interrupt remapping (the VFIO
# guests' VT-d) a failure is a panic ("timer doesn't work through Interrupt-remapped
# IO-APIC", seen once in .ci/run, session 25). The timer works; only the test is skipped.
ARCH_CMDLINE = {"x86_64": "no_timer_check", "aarch64": ""}
CONSOLE = {"x86_64": "ttyS0", "aarch64": "ttyAMA0"}


class E2EError(Exception):
    """An e2e step failed (timeout, early exit…); the message says which and why."""


# --------------------------------------------------------------------------------------------
# Output capture


class OutputLog:
    """Lines of one process's output; waiters wake on every new line and at EOF."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.lines: list[str] = []
        self.eof = False
        self._changed = trio.Event()

    def append(self, line: str) -> None:
        self.lines.append(line)
        self._wake()

    def close(self) -> None:
        self.eof = True
        self._wake()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def text(self) -> str:
        return "\n".join(self.lines)

    async def wait_closed(self) -> None:
        """Wait until the stream hit EOF (its process exited and the pipe drained)."""
        while not self.eof:
            await self._changed.wait()

    async def wait_for(
        self, predicate: Callable[[str], bool] | str, *, start: int = 0, what: str = ""
    ) -> tuple[int, str]:
        """Wait until a line at index >= ``start`` matches; return (index, line).

        ``predicate`` may be a regex string. Raises E2EError if the stream ends first.
        Put the call under a cancel scope (``trio.fail_after``) for a deadline.
        """
        check = _matcher(predicate) if isinstance(predicate, str) else predicate
        index = start
        while True:
            while index < len(self.lines):
                if check(self.lines[index]):
                    return index, self.lines[index]
                index += 1
            if self.eof:
                raise E2EError(f"{self.name} ended before {what or predicate!r} appeared")
            await self._changed.wait()


def _matcher(regex: str) -> Callable[[str], bool]:
    pattern = re.compile(regex)

    def check(line: str) -> bool:
        return pattern.search(line) is not None

    return check


async def pump(stream: trio.abc.ReceiveStream | None, log: OutputLog, echo: bool) -> None:
    if stream is None:
        log.close()
        return
    buffer = b""
    try:
        async for chunk in stream:
            buffer += chunk
            *complete, buffer = buffer.split(b"\n")
            for raw in complete:
                line = raw.decode("utf-8", "replace").rstrip("\r")
                log.append(line)
                if echo:
                    print(f"[{log.name}] {line}", file=sys.stderr, flush=True)
    except (trio.ClosedResourceError, trio.BrokenResourceError):
        pass
    finally:
        if buffer:
            log.append(buffer.decode("utf-8", "replace"))
        log.close()
        with trio.CancelScope(shield=True):
            await stream.aclose()


async def wait_ready(
    notify: trio.socket.SocketType,
    process: trio.Process,
    log: OutputLog,
    what: str,
    *,
    within: float,
) -> None:
    """Until ``process`` sends READY=1 to ``notify`` (its NOTIFY_SOCKET); E2EError, with its
    output so far, if it exits first or sends nothing within ``within`` seconds."""
    with trio.move_on_after(within) as scope:
        async with trio.open_nursery() as race:

            async def exited() -> None:
                await process.wait()
                race.cancel_scope.cancel()

            race.start_soon(exited)
            while True:
                data = await notify.recv(4096)
                if b"READY=1" in data.split(b"\n"):
                    race.cancel_scope.cancel()
                    break
    if scope.cancelled_caught:
        raise E2EError(f"{what} sent no READY=1 within {within:.0f} s")
    if process.returncode is not None:
        with trio.move_on_after(5):
            await log.wait_closed()
        raise E2EError(f"{what} exited with {process.returncode} before READY=1:\n" + log.text())


# --------------------------------------------------------------------------------------------
# QMP


class QMP:
    """A tiny QMP client over a connected trio socket stream."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self._stream = stream
        self._buffer = b""
        self.events: list[dict[str, Any]] = []
        self.greeting: dict[str, Any] = {}
        self._lock = trio.Lock()

    async def _message(self) -> dict[str, Any]:
        while b"\n" not in self._buffer:
            try:
                chunk = await self._stream.receive_some(65536)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                raise E2EError(f"QMP connection lost: {exc}") from None
            if not chunk:
                raise E2EError("QMP connection closed")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        result: dict[str, Any] = json.loads(line)
        return result

    async def handshake(self) -> None:
        self.greeting = await self._message()
        if "QMP" not in self.greeting:
            raise E2EError(f"unexpected QMP greeting {self.greeting}")
        await self.execute("qmp_capabilities")

    async def execute(self, command: str, **arguments: Any) -> Any:
        async with self._lock:
            request: dict[str, Any] = {"execute": command}
            if arguments:
                request["arguments"] = arguments
            try:
                await self._stream.send_all(json.dumps(request).encode() + b"\n")
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                raise E2EError(f"QMP {command}: connection lost: {exc}") from None
            while True:
                message = await self._message()
                if "event" in message:
                    self.events.append(message)
                    continue
                if "error" in message:
                    raise E2EError(f"QMP {command} failed: {message['error']}")
                return message.get("return")

    async def query_pci(self) -> list[dict[str, Any]]:
        """Every PCI function on every bus (recursing through bridges).

        Devices behind a root port appear only once the firmware numbered the buses, so
        under ``-S`` only the root port itself is listed.
        """
        buses = await self.execute("query-pci")
        found: list[dict[str, Any]] = []
        seen: set[tuple[int, int, int]] = set()

        def walk(devices: list[dict[str, Any]]) -> None:
            for dev in devices:
                key = (dev["bus"], dev["slot"], dev["function"])
                if key not in seen:  # buses behind bridges are listed twice
                    seen.add(key)
                    found.append(dev)
                bridge = dev.get("pci_bridge")
                if bridge:
                    walk(bridge.get("devices", []))

        for bus in buses:
            walk(bus.get("devices", []))
        return found

    async def aclose(self) -> None:
        await self._stream.aclose()


# --------------------------------------------------------------------------------------------
# QEMU


@dataclass
class QemuConfig:
    """One QEMU run: machine/device args (from ``vgpud qemu-args``) plus how to start it."""

    device_args: list[str]
    kernel: Path | None = None
    initrd: Path | None = None
    append: str = ""
    paused: bool = False  # -S
    allow_reboot: bool = False  # guest reboot resets (default: reboot = exit)
    extra: list[str] = field(default_factory=list)


class Qemu:
    """A running QEMU: serial log, stderr log, QMP."""

    def __init__(self, assets: Assets, config: QemuConfig, workdir: Path, name: str = "qemu"):
        self.assets = assets
        self.config = config
        self.workdir = workdir
        self.name = name
        self.serial = OutputLog(f"{name} serial")
        self.stderr = OutputLog(f"{name} stderr")
        self.firmware = OutputLog(f"{name} firmware")
        self.process: trio.Process | None = None
        self.qmp: QMP | None = None
        self.argv: list[str] = []

    def build_argv(self, qmp_fd: int, firmware_fd: int | None = None) -> list[str]:
        c = self.config
        argv = [*self.assets.qemu_cmd_prefix]
        argv += ["-nodefaults", "-no-user-config", "-display", "none"]
        argv += ["-serial", "stdio"]
        if firmware_fd is not None:  # SeaBIOS's debug log (PCI placement, boot) to a pipe
            argv += ["-chardev", f"file,id=fwlog,path=/dev/fd/{firmware_fd}"]
            argv += ["-device", "isa-debugcon,iobase=0x402,chardev=fwlog"]
        argv += ["-chardev", f"socket,id=qmp,fd={qmp_fd},server=on,wait=off"]
        argv += ["-object", "monitor-qmp,id=qmpmon,chardev=qmp"]
        if not c.allow_reboot:
            argv += ["-no-reboot"]
        else:
            argv += ["-action", "reboot=reset"]
        if c.paused:
            argv += ["-S"]
        argv += c.device_args
        if c.kernel is not None:
            argv += ["-kernel", str(c.kernel)]
        if c.initrd is not None:
            argv += ["-initrd", str(c.initrd)]
        if c.append:
            argv += ["-append", c.append]
        if self.assets.bios is not None:
            argv += ["-bios", str(self.assets.bios)]
        argv += c.extra
        return argv

    async def start(self, nursery: trio.Nursery, *, echo: bool = False) -> None:
        """Start QEMU and complete the QMP handshake (the "QEMU is up" event)."""
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        path = self.workdir / f"{self.name}.qmp"
        path.unlink(missing_ok=True)
        listener.bind(str(path))
        listener.listen(1)
        client = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        fw_read: int | None = None
        fw_write: int | None = None
        if self.assets.arch == "x86_64":
            fw_read, fw_write = os.pipe()
        try:
            # Queued in the backlog now; QEMU accepts it when its monitor starts.
            await client.connect(str(path))
            self.argv = self.build_argv(listener.fileno(), fw_write)
            passed = [listener.fileno()] + ([fw_write] if fw_write is not None else [])
            self.process = await trio.lowlevel.open_process(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                pass_fds=passed,
                env=dict(os.environ, **self.assets.qemu_env),
                start_new_session=True,
            )
        except BaseException:
            client.close()
            if fw_read is not None:
                os.close(fw_read)
            raise
        finally:
            listener.close()
            if fw_write is not None:
                os.close(fw_write)
        nursery.start_soon(pump, self.process.stdout, self.serial, echo)
        nursery.start_soon(pump, self.process.stderr, self.stderr, echo)
        if fw_read is not None:
            nursery.start_soon(pump, trio.lowlevel.FdStream(fw_read), self.firmware, False)
        else:
            self.firmware.close()
        self.qmp = QMP(trio.SocketStream(client))
        with trio.move_on_after(30) as scope:
            try:
                await self.qmp.handshake()
            except E2EError:
                await self.wait_exit(10)
                raise E2EError(
                    f"QEMU exited (rc {self.returncode}) before QMP was up:\n{self.stderr.text()}"
                ) from None
        if scope.cancelled_caught:
            raise E2EError("QEMU's QMP greeting did not arrive within 30 s")

    @property
    def returncode(self) -> int | None:
        return None if self.process is None else self.process.returncode

    async def wait_exit(self, within: float) -> int:
        """Wait for QEMU to exit by itself; E2EError on timeout."""
        assert self.process is not None
        with trio.move_on_after(within):
            rc = await self.process.wait()
            with trio.move_on_after(5):  # let the pumps drain the pipes
                await self.serial.wait_closed()
                await self.stderr.wait_closed()
            return rc
        raise E2EError(f"{self.name} did not exit within {within:.0f} s")

    async def wait_line(self, pattern: str, within: float, start: int = 0) -> tuple[int, str]:
        """Wait for a serial line matching ``pattern``; E2EError on timeout or exit."""
        with trio.move_on_after(within):
            return await self.serial.wait_for(pattern, start=start)
        raise E2EError(f"{self.name}: no serial line matching {pattern!r} within {within:.0f} s")

    async def wait_firmware(self, pattern: str, within: float) -> tuple[int, str]:
        """Wait for a line of SeaBIOS's debug log (x86 only)."""
        with trio.move_on_after(within):
            return await self.firmware.wait_for(pattern)
        raise E2EError(f"{self.name}: no firmware line matching {pattern!r} within {within:.0f} s")

    async def run_guest(self, within: float) -> GuestResults:
        """Wait for the guest's VGTEST-DONE and QEMU's exit (poweroff); parse the results."""
        with trio.move_on_after(within) as scope:
            try:
                await self.serial.wait_for(r"^VGTEST-DONE ", what="VGTEST-DONE")
            except E2EError:
                pass  # QEMU exited early; the results below show how far the guest got
            else:
                await self.wait_exit(30)
        results = GuestResults.parse(self.serial.text())
        if scope.cancelled_caught:
            raise E2EError(f"guest did not finish within {within:.0f} s")
        return results

    async def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.send_signal(sig)
            with trio.move_on_after(10):
                await self.process.wait()

    async def aclose(self) -> None:
        """Quit politely via QMP, then kill; always reaps the process."""
        if self.process is not None and self.process.returncode is None:
            if self.qmp is not None:
                with trio.move_on_after(5):
                    try:
                        await self.qmp.execute("quit")
                    except (E2EError, OSError, trio.BrokenResourceError):
                        pass
                    await self.process.wait()
            await self.kill()
        if self.qmp is not None:
            with trio.CancelScope(shield=True):
                await self.qmp.aclose()


# --------------------------------------------------------------------------------------------
# vgpud


@dataclass
class VgpudConfig:
    """One device from flags, or (``config_file``) every device of a TOML file."""

    socket_path: Path | None = None
    backing_dir: Path | None = None
    profile: str = "gh200"
    memory_size: str | None = None
    extra: list[str] = field(default_factory=list)
    config_file: Path | None = None
    # A listening socket (bound at socket_path) handed over as ``--fd``, as a service
    # manager's socket activation does.
    inherited_fd: int | None = None

    def serve_args(self) -> list[str]:
        if self.config_file is not None:
            return ["--config", str(self.config_file)]
        assert self.socket_path is not None and self.backing_dir is not None
        if self.inherited_fd is not None:
            flags = ["--fd", str(self.inherited_fd)]
        else:
            flags = ["--socket-path", str(self.socket_path)]
        flags += ["--backing-dir", str(self.backing_dir)]
        flags += ["--profile", self.profile]
        if self.memory_size:
            flags += ["--memory-size", self.memory_size]
        return flags


class Vgpud:
    """``vgpud serve`` as a child process; started() returns once READY=1 arrived."""

    def __init__(self, config: VgpudConfig, workdir: Path, name: str = "vgpud") -> None:
        self.config = config
        self.workdir = workdir
        self.name = name
        self.log = OutputLog(f"{name} log")
        self.process: trio.Process | None = None

    async def start(self, nursery: trio.Nursery, *, echo: bool = False) -> None:
        notify_path = self.workdir / f"{self.name}.notify"
        notify_path.unlink(missing_ok=True)
        notify = trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        await notify.bind(str(notify_path))
        argv = [
            VGPUD,
            "serve",
            *self.config.serve_args(),
            "--log-format",
            "json",
            *self.config.extra,
        ]
        env = dict(os.environ, NOTIFY_SOCKET=str(notify_path), PYTHONUNBUFFERED="1")
        try:
            self.process = await trio.lowlevel.open_process(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
                pass_fds=() if self.config.inherited_fd is None else (self.config.inherited_fd,),
            )
            nursery.start_soon(pump, self.process.stdout, self.log, echo)
            await wait_ready(notify, self.process, self.log, "vgpud", within=60)
        finally:
            notify.close()
            notify_path.unlink(missing_ok=True)

    async def stop(self, sig: int = signal.SIGTERM, within: float = 15) -> int:
        """Signal vgpud and wait; SIGKILL after ``within`` seconds. Returns the exit status."""
        if self.process is None:
            return 0
        if self.process.returncode is None:
            self.process.send_signal(sig)
            with trio.move_on_after(within):
                await self.process.wait()
            if self.process.returncode is None:
                self.process.kill()
        return await self.process.wait()

    def events(self) -> list[dict[str, Any]]:
        """vgpud's JSON log lines so far, parsed (other lines are skipped)."""
        parsed: list[dict[str, Any]] = []
        for line in self.log.lines:
            try:
                value = json.loads(line)
            except ValueError:
                continue
            if isinstance(value, dict):
                parsed.append(value)
        return parsed

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.returncode is None


def vgpud_output(*args: str) -> str:
    """Run ``vgpud <args>`` (a command that prints and exits) and return what it printed."""
    proc = subprocess.run([VGPUD, *args], capture_output=True, text=True, timeout=60, check=False)
    if proc.returncode != 0:
        raise E2EError(f"`vgpud {' '.join(args)}` failed ({proc.returncode}): {proc.stderr}")
    return proc.stdout


def vgpud_json(*args: str) -> Any:
    """Run ``vgpud <args> --json`` and parse its output."""
    return json.loads(vgpud_output(*args, "--json"))


def qemu_device_args(
    socket_path: Path,
    profile: str,
    memory_size: str | None,
    arch: str = "x86_64",
    *,
    numa: bool = False,
    extra: Sequence[str] = (),
) -> list[str]:
    """Machine + device args for one vgpud device (``vgpud qemu-args``, plus ``extra`` flags)."""
    args = ["qemu-args", "--socket-path", str(socket_path), "--profile", profile, "--arch", arch]
    if memory_size:
        args += ["--memory-size", memory_size]
    if numa:
        args.append("--numa")
    args += extra
    result = vgpud_json(*args)
    if not isinstance(result, list) or not all(isinstance(a, str) for a in result):
        raise E2EError(f"vgpud qemu-args printed {result!r}, not a list of strings")
    return result


def machine_args(arch: str = "x86_64", ram: str = "1G") -> list[str]:
    """q35 (or virt) TCG with fd-backed shared RAM (what vfio-user DMA needs), no device."""
    if arch == "aarch64":
        machine = ["-machine", "virt,gic-version=3,memory-backend=ram0", "-cpu", "max"]
    else:
        machine = ["-machine", "q35,memory-backend=ram0", "-cpu", "max,phys-bits=46"]
    return [
        *machine,
        *("-accel", "tcg", "-smp", "1", "-m", ram),
        *("-object", f"memory-backend-memfd,id=ram0,size={ram},share=on"),
    ]


def kernel_cmdline(arch: str = "x86_64", **inputs: int | str) -> str:
    """The guest command line with ``vg.<key>=<value>`` test inputs."""
    parts = [f"console={CONSOLE[arch]}", KERNEL_CMDLINE]
    if ARCH_CMDLINE[arch]:
        parts.append(ARCH_CMDLINE[arch])
    for key, value in inputs.items():
        rendered = hex(value) if isinstance(value, int) else value
        if re.search(r"\s", rendered):
            raise ValueError(f"vg.{key} must not contain whitespace")
        parts.append(f"vg.{key}={rendered}")
    return " ".join(parts)


def make_workdir(prefix: str = "vgpud-e2e-") -> Path:
    """A short path (AF_UNIX paths are limited to 107 bytes)."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


def remove_workdir(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def ceil_pow2(value: int) -> int:
    return 1 << math.ceil(math.log2(value)) if value > 1 else 1


__all__ = [
    "QMP",
    "E2EError",
    "OutputLog",
    "Qemu",
    "QemuConfig",
    "Vgpud",
    "VgpudConfig",
    "kernel_cmdline",
    "pump",
    "qemu_device_args",
    "vgpud_json",
    "vgpud_output",
    "wait_ready",
]
