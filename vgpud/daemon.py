"""``vgpud serve``: build every configured device, listen, serve, stop cleanly.

Order matters: as the kernel's probe waits before it registers the device (spec
nvgrace-gpu.md §2.4), the device's readiness is polled (§7.1: BAR0 registers every second,
up to 30 s; §7.3: with a CXL DVSEC, its status register every second, up to 1 s + 256 s)
*before* its socket exists, so a VMM can never attach to a GPU that is not ready. (Unlike
§2.4, the device -- and so its layout -- is built before the wait, so a bad memory
description fails at once rather than after it.) Only when every device listens does
the service manager hear READY=1 (STYLE.md "trio": ``started()`` only once listening).
SIGTERM/SIGINT cancel everything; the sockets we created are removed and the backing
files stay (device memory outlives the daemon). SIGHUP reloads the config file
(vgpud/fleet.py), or stops the daemon when it was started without one. SIGUSR2 upgrades it
in place (vgpud/upgrade.py); a daemon so started takes its devices over instead of building
them (``handover``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import math
import os
import resource
import socket
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import structlog
import trio

from backends.device import DeviceError
from backends.synthetic import BackingFileError
from vgpud import stand_in, systemd, upgrade
from vgpud.budget import BudgetError, dma_map_limit
from vgpud.capacity import PreallocError, memory_shortfalls, preallocate
from vgpud.config import ConfigError, DaemonConfig, DeviceConfig
from vgpud.devices import BuiltDevice, build_device
from vgpud.fleet import DeviceStartError, Endpoint, Fleet, ServedDevice
from vgpud.libvfio_user.ffi import EngineUnavailable, Library, load_library
from vgpud.mappers import describe, find_mappers
from vgpud.memory_files import MemoryFiles
from vgpud.server.socket_files import (
    ListenerError,
    check_unix_stream,
    group_id,
    group_refusal,
)
from vgpud.signals import (
    RELOAD_SIGNAL,
    STATUS_SIGNAL,
    STOP_SIGNALS,
    UPGRADE_SIGNAL,
    EarlySignals,
    handle_signals,
    quiet_thread,
)
from vgpud.variant import CxlReadinessWait, probe_wait

# What building a device, waiting for it and preallocating its memory can fail with (a
# ValueError: LayoutError, the kernel would fail probe for this memory size).
_DEVICE_FAILURES = (OSError, ValueError, BackingFileError, DeviceError, PreallocError)


class StartupError(Exception):
    """The daemon cannot start; the message is for the user."""


class RefusedConfigError(StartupError):
    """The configuration cannot work on this host, found before anything was made: the
    user's input is wrong (the CLI's usage error, exit 2), not the start."""


async def wait_ready(built: BuiltDevice, log: Any) -> None:
    """Poll the device's readiness like the kernel's probe does (spec nvgrace-gpu.md §7).

    The variant's :func:`~vgpud.variant.probe_wait` decides the path, the poll interval and
    the deadline: BAR0 every 1 s for 30 s (§7.1), or the CXL DVSEC every 1 s for 1 s plus
    the device's Memory_Active_Timeout, up to 256 s (§7.3).
    """
    if not built.probes_readiness:
        return
    started = trio.current_time()
    wait = probe_wait(built.backend, clock=trio.current_time)
    while True:
        try:
            delay = wait.poll()
        except DeviceError as exc:
            if exc.errno != errno.ETIME:
                raise  # ENODEV: the CXL register read all-ones (§7.3)
            elapsed = trio.current_time() - started
            if isinstance(wait, CxlReadinessWait):
                reason = exc.message
            else:
                reason = "readiness registers never read 0xFF"
            raise StartupError(
                f"device {built.name}: not ready after {elapsed:.0f} s ({reason}; ETIME)"
            ) from exc
        if delay is None:
            if wait.polls > 1:
                log.info("device ready", polls=wait.polls)
            return
        if wait.polls == 1:
            log.info("waiting for the device to become ready")
        await trio.sleep(delay)


def _inherited_sockets(
    config: DaemonConfig, inherited_fd: int | None
) -> list[socket.socket | None]:
    """Per configured device, the socket it was handed (``--fd``, or systemd socket
    activation matched by FileDescriptorName= or, one per device, by order); None where
    the device binds its own path."""
    opened: list[socket.socket | None] = []
    try:
        if inherited_fd is not None:  # one device: run() checked
            given = socket.socket(fileno=inherited_fd)
            opened.append(given)
            _check_inherited(given)
            # Close-on-exec, as socket activation's are (systemd.listen_fds): an upgrade's
            # next process must not find it open at the number its stand-in hands it to.
            given.set_inheritable(False)
            return opened
        activated = systemd.listen_fds()
        for index, device_config in enumerate(config.devices):
            fd = activated.get(device_config.name)
            if fd is None and len(activated) == len(config.devices):
                fd = list(activated.values())[index]
            opened.append(None if fd is None else socket.socket(fileno=fd))
        for sock in opened:
            if sock is not None:
                _check_inherited(sock)
    except (OSError, StartupError) as exc:
        for sock in opened:
            if sock is not None:
                sock.close()
        if isinstance(exc, StartupError):
            raise
        raise StartupError(f"inherited socket: {exc.strerror}") from exc
    return opened


def _check_inherited(sock: socket.socket) -> None:
    """A UNIX stream socket, listening or connected."""
    try:
        check_unix_stream(sock, f"inherited fd {sock.fileno()}")
    except ListenerError as exc:
        raise StartupError(str(exc)) from None
    if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        try:
            sock.getpeername()
        except OSError:
            raise StartupError(
                f"inherited fd {sock.fileno()} is a UNIX socket neither listening nor connected"
            ) from None


async def run(
    config: DaemonConfig,
    *,
    inherited_fd: int | None = None,
    early: EarlySignals | None = None,
    reload_config: Callable[[], DaemonConfig] | None = None,
    handover: upgrade.Handover | None = None,
    task_status: trio.TaskStatus[list[Any]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the daemon until cancelled or signalled (``early``: see :class:`EarlySignals`).

    ``task_status.started`` gets the list of :class:`~vgpud.fleet.ServedDevice` (a
    :class:`DeviceServer` for the Python engine, a ``DeviceThread`` otherwise), one per
    device served, which the daemon keeps up to date as reloads change the devices.

    SIGTERM, SIGINT and SIGHUP are ours from the first moment to the last. One that
    arrives while the devices are built or the sockets made, or a second one while
    stopping, stops the daemon the same clean way instead of killing it half-way with its
    sockets left behind (found by a signal audit: the handler used to be installed only
    once serving began, and dropped after the first signal). SIGUSR1 logs one "status"
    line per device. SIGHUP reloads when there is a configuration to read again
    (``reload_config``: the config file, with the command line's overrides, as at
    start-up; vgpud/fleet.py); without one it stops, as for QEMU (a hang-up: there is
    nothing to reload, and its default action would leave the sockets behind). SIGUSR2
    upgrades the daemon in place (vgpud/upgrade.py); with ``handover`` (the document the
    previous process left) the devices are taken over rather than built.
    """
    log = structlog.get_logger("vgpud")
    servers: list[ServedDevice] = []  # kept to the devices that listen by the fleet
    requests = _Requests()
    request_reload = None if reload_config is None else functools.partial(requests.add, "reload")
    with trio.open_signal_receiver(*STOP_SIGNALS, STATUS_SIGNAL, UPGRADE_SIGNAL) as signals:
        async with _startup_errors_unwrapped(), trio.open_nursery() as nursery:
            watcher = await nursery.start(
                functools.partial(
                    handle_signals,
                    signals,
                    nursery.cancel_scope,
                    servers,
                    log,
                    early.received if early is not None else (),
                    reload=request_reload,
                    upgrade=functools.partial(requests.add, "upgrade"),
                )
            )
            ready = False
            try:
                # The devices' tasks: until they have all ended, the signals are still
                # taken (a repeat stop signal is logged) and the daemon has not stopped.
                async with trio.open_nursery() as devices:
                    fleet = await _start(
                        config,
                        inherited_fd,
                        nursery=devices,
                        daemon_scope=nursery.cancel_scope,
                        log=log,
                        servers=servers,
                        handover=handover,
                    )
                    ready = True
                    task_status.started(servers)
                    while True:
                        what = await requests.next()
                        if what == "reload" and reload_config is not None:
                            await _reload(fleet, reload_config, log)
                        elif what == "upgrade":
                            await upgrade.upgrade(fleet, log, due=requests.due_signals)
            finally:
                systemd.notify("STOPPING=1")
                if ready:  # a failed start says why in one line of its own (the CLI's)
                    log.info("stopped")
                watcher.cancel()


