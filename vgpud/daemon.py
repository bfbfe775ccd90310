"""``vgpud serve``: build every configured device, listen, serve, stop cleanly.

Order matters: as the kernel's probe waits before it registers the device (spec
nvgrace-gpu.md §2.4), the device's readiness is polled (§7.1: BAR0 registers every second,
up to 30 s; §7.3: with a CXL DVSEC, its status register every second, up to 1 s + 256 s)
*before* its socket exists, so a VMM can never attach to a GPU that is not ready. (Unlike
§2.4, the device -- and so its layout -- is built before the wait, so a bad memory
description fails at once rather than after it.) Only when every device listens does
the service manager hear READY=1 (STYLE.md "trio": ``started()`` only once listening).
SIGTERM/SIGINT/SIGHUP cancel everything; the sockets we created are removed and the backing
files stay (device memory outlives the daemon).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import math
import resource
import socket
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import structlog
import trio

from backends.device import DeviceError
from backends.synthetic import BackingFileError
from vgpud import systemd
from vgpud.budget import BudgetError, dma_map_limit
from vgpud.capacity import PreallocError, memory_shortfalls, preallocate
from vgpud.config import DaemonConfig, DeviceConfig, default_socket_path
from vgpud.devices import BuiltDevice, build_device
from vgpud.libvfio_user.ffi import EngineUnavailable, Library, load_library
from vgpud.libvfio_user.thread import serve_device_on_thread
from vgpud.mappers import describe, find_mappers
from vgpud.memory_files import MemoryFiles
from vgpud.server.listener import (
    SERVER_CAPABILITIES,
    DeviceServer,
    ListenerError,
    bind_unix_listener,
    check_unix_stream,
    group_id,
)
from vgpud.signals import STATUS_SIGNAL, STOP_SIGNALS, EarlySignals, handle_signals
from vgpud.variant import CxlReadinessWait, probe_wait


class StartupError(Exception):
    """The daemon cannot start; the message is for the user."""


class RefusedConfigError(StartupError):
    """The configuration cannot work on this host, found before anything was made: the
    user's input is wrong (the CLI's usage error, exit 2), not the start."""


@dataclass
class _Endpoint:
    config: DeviceConfig
    built: BuiltDevice
    sock: socket.socket
    path: Path | None  # None when the socket was inherited (we must not unlink it)
    connected: bool = False


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


def _open_endpoints(
    config: DaemonConfig, built: list[BuiltDevice], inherited: list[socket.socket | None]
) -> list[_Endpoint]:
    endpoints: list[_Endpoint] = []
    try:
        for device_config, device, given in zip(config.devices, built, inherited, strict=True):
            if given is not None:
                listening = given.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
                endpoints.append(_Endpoint(device_config, device, given, None, not listening))
                continue
            path = device_config.socket_path or default_socket_path(device_config.name)
            sock = bind_unix_listener(path, device_config.socket_mode, device_config.socket_group)
            endpoints.append(_Endpoint(device_config, device, sock, path))
    except (ListenerError, OSError) as exc:
        _close_endpoints(endpoints)  # run() closes the inherited sockets not yet in one
        raise StartupError(str(exc)) from exc
    return endpoints


def _close_endpoints(endpoints: list[_Endpoint]) -> None:
    for endpoint in endpoints:
        endpoint.sock.close()
        if endpoint.path is not None:
            endpoint.path.unlink(missing_ok=True)


class ServedDevice(Protocol):
    """What each engine hands back per device once it listens (tests use it)."""

    name: str
    connections: int

    async def wait_idle(self) -> None:
        """Until no client is attached."""

    def status(self) -> dict[str, Any]:
        """What the "status" line says about the device (``kill -USR1``)."""


async def run(
    config: DaemonConfig,
    *,
    inherited_fd: int | None = None,
    early: EarlySignals | None = None,
    task_status: trio.TaskStatus[list[Any]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the daemon until cancelled or signalled (``early``: see :class:`EarlySignals`).

    ``task_status.started`` gets one :class:`ServedDevice` per configured device: a
    :class:`DeviceServer` for the Python engine, a ``DeviceThread`` otherwise.

    SIGTERM, SIGINT and SIGHUP are ours from the first moment to the last (SIGHUP as for
    QEMU: a hang-up or a reload request; there is nothing to reload, and its default action
    would leave the sockets behind). One that arrives while
    the devices are built or the sockets made, or a second one while stopping, stops the
    daemon the same clean way instead of killing it half-way with its sockets left behind
    (found by a signal audit: the handler used to be installed only once serving began,
    and dropped after the first signal). SIGUSR1 logs one "status" line per device.
    """
    log = structlog.get_logger("vgpud")
    servers: list[ServedDevice] = []  # filled by _run as the devices listen
    with trio.open_signal_receiver(*STOP_SIGNALS, STATUS_SIGNAL) as signals:
        async with _startup_errors_unwrapped(), trio.open_nursery() as nursery:
            watcher = await nursery.start(
                handle_signals,
                signals,
                nursery.cancel_scope,
                servers,
                log,
                early.stop_requested() if early is not None else None,
            )
            try:
                await _run(config, inherited_fd, task_status, log, servers)
            finally:
                watcher.cancel()


