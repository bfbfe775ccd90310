"""The devices the daemon serves, each owned by a task of its own, and how a reload changes
them (vgpud/reload.py compares; this applies).

A device's task serves it with the chosen engine and, when it ends, closes its socket,
releases the device (the memory files stay) and drops it from the list the status signal
reads. It ends when the daemon stops, or when the device has been *retired* by a reload and
its client, if it had one, has left: a retired device takes no new client (those that
connect are refused, ENODEV), and its attached VM keeps its GPU until it detaches. QEMU
11.1.3 never reconnects a vfio-user device (docs/operations.md, "The VM's life cycle"), so
a reload never takes a GPU from under a running VM: a changed device whose VM is attached
keeps its old settings, and a later reload applies them once the VM has gone.
"""

from __future__ import annotations

import dataclasses
import socket
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

import trio

from backends.device import VfioDevice
from vgpud.budget import BudgetError, dma_map_limit
from vgpud.config import DaemonConfig, DeviceConfig, default_socket_path
from vgpud.devices import BuiltDevice
from vgpud.libvfio_user.ffi import EngineUnavailable, Library
from vgpud.libvfio_user.thread import serve_device_on_thread
from vgpud.memory_files import MemoryFiles
from vgpud.reload import plan, settings_changed
from vgpud.server import fast_reads
from vgpud.server.listener import SERVER_CAPABILITIES, DeviceServer
from vgpud.server.socket_files import (
    ListenerError,
    SocketClaim,
    claim_socket_path,
    group_id,
    group_reach_problem,
    listen_on_claim,
)

StatusT_contra = TypeVar("StatusT_contra", contravariant=True)


class InUseError(Exception):
    """A device to start needs what a device still served holds (message for the user)."""


class DeviceStartError(Exception):
    """A device could not be built or made ready (:data:`Prepare`; message for the user)."""


# What preparing or serving a device at a reload can fail with: reported for that device,
# and the reload goes on with the others.
DEVICE_ERRORS = (InUseError, DeviceStartError, ListenerError, EngineUnavailable)


class ServedDevice(Protocol):
    """What each engine hands back per device once it listens (tests use it)."""

    name: str

    @property
    def connections(self) -> int:
        """Clients accepted so far (refused ones included)."""

    async def wait_idle(self) -> None:
        """Until no client is attached."""

    async def retire(self, *, only_if_idle: bool = False) -> bool:
        """Take no new client; serving ends once the attached one has left."""

    def status(self) -> dict[str, Any]:
        """What the "status" line says about the device (``kill -USR1``)."""


# Builds a device and waits until it is ready to serve (vgpud.daemon): the device with its
# memory files. Raises DeviceStartError, the device released.
Prepare = Callable[[DeviceConfig], Awaitable[tuple[BuiltDevice, MemoryFiles]]]


class _Then(Generic[StatusT_contra]):
    """A ``task_status`` (trio.TaskStatus is a protocol) that hands the value to ``then``:
    the engines' serve functions run in the device's own task, with no nursery of their
    own between, so an error before they listen comes out as itself."""

    def __init__(self, then: Callable[[StatusT_contra | None], None]) -> None:
        self._then = then

    def started(self, value: StatusT_contra | None = None) -> None:
        self._then(value)


@dataclass(eq=False)
class Endpoint:
    """Where a device is served. ``sock``: the socket it listens on (bound by the daemon
    for the Python engine; inherited, for either engine) or None (the libvfio-user engine
    binds ``path`` itself). ``claim``: the daemon's hold on ``path`` (vgpud/server/
    socket_files.py), for a socket it binds, or the library does; released at close, with
    the socket file if the daemon bound it and it is still that file."""

    path: Path
    sock: socket.socket | None
    claim: SocketClaim | None = None
    connected: bool = False  # an inherited connected socket (--fd): one client, then stop

    @property
    def ours(self) -> bool:
        """The daemon made the socket file (and removes it)."""
        return self.claim is not None and self.claim.socket_file is not None

    @property
    def inherited(self) -> bool:
        return self.sock is not None and self.claim is None

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()  # a no-op once libvfio-user has taken an inherited one over
        if self.claim is not None:
            self.claim.release()