class _Requests:
    """Reloads and upgrades asked for by signal, done one at a time. One of each waits at
    most: signals that come while one is due are folded into it (a due reload reads the
    file afresh anyway). A reload due goes before an upgrade due, so the upgraded daemon
    serves what the file says."""

    def __init__(self) -> None:
        self._due: set[str] = set()
        self._wake = trio.Event()

    def add(self, what: str) -> None:
        self._due.add(what)
        self._wake.set()

    def due_signals(self) -> list[int]:
        """The signals that asked for what is due: an upgrade's exec hands them to the next
        process (vgpud.signals.HeldSignals), which would otherwise never do it."""
        signals = {"reload": RELOAD_SIGNAL, "upgrade": UPGRADE_SIGNAL}
        return [signals[what] for what in sorted(self._due)]

    async def next(self) -> str:
        while not self._due:
            self._wake = trio.Event()
            await self._wake.wait()
        what = "reload" if "reload" in self._due else "upgrade"
        self._due.discard(what)
        return what


async def _start(
    config: DaemonConfig,
    inherited_fd: int | None,
    *,
    nursery: trio.Nursery,
    daemon_scope: trio.CancelScope,
    log: Any,
    servers: list[ServedDevice],
    handover: upgrade.Handover | None = None,
) -> Fleet:
    """Build, ready and serve every configured device, their tasks in ``nursery``; or,
    with ``handover``, take over the devices the previous process served."""
    _raise_fd_limit()
    started = trio.current_time()
    library = None
    if handover is None:
        if inherited_fd is not None and len(config.devices) != 1:
            raise StartupError("--fd serves exactly one device")
        library = _load_engine(config)
        _check_groups(config)
    elif config.engine != "python":
        # The handed-over sessions are the Python engine's; so stay the devices a reload
        # adds. The next restart applies it.
        log.warning("an upgrade cannot change the engine: restart to apply it")
        config = dataclasses.replace(config, engine="python", libvfio_user=None)
    fleet = Fleet(
        config,
        nursery,
        library,
        servers,
        log,
        prepare=functools.partial(_prepare, library=library, log=log),
        stop_daemon=daemon_scope.cancel,
    )
    if handover is None:
        await _start_fresh(config, inherited_fd, fleet, log)
        await _warn_about_memory(fleet, log, ())
        elapsed_ms = math.ceil((trio.current_time() - started) * 1000)
        log.info(
            "ready", devices=len(servers), max_dma_maps=fleet.max_dma_maps, startup_ms=elapsed_ms
        )
    else:
        try:
            resumed = await upgrade.resume(handover, fleet, log)
            handover_ms = upgrade.handover_ms(handover)  # the VMs are served again
            # The stand-in is gone before the memory's mappers are looked for.
            if handover.exiting is not None and not await handover.exiting.reaped():
                log.warning(
                    "the stand-in did not exit after handing over; killed",
                    pid=handover.exiting.pid,
                    seconds=stand_in.EXIT_TIMEOUT,
                )
        finally:
            if handover.exiting is not None:
                handover.exiting.stop()  # a start that failed or was cancelled meanwhile
        # Devices taken over keep the settings they were served with (a reload applies
        # an edited file); their config is what the fleet compares a reload with.
        fleet.config = dataclasses.replace(
            config, devices=tuple(live.config for live in fleet.devices)
        )
        await _warn_about_memory(fleet, log, resumed.client_pids)
        log.info(
            "upgraded",
            devices=resumed.devices,
            clients=resumed.clients,
            pid=os.getpid(),
            from_version=handover.version,
            handover_ms=handover_ms,
            **({} if handover.stand_in_ms is None else {"stand_in_ms": handover.stand_in_ms}),
            max_dma_maps=fleet.max_dma_maps,
        )
    systemd.notify("READY=1")
    return fleet