async def _run(
    config: DaemonConfig,
    inherited_fd: int | None,
    task_status: trio.TaskStatus[list[Any]],
    log: Any,
    servers: list[ServedDevice],
) -> None:
    _raise_fd_limit()
    if inherited_fd is not None and len(config.devices) != 1:
        raise StartupError("--fd serves exactly one device")
    library = _load_engine(config)
    _check_groups(config)
    built: list[BuiltDevice] = []
    started = trio.current_time()
    try:
        for device_config in config.devices:
            built.append(build_device(device_config))
        for device in built:
            await wait_ready(device, log.bind(device=device.name))
        for device in built:
            if device.config.prealloc:
                await preallocate(device, log.bind(device=device.name))
        # Before any client can attach (the libvfio-user engine serves from threads of its
        # own, and only those may ask the device anything then).
        memory_files = {device.name: MemoryFiles(device.device) for device in built}
    except (OSError, ValueError, BackingFileError, DeviceError, PreallocError) as exc:
        # ValueError covers LayoutError: the kernel would fail probe for this memory size.
        for device in built:
            device.release()
        raise StartupError(str(exc)) from exc
    inherited: list[socket.socket | None] = []
    endpoints: list[_Endpoint] = []
    ready = False
    try:
        try:
            max_dma_maps = dma_map_limit([device.device for device in built])
        except BudgetError as exc:
            raise StartupError(str(exc)) from exc
        capabilities = dataclasses.replace(SERVER_CAPABILITIES, max_dma_maps=max_dma_maps)
        inherited = _inherited_sockets(config, inherited_fd)
        if library is None:
            endpoints = _open_endpoints(config, built, inherited)
        async with trio.open_nursery() as nursery:  # run() unwraps a StartupError from it
            if library is not None:
                served = zip(config.devices, built, inherited, strict=True)
                await _start_libvfio_user(
                    nursery,
                    served,
                    library,
                    max_dma_maps=max_dma_maps,
                    memory_files=memory_files,
                    servers=servers,
                    log=log,
                )
            for endpoint in endpoints:
                server = DeviceServer(
                    endpoint.config.name,
                    endpoint.built.device,
                    None if endpoint.connected else endpoint.sock,
                    no_mmap=endpoint.config.no_mmap,
                    capabilities=capabilities,
                    memory_files=memory_files[endpoint.built.name],
                )
                servers.append(server)
                if endpoint.connected:
                    nursery.start_soon(_serve_one_then_stop, server, endpoint.sock, nursery)
                else:
                    await nursery.start(server.serve)
                log.info(
                    "serving",
                    device=endpoint.config.name,
                    socket=str(endpoint.path) if endpoint.path else "inherited",
                    engine="python",
                    **endpoint.built.summary(),
                )
            # Once serving, so that a start that fails says only why (the CLI's one line).
            for shortfall in memory_shortfalls(built):
                log.warning(
                    "device memory is larger than its filesystem has free; the VM is killed "
                    "(SIGBUS) if its guest writes past that",
                    devices=list(shortfall.devices),
                    backing_dirs=list(shortfall.backing_dirs),
                    unbacked=shortfall.unbacked,
                    free=shortfall.free,
                )
            # One pass over /proc for every device (it can take a while on a large host).
            every_file = frozenset().union(*(files.ids for files in memory_files.values()))
            found = await trio.to_thread.run_sync(find_mappers, every_file)
            for name, files in memory_files.items():
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
            elapsed_ms = math.ceil((trio.current_time() - started) * 1000)
            log.info(
                "ready", devices=len(servers), max_dma_maps=max_dma_maps, startup_ms=elapsed_ms
            )
            systemd.notify("READY=1")
            ready = True
            task_status.started(servers)
    finally:
        systemd.notify("STOPPING=1")
        _close_endpoints(endpoints)
        for sock in inherited:  # those the libvfio-user engine did not take over
            if sock is not None:
                sock.close()
        for device in built:
            device.release()
        if ready:  # a failed start says why in one line of its own (the CLI's)
            log.info("stopped")


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
    """Every socket_group exists (checked before any memory file is made, not when the socket
    gets its group: a config audit found the files made, then the start failed)."""
    for device in config.devices:
        if device.socket_group is not None:
            try:
                group_id(device.socket_group)
            except ListenerError as exc:
                raise RefusedConfigError(f"device {device.name}: {exc}") from exc


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


async def _start_libvfio_user(
    nursery: trio.Nursery,
    served: Iterable[tuple[DeviceConfig, BuiltDevice, socket.socket | None]],
    library: Library,
    *,
    max_dma_maps: int,
    memory_files: dict[str, MemoryFiles],
    servers: list[ServedDevice],
    log: Any,
) -> None:
    """Each device with its configuration and the socket it inherited, if any; each is
    added to ``servers`` as it listens (the status signal reports those). ``memory_files``:
    each device's, by name, taken at start-up."""
    for device_config, device, sock in served:
        path = device_config.socket_path or default_socket_path(device_config.name)
        try:
            server = await nursery.start(
                functools.partial(
                    serve_device_on_thread,  # a stalled client holds up its device only
                    device,
                    path,
                    socket_mode=device_config.socket_mode,
                    socket_group=device_config.socket_group,
                    no_mmap=device_config.no_mmap,
                    library=library,
                    listener=sock,
                    max_dma_maps=max_dma_maps,
                    memory_files=memory_files[device.name],
                )
            )
        except (EngineUnavailable, ListenerError) as exc:
            raise StartupError(str(exc)) from exc
        servers.append(server)
        log.info(
            "serving",
            device=device.name,
            socket=str(server.socket_path) if sock is None else "inherited",
            engine="libvfio-user",
            **device.summary(),
        )


def _raise_fd_limit() -> None:
    # Each live fd-backed DMA mapping holds a descriptor (see vgpud.server.dma): use the hard
    # limit, as the kernel allows; vgpud/budget.py shares it out between the devices.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def _serve_one_then_stop(
    server: DeviceServer, sock: socket.socket, nursery: trio.Nursery
) -> None:
    await server.serve_connected(sock)
    nursery.cancel_scope.cancel()