@dataclass(eq=False)
class LiveDevice:
    """A device the daemon serves, from the moment its task starts until it has ended."""

    config: DeviceConfig
    built: BuiltDevice
    endpoint: Endpoint
    memory_files: MemoryFiles
    server: ServedDevice | None = None
    retiring: bool = False
    done: trio.Event = field(default_factory=trio.Event)


@dataclass
class ReloadOutcome:
    """What a reload did, by device name (the "reloaded" line)."""

    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    draining: list[str] = field(default_factory=list)  # removed; their VM still attached
    replaced: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)  # changed, but not applied
    failed: list[str] = field(default_factory=list)


class Fleet:
    """The served devices. ``servers`` is the list the status signal reads and
    ``daemon.run`` hands out; the fleet keeps it to the devices that listen."""

    def __init__(
        self,
        config: DaemonConfig,
        nursery: trio.Nursery,
        library: Library | None,
        servers: list[ServedDevice],
        log: Any,
        *,
        prepare: Prepare,
        stop_daemon: Callable[[], None],
    ) -> None:
        self.config = config  # its devices: those given at start-up (reloads do not edit it)
        self.devices: list[LiveDevice] = []
        self.servers = servers
        self.max_dma_maps = 0  # set by share() before the first device starts
        self._nursery = nursery
        self._library = library
        self._log = log
        self._prepare = prepare
        self._stop_daemon = stop_daemon

    # -- one device -----------------------------------------------------------------------

    def open_endpoint(self, config: DeviceConfig, inherited: socket.socket | None) -> Endpoint:
        """The device's socket: ``inherited``, else (Python engine) a new listening socket
        at its path; the libvfio-user engine binds the path itself. Raises ListenerError."""
        endpoint = self.claim_endpoint(config, inherited)
        try:
            self.listen(endpoint, config)
        except BaseException:
            endpoint.close()
            raise
        return endpoint

    def claim_endpoint(self, config: DeviceConfig, inherited: socket.socket | None) -> Endpoint:
        """The device's socket as :meth:`open_endpoint` makes it, but a path of the
        daemon's only claimed (vgpud/server/socket_files.py), not yet listened on: a start
        claims every path before it makes any memory file. Raises ListenerError."""
        path = config.socket_path or default_socket_path(config.name)
        if inherited is not None:
            listening = inherited.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
            return Endpoint(path, inherited, connected=not listening)
        # The libvfio-user engine binds (and at its end unlinks) the path itself; the claim
        # keeps another daemon off it meanwhile.
        return Endpoint(path, None, claim_socket_path(path))

    def listen(self, endpoint: Endpoint, config: DeviceConfig) -> None:
        """Listen at a claimed ``endpoint`` (the Python engine; the libvfio-user engine
        listens itself when it starts). Raises ListenerError."""
        if endpoint.sock is not None or endpoint.claim is None or self._library is not None:
            return
        endpoint.sock = listen_on_claim(endpoint.claim, config.socket_mode, config.socket_group)

    async def start(
        self,
        built: BuiltDevice,
        memory_files: MemoryFiles,
        endpoint: Endpoint,
        *,
        handed: Mapping[str, Any] | None = None,
    ) -> ServedDevice:
        """Serve ``built`` at ``endpoint``, both taken over: released when the device's task
        ends, or before this raises (ListenerError, EngineUnavailable) if it cannot listen.
        ``handed``: the server's state from the previous process (vgpud/upgrade.py)."""
        live = LiveDevice(built.config, built, endpoint, memory_files)
        if handed is not None:
            live.retiring = bool(handed["retiring"])
        self.devices.append(live)
        server: ServedDevice = await self._nursery.start(
            self._run_device, live, memory_files, handed
        )
        if handed is not None:
            return server  # vgpud/upgrade.py logs one line for the whole take-over
        python = self._library is None
        self._log.info(
            "serving",
            device=built.name,
            socket="inherited" if endpoint.inherited else str(endpoint.path),
            engine="python" if python else "libvfio-user",
            **built.summary(),
            **({"fast_config_reads": self._fast_config_reads(built)} if python else {}),
        )
        group = built.config.socket_group
        if group is not None and not endpoint.inherited:
            # The socket is the group's, but a directory above it may keep the group out:
            # its VMM would get EACCES with nothing in this log to say why.
            try:
                problem = group_reach_problem(endpoint.path, group_id(group))
            except ListenerError:  # the group went away since the socket got it
                problem = None
            if problem is not None:
                self._log.warning(
                    "socket_group cannot reach the socket",
                    device=built.name,
                    socket=str(endpoint.path),
                    socket_group=group,
                    reason=problem,
                    fix="serve the socket from a directory the group can enter (/run/vgpud)",
                )
        return server

    async def _run_device(
        self,
        live: LiveDevice,
        memory_files: MemoryFiles,
        handed: Mapping[str, Any] | None,
        *,
        task_status: trio.TaskStatus[ServedDevice],
    ) -> None:
        def listening(server: ServedDevice | None) -> None:
            assert server is not None
            live.server = server
            self.servers.append(server)
            task_status.started(server)

        try:
            if self._library is None:
                await self._serve_python(live, memory_files, handed, _Then(listening))
            else:
                await self._serve_libvfio_user(live, memory_files, _Then(listening))
        finally:
            if live.server is not None:
                self.servers.remove(live.server)
            self.devices.remove(live)
            live.endpoint.close()
            live.built.release()
            live.done.set()
            if live.retiring:
                # Its share of the budget goes to the next clients of the devices left.
                self._share_again([other.built.device for other in self.devices])
                self._log.info(
                    "device released", device=live.config.name, max_dma_maps=self.max_dma_maps
                )

    def _fast_config_reads(self, built: BuiltDevice) -> str:
        if not self.config.fast_config_reads:
            return "off: fast_config_reads = false"
        return fast_reads.describe(built.device)

    async def _serve_python(
        self,
        live: LiveDevice,
        memory_files: MemoryFiles,
        handed: Mapping[str, Any] | None,
        task_status: _Then[ServedDevice],
    ) -> None:
        endpoint = live.endpoint
        assert endpoint.sock is not None, "the Python engine serves a socket of the daemon's"
        server = DeviceServer(
            live.config.name,
            live.built.device,
            None if endpoint.connected else endpoint.sock,
            no_mmap=live.config.no_mmap,
            fast_config_reads=self.config.fast_config_reads,
            capabilities=dataclasses.replace(SERVER_CAPABILITIES, max_dma_maps=self.max_dma_maps),
            memory_files=memory_files,
            handed=handed,
        )
        if endpoint.connected:
            task_status.started(server)
            await server.serve_connected(endpoint.sock)
            self._stop_daemon()  # --fd with a connected socket: its one client has left
            return
        await server.serve(task_status=_Then(lambda _: task_status.started(server)))

    async def _serve_libvfio_user(
        self, live: LiveDevice, memory_files: MemoryFiles, task_status: _Then[ServedDevice]
    ) -> None:
        config = live.config
        await serve_device_on_thread(  # a stalled client holds up its own device only
            live.built,
            live.endpoint.path,
            socket_mode=config.socket_mode,
            socket_group=config.socket_group,
            no_mmap=config.no_mmap,
            library=self._library,
            listener=live.endpoint.sock,
            max_dma_maps=self.max_dma_maps,
            memory_files=memory_files,
            task_status=task_status,
        )

    async def retire(self, live: LiveDevice, *, only_if_idle: bool = False) -> bool:
        """Stop ``live`` taking clients; its task ends once its client (if any) has left.
        With ``only_if_idle``, only when no client is attached; whether it retired."""
        assert live.server is not None, "only a listening device retires"
        if live.retiring:
            return True
        if not await live.server.retire(only_if_idle=only_if_idle):
            return False
        live.retiring = True
        return True

    def share(self, max_dma_maps: int) -> None:
        """Each client's DMA-map limit (vgpud/budget.py) from now on: for the devices started
        from now and the next clients of the Python engine's. A client attached now keeps
        the limit it negotiated, and a libvfio-user device the one it started with (its
        context is made once)."""
        self.max_dma_maps = max_dma_maps
        for live in self.devices:
            if isinstance(live.server, DeviceServer):
                live.server.capabilities = dataclasses.replace(
                    live.server.capabilities, max_dma_maps=max_dma_maps
                )

    # -- a reload --------------------------------------------------------------------------

    async def reload(self, wanted: DaemonConfig) -> ReloadOutcome:
        """Bring the served devices as close to ``wanted`` as they can go without taking a
        GPU from a VM attached to it (module docstring). Device failures are logged and
        leave the other devices alone."""
        serving = {live.config.name: live for live in self.devices if not live.retiring}
        running = dataclasses.replace(
            self.config, devices=tuple(live.config for live in serving.values())
        )
        difference = plan(running, wanted)
        outcome = ReloadOutcome()
        if difference.daemon_keys:
            self._log.warning(
                "reload cannot change the [daemon] settings: restart to apply them",
                settings=list(difference.daemon_keys),
            )
        for config in difference.removed:
            live = serving[config.name]
            if live.endpoint.inherited:
                self._leave_alone(live, "removed", outcome)
            elif await self.retire(live, only_if_idle=True):
                await live.done.wait()
                outcome.removed.append(config.name)
                self._log.info("device removed", device=config.name)
            else:
                await self.retire(live)
                outcome.draining.append(config.name)
                self._log.info(
                    "device removed; its attached client is served until it leaves",
                    device=config.name,
                )
        starts: list[tuple[DeviceConfig, DeviceConfig | None]] = [
            (config, None) for config in difference.added
        ]
        for old, new in difference.changed:
            live = serving[old.name]
            changes = settings_changed(old, new)
            if live.endpoint.inherited:
                self._leave_alone(live, "changed", outcome, settings=changes)
            elif await self.retire(live, only_if_idle=True):
                await live.done.wait()
                starts.append((new, old))
            else:
                outcome.kept.append(old.name)
                self._log.warning(
                    "device changed while a client is attached: kept as it is (reload again "
                    "once its VM has detached)",
                    device=old.name,
                    settings=changes,
                )
        if starts:
            await self._start_all(starts, outcome)
        else:
            self._share_again([live.built.device for live in self.devices])
        return outcome

    def _leave_alone(
        self, live: LiveDevice, what: str, outcome: ReloadOutcome, **context: Any
    ) -> None:
        # Its socket is the service manager's (or the --fd caller's) to close, and the
        # listening socket of no other device.
        outcome.kept.append(live.config.name)
        self._log.warning(
            f"device {what}, but its socket was inherited (socket activation, --fd): "
            "restart to apply",
            device=live.config.name,
            **context,
        )

    def _share_again(self, devices: list[VfioDevice]) -> bool:
        """Share the DMA-map budget out over ``devices`` (every device served, a draining
        one included, and those about to start); False, logged, if it cannot be."""
        try:
            self.share(dma_map_limit(devices))
        except BudgetError as exc:
            self._log.error("devices not started", error=str(exc))
            return False
        return True

    async def _start_all(
        self, starts: list[tuple[DeviceConfig, DeviceConfig | None]], outcome: ReloadOutcome
    ) -> None:
        """Prepare each device to start (``(wanted, replaced or None)``), share the budget
        out again over every device then, and start them. A changed device that cannot
        start with its new settings is started again with its old ones."""
        prepared: list[tuple[BuiltDevice, MemoryFiles, DeviceConfig | None]] = []
        restore: list[DeviceConfig] = []
        try:
            for config, old in starts:
                try:
                    self._check_free(config)
                    built, files = await self._prepare(config)
                except DEVICE_ERRORS as exc:
                    self._failed(config, old, exc, outcome, restore)
                    continue
                prepared.append((built, files, old))
            every = [live.built.device for live in self.devices]
            if not self._share_again(every + [built.device for built, _, _ in prepared]):
                for built, _, old in prepared:
                    built.release()
                    self._failed(built.config, old, "too many devices", outcome, restore)
                prepared.clear()
            while prepared:
                built, files, old = prepared.pop(0)
                try:
                    await self._listen_and_start(built, files)
                except (ListenerError, EngineUnavailable) as exc:
                    self._failed(built.config, old, exc, outcome, restore)
                    continue
                (outcome.added if old is None else outcome.replaced).append(built.name)
        finally:
            for built, _, _ in prepared:  # cancelled (the daemon stops) before they started
                built.release()
        for config in restore:
            await self._restore(config, outcome)

    def _check_free(self, config: DeviceConfig) -> None:
        """A device still served (a removed one whose VM is attached) keeps its socket path,
        memory directory or PCI device until it is released: a new device cannot have them
        yet."""
        path = config.socket_path or default_socket_path(config.name)
        for live in self.devices:
            if config.vfio_device is not None and config.vfio_device == live.config.vfio_device:
                # Its IOMMU group is open in this process: opening it again is the kernel's
                # bare "Device or resource busy".
                raise InUseError(
                    f"PCI device {config.vfio_device} is still device {live.config.name}'s "
                    "(its VM is attached): reload again once it has detached"
                )
            if live.endpoint.path == path:
                raise InUseError(
                    f"socket {path} is still device {live.config.name}'s (its VM is attached): "
                    "reload again once it has detached"
                )
            synthetic = config.vfio_device is None and live.config.vfio_device is None
            if synthetic and live.config.resolved_backing_dir() == config.resolved_backing_dir():
                raise InUseError(
                    f"memory directory {config.resolved_backing_dir()} is still device "
                    f"{live.config.name}'s (its VM is attached): reload again once it has "
                    "detached"
                )

    def _failed(
        self,
        config: DeviceConfig,
        old: DeviceConfig | None,
        exc: BaseException | str,
        outcome: ReloadOutcome,
        restore: list[DeviceConfig],
    ) -> None:
        outcome.failed.append(config.name)
        if old is None:
            self._log.error("device not added", device=config.name, error=str(exc))
            return
        self._log.error(
            "device cannot start with its new settings; starting it with its old ones",
            device=config.name,
            error=str(exc),
        )
        restore.append(old)

    async def _listen_and_start(self, built: BuiltDevice, files: MemoryFiles) -> None:
        """A socket of its own for a prepared device, then :meth:`start`; ``built`` is
        released if either fails (ListenerError, EngineUnavailable)."""
        try:
            endpoint = self.open_endpoint(built.config, None)
        except ListenerError:
            built.release()
            raise
        await self.start(built, files, endpoint)

    async def _restore(self, config: DeviceConfig, outcome: ReloadOutcome) -> None:
        try:
            built, files = await self._prepare(config)
            # The budget was shared out while it was down (its release, then _start_all):
            # count it again before it serves, or each client gets more than its share.
            if not self._share_again([live.built.device for live in self.devices] + [built.device]):
                built.release()
                raise DeviceStartError("too many devices")
            await self._listen_and_start(built, files)
        except DEVICE_ERRORS as exc:
            self._log.error(
                "device is no longer served: it started neither with its new settings nor "
                "with its old ones",
                device=config.name,
                error=str(exc),
            )
            return
        outcome.kept.append(config.name)