async def _start_fresh(
    config: DaemonConfig, inherited_fd: int | None, fleet: Fleet, log: Any
) -> None:
    """Build, ready and serve every configured device in ``fleet``."""
    inherited = _inherited_sockets(config, inherited_fd)
    endpoints: list[Endpoint] = []  # those not yet handed to the fleet
    built: list[BuiltDevice] = []  # those not yet handed to the fleet
    try:
        try:
            # Every socket path is claimed before any memory file is made: a path another
            # daemon holds, or a directory another user owns, fails the start with nothing
            # made (vgpud/server/socket_files.py).
            for index, device_config in enumerate(config.devices):
                endpoints.append(fleet.claim_endpoint(device_config, inherited[index]))
                inherited[index] = None  # the endpoint's now
        except ListenerError as exc:
            raise StartupError(str(exc)) from exc
        try:
            for device_config in config.devices:
                built.append(build_device(device_config))
            for device in built:
                await wait_ready(device, log.bind(device=device.name))
            for device in built:
                if device.config.prealloc:
                    await preallocate(device, log.bind(device=device.name))
            # Before any client can attach (the libvfio-user engine serves from threads of
            # its own, and only those may ask the device anything then).
            memory_files = {device.name: MemoryFiles(device.device) for device in built}
            max_dma_maps = dma_map_limit([device.device for device in built])
        except (*_DEVICE_FAILURES, BudgetError) as exc:
            raise StartupError(str(exc)) from exc
        fleet.share(max_dma_maps)
        try:
            for endpoint, device in zip(endpoints, built, strict=True):
                fleet.listen(endpoint, device.config)
            while built:
                device, endpoint = built.pop(0), endpoints.pop(0)
                await fleet.start(device, memory_files[device.name], endpoint)
        except (ListenerError, EngineUnavailable) as exc:
            raise StartupError(str(exc)) from exc
    finally:
        for endpoint in endpoints:
            endpoint.close()
        for sock in inherited:  # those no endpoint took
            if sock is not None:
                sock.close()
        for device in built:
            device.release()


async def _warn_about_memory(fleet: Fleet, log: Any, attached_pids: Sequence[int]) -> None:
    """Once serving, so that a start that fails says only why (the CLI's one line): memory
    the filesystems cannot hold, and processes other than the attached VMMs
    (``attached_pids``) that map a device's memory files."""
    for shortfall in memory_shortfalls([live.built for live in fleet.devices]):
        log.warning(
            "device memory is larger than its filesystem has free; the VM is killed "
            "(SIGBUS) if its guest writes past that",
            devices=list(shortfall.devices),
            backing_dirs=list(shortfall.backing_dirs),
            unbacked=shortfall.unbacked,
            free=shortfall.free,
        )
    # One pass over /proc for every device (it can take a while on a large host).
    files_of = {live.config.name: live.memory_files for live in fleet.devices}
    every_file = frozenset().union(*(files.ids for files in files_of.values()))
    found = await trio.to_thread.run_sync(
        quiet_thread(functools.partial(find_mappers, every_file, exclude=attached_pids))
    )
    for name, files in files_of.items():
        mappers = [m for m in found if m.files & files.ids]
        if mappers:
            log.warning(
                "device memory is still mapped by another process (a VM attached "
                "before this start?): its GPU no longer answers, QEMU does not "
                "reconnect, but it still writes this memory, which the next VM "
                "would share; stop it first",
                device=name,
                **describe(mappers),
            )


async def _prepare(
    config: DeviceConfig, *, library: Library | None, log: Any
) -> tuple[BuiltDevice, MemoryFiles]:
    """One device a reload adds, as start-up makes each: built, ready, preallocated if
    configured, its memory files taken; released if any step fails."""
    if library is not None and config.vfio_device is not None:
        raise DeviceStartError(
            f"the libvfio-user engine cannot serve a vfio_device ({config.name})"
        )
    try:
        built = build_device(config)
    except _DEVICE_FAILURES as exc:
        raise DeviceStartError(str(exc)) from exc
    try:
        device_log = log.bind(device=built.name)
        await wait_ready(built, device_log)
        if config.prealloc:
            await preallocate(built, device_log)
        return built, MemoryFiles(built.device)
    except (StartupError, *_DEVICE_FAILURES) as exc:  # StartupError: never became ready
        built.release()
        raise DeviceStartError(str(exc)) from exc
    except BaseException:
        built.release()
        raise


async def _reload(fleet: Fleet, load: Callable[[], DaemonConfig], log: Any) -> None:
    """Read the configuration again and apply it (vgpud/fleet.py); a configuration that
    does not parse changes nothing. The service manager sees the reload start and end
    (sd_notify RELOADING=1 ... READY=1)."""
    systemd.notify(f"RELOADING=1\nMONOTONIC_USEC={time.monotonic_ns() // 1000}")
    log.info("reloading")
    try:
        try:
            wanted = load()
        except ConfigError as exc:
            log.error("reload failed, nothing changed", error=str(exc))
            return
        except Exception:
            # A bug in vgpud reading the file (tomllib's RecursionError was one until it
            # became a ConfigError): nothing has changed yet, so the devices go on being
            # served, as after a failure part-way below; stopping would take every VM's GPU.
            log.exception("reload failed, nothing changed")
            return
        try:
            outcome = await fleet.reload(wanted)
        except Exception:
            # A bug in vgpud: the devices already served go on being served, as a session's
            # bug leaves its device (vgpud.server.listener); stopping would take every VM's GPU.
            log.exception("reload failed part-way; the devices served go on being served")
            return
        log.info(
            "reloaded",
            devices=len(fleet.servers),
            max_dma_maps=fleet.max_dma_maps,
            **{key: names for key, names in dataclasses.asdict(outcome).items() if names},
        )
    finally:
        systemd.notify("READY=1")


@contextlib.asynccontextmanager
async def _startup_errors_unwrapped() -> AsyncIterator[None]:
    """A start-up failure inside the nursery (a libvfio-user device that cannot listen)
    comes out of it as an exception group; the CLI reports a :class:`StartupError` in one
    line, so hand it on as itself when it is all the group holds."""
    try:
        yield
    except BaseExceptionGroup as group:
        startup, rest = group.split(StartupError)
        if startup is None or rest is not None:
            raise
        first: BaseException = startup
        while isinstance(first, BaseExceptionGroup):
            first = first.exceptions[0]
        raise first from None


def _check_groups(config: DaemonConfig) -> None:
    """Every socket_group exists and the daemon can give its sockets to it (checked before
    any memory file is made, not when the socket gets its group: a config audit found the
    files made, then the start failed)."""
    for device in config.devices:
        if device.socket_group is not None:
            try:
                refusal = group_refusal(group_id(device.socket_group))
            except ListenerError as exc:
                raise RefusedConfigError(f"device {device.name}: {exc}") from exc
            if refusal is not None:
                raise RefusedConfigError(
                    f"device {device.name}: socket_group {device.socket_group}: {refusal}"
                )


def _load_engine(config: DaemonConfig) -> Library | None:
    """The libvfio-user library when that engine is chosen (checked before anything starts)."""
    if config.engine != "libvfio-user":
        return None
    passthrough = [d.name for d in config.devices if d.vfio_device is not None]
    if passthrough:
        # libvfio-user keeps the VMM's eventfds to itself and its irq bridge wires every
        # index at once, which the kernel's VFIO refuses (one interrupt type at a time).
        raise RefusedConfigError(
            f"the libvfio-user engine cannot serve a vfio_device ({', '.join(passthrough)}); "
            "use the python engine"
        )
    try:
        return load_library(config.libvfio_user)
    except EngineUnavailable as exc:
        raise StartupError(str(exc)) from exc


def _raise_fd_limit() -> None:
    # Each live fd-backed DMA mapping holds a descriptor (see vgpud.server.dma): use the hard
    # limit, as the kernel allows; vgpud/budget.py shares it out between the devices.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
