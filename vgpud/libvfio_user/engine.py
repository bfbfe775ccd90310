"""The libvfio-user engine: nutanix's C vfio-user server driving the same ``VfioDevice``.

Theory of operation (DESIGN.md "Engines" #2):

* One ``vfu_ctx`` per device, created non-blocking (``LIBVFIO_USER_FLAG_ATTACH_NB``); it binds
  and listens on the socket path itself (an inherited listening socket, from ``--fd`` or
  systemd socket activation, takes that socket's place: :meth:`LibvfioUserServer.create`).
  Every region the device has is registered with a callback that calls
  ``region_read``/``region_write``; BAR2/BAR4 also carry the device's fd, offset and sparse
  areas, so QEMU mmaps the backing files directly, as with the Python engine.
* Config space is registered with ``VFU_REGION_FLAG_ALWAYS_CB``: libvfio-user then forwards
  *every* config access to us instead of emulating the standard header, BARs, ROM and
  capabilities itself (lib/libvfio-user.c ``region_access``), so the client sees the variant's
  emulated BAR registers exactly as under the Python engine.
* The library is not thread-safe within a context. Everything runs on the device's trio
  thread (the daemon gives each device one: :mod:`vgpud.libvfio_user.thread`) --
  ``vfu_get_poll_fd`` + ``trio.lowlevel.wait_readable`` + ``vfu_run_ctx`` until it has nothing
  left -- except ``vfu_attach_ctx``: it accepts *and negotiates* (a blocking read of VERSION,
  lib/tran.c), so it runs in a worker thread while the trio thread leaves the context alone,
  and a client that connects but never speaks is cut off after ``NEGOTIATION_TIMEOUT``.
  Within a session libvfio-user reads bodies and sends replies with blocking calls; a client
  that stalls there is cut off by :class:`~vgpud.libvfio_user.watchdog.StallWatchdog`.
* Callbacks are short and never let a Python exception reach C: ``DeviceError`` becomes
  ``-1``/errno (libvfio-user replies with it), anything else is logged and becomes EIO.
* A client leaving (``ENOTCONN``): libvfio-user unmaps its DMA regions (``dma_unregister`` ->
  ``dma_unmap``), then calls the reset callback with ``VFU_RESET_LOST_CONN`` (-> ``close``)
  and closes its eventfds; the device and its memory stay, and we attach the next client.
* Interrupts: see :mod:`vgpud.libvfio_user.irq`.
"""

from __future__ import annotations

import errno
import os
import shutil
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog
import trio

from backends.device import (
    CONFIG_REGION_INDEX,
    INTX_IRQ_INDEX,
    NUM_PCI_IRQS,
    DeviceError,
    DmaRegion,
    IrqAction,
    VfioDevice,
)
from vgpud.budget import MAX_DMA_MAPS
from vgpud.devices import BuiltDevice
from vgpud.libvfio_user import ffi as vfu
from vgpud.libvfio_user.ffi import EngineUnavailable, Library, load_library
from vgpud.libvfio_user.irq import FORWARDED_IRQS, IrqBridge
from vgpud.libvfio_user.library_log import LibraryLog
from vgpud.libvfio_user.sockets import accepted_connections, adopt_listener, shutdown_fd
from vgpud.libvfio_user.watchdog import STALL_LIMIT, StallWatchdog
from vgpud.log_limit import LogLimiter
from vgpud.mappers import SharedMemoryCheck
from vgpud.memory_files import MemoryFiles
from vgpud.server.listener import (
    ACCEPT_BACKOFF_SECONDS,
    TRANSIENT_ACCEPT_ERRORS,
    peer_closed,
    peer_credentials,
)
from vgpud.server.refusal import Refusals
from vgpud.server.session import NEGOTIATION_TIMEOUT  # the same limit for both engines
from vgpud.server.socket_files import (
    ListenerError,
    give_to_group,
    prepare_socket_directory,
    remove_if_stale,
)

NUM_VFU_REGIONS = 9  # VFU_PCI_DEV_NUM_REGIONS: libvfio-user serves the nine PCI regions only
_RECUT_INTERVAL = 0.05  # seconds between cuts of a negotiation that has to end
_YIELD_EVERY = 32  # requests served back to back before letting other tasks run
_PROT_READ, _PROT_WRITE = 1, 2
_PCI_BASE_ADDRESS_0 = 0x10
_BAR_IO, _BAR_MEM_64, _BAR_PREFETCH = 0x1, 0x4, 0x8


class LibvfioUserServer:
    """One device served by one libvfio-user context on one socket path."""

    def __init__(
        self,
        name: str,
        device: VfioDevice,
        socket_path: Path,
        library: Library,
        *,
        socket_mode: int = 0o600,
        socket_group: str | None = None,
        no_mmap: bool = False,
        library_log_level: int = vfu.LOG_INFO,
        stall_limit: float = STALL_LIMIT,
        listener: socket.socket | None = None,
        max_dma_maps: int = MAX_DMA_MAPS,
        memory_files: MemoryFiles | None = None,
    ) -> None:
        self.name = name
        self.device = device
        self.socket_path = socket_path
        self.library = library
        self.log: Any = structlog.get_logger("vgpud").bind(device=name, engine="libvfio-user")
        self.connections = 0
        self.messages = 0
        self.internal_errors = 0  # callbacks that met a bug in vgpud (logged, EIO to C)
        self.attached = False
        self.client: int | None = None  # the attached client's connection number
        # A connection taken and still negotiating (the attach thread runs): not attached
        # yet, but not idle either -- its client already has its VERSION reply.
        self.negotiating = False
        # Set by retire(): no new client is attached, serve() returns once the current one
        # has been served.
        self.retiring = False
        self._waiting_for_client = trio.CancelScope()
        self._socket_mode = socket_mode
        self._socket_group = socket_group
        self._no_mmap = no_mmap
        self._library_log_level = library_log_level
        self._ffi = library.ffi
        self._lib = library.lib
        self._ctx: Any = self._ffi.NULL
        self._listen_fd = -1
        # An inherited listening socket to serve instead of binding ``socket_path`` (then
        # the socket's own name), and the private directory libvfio-user binds in meanwhile.
        self._inherited = listener
        self._max_dma_maps = max_dma_maps
        self._private_dir: Path | None = None
        self._device_open = False
        self._callbacks: list[Any] = []  # keeps the C trampolines alive as long as the ctx
        self._dma_views: dict[tuple[int, int], memoryview] = {}
        self._idle = trio.Condition()
        counts = {index: device.irq_info(index).count for index in FORWARDED_IRQS}
        # Lines a client can cause per request are rate limited (vgpud/log_limit.py).
        self._log_limit = LogLimiter()
        # Before any client, as for the Python engine (the daemon passes its own).
        self.memory_files = memory_files or MemoryFiles(device)
        self._shared_memory = SharedMemoryCheck(self.memory_files)
        # The attached client's DMA mappings, as libvfio-user has told the device (a set:
        # after a lost connection it may report unmaps the device has already forgotten).
        self._dma_maps: set[tuple[int, int]] = set()
        self._bridge = IrqBridge(counts, self._trigger, self.log, self._log_limit)
        self._library_log = LibraryLog(self.log, self._log_limit)
        self.watchdog = StallWatchdog(name, self.log, stall_limit)

    # -- set-up and tear-down ------------------------------------------------------------

    def create(self) -> None:
        """Create, configure and realize the context; the socket listens afterwards.

        Raises :class:`EngineUnavailable` when the library refuses the configuration (an
        incompatible build) and :class:`ListenerError` for socket problems.
        """
        try:
            if self._inherited is not None:
                # --fd, socket activation: see adopt_listener.
                self.socket_path, self._private_dir = adopt_listener(
                    self._inherited, self._create_ctx
                )
            else:
                path = self.socket_path
                prepare_socket_directory(path)
                remove_if_stale(path)
                self._create_ctx(path)
                if self._socket_group is not None:
                    give_to_group(path, self._socket_group)
                os.chmod(path, self._socket_mode)
            self._configure()
        except BaseException:
            self.destroy()
            raise

    def _create_ctx(self, path: Path) -> int:
        """Create the context bound to ``path``; its listening fd."""
        old_umask = os.umask(0o177)  # born owner-only, as bind_unix_listener does
        try:
            ctx = self._lib.vfu_create_ctx(
                self._lib.VFU_TRANS_SOCK,
                os.fsencode(path),
                vfu.LIBVFIO_USER_FLAG_ATTACH_NB,
                self._ffi.NULL,
                self._lib.VFU_DEV_TYPE_PCI,
            )
            err = self._ffi.errno
        finally:
            os.umask(old_umask)
        if ctx == self._ffi.NULL:
            raise ListenerError(f"cannot listen on {path}: {os.strerror(err)}")
        self._ctx = ctx
        # Unattached, the poll fd is the listening socket (lib/tran_sock.c get_poll_fd); it
        # keeps its number for the context's life, and is needed once a client is attached.
        self._listen_fd = self._lib.vfu_get_poll_fd(ctx)
        return self._listen_fd

    def _configure(self) -> None:
        lib, ffi = self._lib, self._ffi
        log_cb = self._keep(ffi.callback("vfu_log_fn_t", self._on_log))
        self._check("vfu_setup_log", lib.vfu_setup_log(self._ctx, log_cb, self._library_log_level))
        self._check(
            "vfu_pci_init",
            lib.vfu_pci_init(self._ctx, lib.VFU_PCI_TYPE_EXPRESS, vfu.PCI_HEADER_TYPE_NORMAL, 0),
        )
        ids = self.device.region_read(CONFIG_REGION_INDEX, 0, 4)
        sub_ids = self.device.region_read(CONFIG_REGION_INDEX, 0x2C, 4)
        # Only libvfio-user's own (unused, see ALWAYS_CB) copy of the header; kept coherent.
        lib.vfu_pci_set_id(
            self._ctx,
            int.from_bytes(ids[:2], "little"),
            int.from_bytes(ids[2:], "little"),
            int.from_bytes(sub_ids[:2], "little"),
            int.from_bytes(sub_ids[2:], "little"),
        )
        info = self.device.device_info()
        if info.num_regions > NUM_VFU_REGIONS:
            self.log.warning(
                "libvfio-user serves only the nine PCI regions",
                device_regions=info.num_regions,
            )
        for index in range(min(info.num_regions, NUM_VFU_REGIONS)):
            self._setup_region(index)
        for index in range(min(info.num_irqs, NUM_PCI_IRQS)):
            count = self.device.irq_info(index).count
            self._check(
                "vfu_setup_device_nr_irqs", lib.vfu_setup_device_nr_irqs(self._ctx, index, count)
            )
        intx_cb = self._keep(ffi.callback("vfu_dev_irq_state_cb_t", self._on_intx_state))
        self._check(
            "vfu_setup_irq_state_callback",
            lib.vfu_setup_irq_state_callback(self._ctx, lib.VFU_DEV_INTX_IRQ, intx_cb),
        )
        reset_cb = self._keep(ffi.callback("vfu_reset_cb_t", self._on_reset, error=-1))
        self._check("vfu_setup_device_reset_cb", lib.vfu_setup_device_reset_cb(self._ctx, reset_cb))
        dma_register = self._keep(ffi.callback("vfu_dma_register_cb_t", self._on_dma_register))
        dma_unregister = self._keep(
            ffi.callback("vfu_dma_unregister_cb_t", self._on_dma_unregister)
        )
        # The daemon's share for this device (vgpud/budget.py), as the Python engine uses.
        self._check(
            "vfu_setup_device_dma",
            lib.vfu_setup_device_dma(self._ctx, self._max_dma_maps, dma_register, dma_unregister),
        )
        self._check("vfu_realize_ctx", lib.vfu_realize_ctx(self._ctx))

    def _setup_region(self, index: int) -> None:
        info = self.device.region_info(index)
        if info.size == 0:
            return
        ffi = self._ffi
        if index == CONFIG_REGION_INDEX:
            flags = vfu.VFU_REGION_FLAG_READ | vfu.VFU_REGION_FLAG_WRITE
            flags |= vfu.VFU_REGION_FLAG_ALWAYS_CB
        else:
            flags = self._bar_flags(index)
        areas: Any = ffi.NULL
        nr_areas, fd, offset = 0, -1, 0
        if info.mmap is not None and not self._no_mmap:
            fd, offset = info.mmap.fd, info.mmap.offset
            if info.sparse_areas:
                nr_areas = len(info.sparse_areas)
                areas = ffi.new("struct iovec[]", nr_areas)
                for i, area in enumerate(info.sparse_areas):
                    areas[i].iov_base = ffi.cast("void *", area.offset)
                    areas[i].iov_len = area.size
        access_cb = self._keep(
            ffi.callback("vfu_region_access_cb_t", self._region_callback(index), error=-1)
        )
        rc = self._lib.vfu_setup_region(
            self._ctx, index, info.size, access_cb, flags, areas, nr_areas, fd, offset
        )
        self._check(f"vfu_setup_region({index})", rc)

    def _bar_flags(self, index: int) -> int:
        """Region flags from the BAR register the device presents (informational to the
        library -- with ALWAYS_CB it never emulates BARs -- but it validates them)."""
        flags = vfu.VFU_REGION_FLAG_READ | vfu.VFU_REGION_FLAG_WRITE
        if index > 5:
            return flags
        raw = self.device.region_read(CONFIG_REGION_INDEX, _PCI_BASE_ADDRESS_0 + 4 * index, 4)
        bar = int.from_bytes(raw, "little")
        if bar & _BAR_IO:
            return flags
        flags |= vfu.VFU_REGION_FLAG_MEM
        if bar & 0x6 == _BAR_MEM_64:
            flags |= vfu.VFU_REGION_FLAG_64_BITS
        if bar & _BAR_PREFETCH:
            flags |= vfu.VFU_REGION_FLAG_PREFETCH
        return flags

    def destroy(self) -> None:
        """Destroy the context (removes the socket it bound; an inherited socket's file
        stays, as it is not ours); the device keeps its memory."""
        if self._ctx != self._ffi.NULL:
            # May call the reset (LOST_CONN) and DMA callbacks for an attached client.
            with self._library_log.routine():
                self._lib.vfu_destroy_ctx(self._ctx)
            self._ctx = self._ffi.NULL
        if self._private_dir is not None:
            shutil.rmtree(self._private_dir, ignore_errors=True)
            self._private_dir = None
        if self._inherited is not None:
            self._inherited.close()  # when create() failed before taking it over
        self._client_gone()
        self._bridge.close()
        self._callbacks.clear()
        self.watchdog.stop()

    def forsake(self) -> None:
        """The device's thread is stuck inside the library and will die with the process
        (vgpud/libvfio_user/thread.py): remove the socket file or private directory that
        :meth:`destroy` would have, without calling into the library from this thread."""
        if self._private_dir is not None:
            shutil.rmtree(self._private_dir, ignore_errors=True)
        elif self._inherited is None:
            self.socket_path.unlink(missing_ok=True)

    def _keep(self, callback: Any) -> Any:
        self._callbacks.append(callback)
        return callback

    def _check(self, what: str, rc: int) -> None:
        if rc < 0:
            err = self._ffi.errno
            raise EngineUnavailable(
                f"libvfio-user engine: {what} failed: {os.strerror(err)} (errno {err}); "
                f"{self.library.path} may be a build this engine does not support"
            )

    # -- serving ---------------------------------------------------------------------------

    async def serve(self) -> None:
        """Attach clients one after the other until :meth:`retire`; the device stays
        between them."""
        self.watchdog.start()
        while await self._attach():
            self.connections += 1
            self.client = self.connections
            # Lines the device logs from the callbacks carry the connection too (as in
            # vgpud.server.listener); this task's context is its own.
            with structlog.contextvars.bound_contextvars(
                device=self.name, connection=self.connections
            ):
                await self._serve_client(self.log.bind(connection=self.connections))

    async def _serve_client(self, log: Any) -> None:
        peer = self._peer()
        self._log_limit.log(log, "info", "client connected", **peer)
        conn_fd = self._lib.vfu_get_poll_fd(self._ctx)
        self.watchdog.guard(conn_fd, log)
        try:
            self.device.open()
            self._device_open = True
            self._bridge.connect(self.device)
            await self._shared_memory.at_attach(log, self._log_limit, peer)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._forward_irqs)
                nursery.start_soon(self._refuse_other_clients, self.connections, conn_fd)
                reason = await self._run_until_detached(log)
                nursery.cancel_scope.cancel()
            self._log_limit.log(
                log, "info", "client disconnected", reason=reason, messages=self.messages
            )
        finally:
            self.watchdog.forget()
            self.attached = False
            self.client = None
            await self._notify_idle()

    async def _refuse_other_clients(self, active: int, conn_fd: int) -> None:
        """While a client is attached, take every other connection off the listening socket
        and turn it away (EBUSY, vgpud/server/refusal.py), as the Python engine does
        (DESIGN.md "Engines": one client per device, a second one refused with a logged
        reason). libvfio-user accepts only inside ``vfu_attach_ctx``, which does not run
        while a client is attached, so the socket is ours meanwhile; left alone, a second
        VMM would hang in the listen queue and be attached, mid-state, the moment the first
        left.

        A client that connects after the attached one has closed its end is left queued: it
        is a VMM reconnecting, and the next attach takes it once the run loop has seen the
        EOF (the Python engine's hand-over, without its wait: libvfio-user sees the EOF at
        its next read). So is one that comes once libvfio-user has dropped the client
        (``conn_fd`` no longer the poll fd) and the run loop's return has yet to cancel this
        task."""
        refusals = Refusals(self.log, self._log_limit)
        with socket.socket(fileno=os.dup(self._listen_fd)) as listener:
            listener.setblocking(False)  # already O_NONBLOCK (ATTACH_NB): a no-op, stated
            async with trio.open_nursery() as nursery:
                while True:
                    await trio.lowlevel.wait_readable(listener)
                    if self._lib.vfu_get_poll_fd(self._ctx) != conn_fd or peer_closed(conn_fd):
                        return
                    try:
                        sock, _ = listener.accept()
                    except (BlockingIOError, ConnectionAbortedError):
                        continue
                    except OSError as exc:
                        if exc.errno not in TRANSIENT_ACCEPT_ERRORS:
                            raise
                        # Out of fds or memory for now: back off as the Python engine's
                        # accept does. Raised, it ended serve(), the client attached and
                        # the daemon's other devices with it.
                        self.log.error("accept failed, backing off", error=exc.strerror)
                        await trio.sleep(ACCEPT_BACKOFF_SECONDS)
                        continue
                    self.connections += 1
                    refusals.start(  # EBUSY to its VERSION (server/refusal.py)
                        nursery,
                        sock,
                        connection=self.connections,
                        active_connection=active,
                        creds=peer_credentials(sock),
                        retiring=self.retiring,
                    )

    def retire(self, *, only_if_idle: bool = False) -> bool:
        """Attach no new client (a reload removed or changed the device; call in the
        device's own loop): :meth:`serve` returns once the attached client, or the one
        negotiating, has been served, and a client that connects meanwhile is refused
        (ENODEV). With ``only_if_idle``, only when no client is attached or negotiating;
        whether it retired."""
        if only_if_idle and (self.attached or self.negotiating):
            return False
        self.retiring = True
        # Waiting for a connection: stop. Negotiating (the attach thread owns the context
        # and cannot be cancelled): the client it attaches is served, then serve() ends.
        self._waiting_for_client.cancel()
        return True

    async def _attach(self) -> bool:
        """Until a client is attached (True), or the device retires (False)."""
        while True:
            self._waiting_for_client = trio.CancelScope()
            with self._waiting_for_client:
                if not self.retiring:
                    await trio.lowlevel.wait_readable(self._lib.vfu_get_poll_fd(self._ctx))
            if self.retiring:
                return False
            done = trio.Event()
            self.negotiating = True
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._negotiation_watchdog, done)
                    try:
                        # Not cancellable: the thread owns the context until it returns.
                        rc, err = await trio.to_thread.run_sync(self._attach_blocking)
                    finally:
                        done.set()
                if rc == 0:
                    self.attached = True  # before negotiating is cleared: never idle between
                    return True
            finally:
                self.negotiating = False
            await self._notify_idle()
            if err not in (errno.EAGAIN, errno.EWOULDBLOCK):
                self._log_limit.log(
                    self.log,
                    "warning",
                    "client failed to attach",
                    error=os.strerror(err),
                    errno=err,
                )
            if err in TRANSIENT_ACCEPT_ERRORS:
                # Out of fds or memory for now: the connection stays queued and the socket
                # readable, so trying again at once spun a thread hop after another. Back off
                # as the Python engine's accept does.
                await trio.sleep(ACCEPT_BACKOFF_SECONDS)

    def _attach_blocking(self) -> tuple[int, int]:
        rc = self._lib.vfu_attach_ctx(self._ctx)
        return rc, self._ffi.errno

    async def _negotiation_watchdog(self, done: trio.Event) -> None:
        try:
            with trio.move_on_after(NEGOTIATION_TIMEOUT):
                await done.wait()
                return
            # The Python engine's words (vgpud.server.session): the line operators are told
            # to look for (docs/operations.md, Troubleshooting), whichever engine serves.
            self._log_limit.log(self.log, "warning", "client did not negotiate in time, closing")
        finally:
            # Timed out, or the daemon stops: cut until the thread has returned. Cutting once
            # is not enough: the thread may not have accepted the connection yet, and once it
            # has, nothing tells the trio thread so. Hence the (short, rare) re-cut interval.
            with trio.CancelScope(shield=True):
                while not done.is_set():
                    self._cut_unattached_connections()
                    with trio.move_on_after(_RECUT_INTERVAL):
                        await done.wait()

    def _cut_unattached_connections(self) -> None:
        """Shut down the connection libvfio-user is negotiating on (its fd is private).

        It is the only accepted connection on our socket path (:func:`accepted_connections`);
        shutting it down makes the blocked read return and attach fail.
        """
        for sock in accepted_connections(self.socket_path):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                continue

    async def _run_until_detached(self, log: Any) -> str:
        lib, ctx = self._lib, self._ctx
        fd = lib.vfu_get_poll_fd(ctx)
        bridge, watchdog = self._bridge, self.watchdog
        streak = 0
        while True:
            watchdog.enter()
            rc = lib.vfu_run_ctx(ctx)
            watchdog.leave()
            if rc > 0:
                self.messages += rc
                # The client may just have wired a pending vector (SET_IRQS). Proxies the
                # device signalled are forwarded by the write callback and _forward_irqs, so
                # the trapped-read path makes no extra syscall here.
                bridge.retry_pending()
                streak += 1
                if streak % _YIELD_EVERY == 0:
                    await trio.lowlevel.checkpoint()
                continue
            err = self._ffi.errno  # before the next call into the library replaces it
            if lib.vfu_get_poll_fd(ctx) != fd:
                # libvfio-user dropped the client and closed its fd itself: a reply it could
                # not send resets the context and counts as "nothing to do" (rc 0). The fd
                # number may already be someone else's: neither wait on it nor shut it down.
                return "closed"
            if rc == 0:
                streak = 0
                await trio.lowlevel.wait_readable(fd)
                continue
            if err == errno.ENOTCONN:
                return "closed"
            # A transport failure mid-message: the stream cannot be trusted any more (DESIGN.md
            # "Errors"). Shutting it down makes the next run see EOF and reset the context.
            log.warning("libvfio-user run failed, closing", error=os.strerror(err), errno=err)
            shutdown_fd(fd)

    async def _forward_irqs(self) -> None:
        while True:
            await trio.lowlevel.wait_readable(self._bridge.fileno())
            self._bridge.drain()

    def _trigger(self, vector: int) -> int:
        if self._lib.vfu_irq_trigger(self._ctx, vector) == 0:
            return 0
        return int(self._ffi.errno)

    def _peer(self) -> dict[str, int]:
        fd = self._lib.vfu_get_poll_fd(self._ctx)
        try:
            with socket.socket(fileno=os.dup(fd)) as sock:
                return peer_credentials(sock)
        except OSError:
            return {}

    def _client_gone(self) -> None:
        if self._device_open:
            self._device_open = False
            self.device.close()
        self._dma_views.clear()
        self._dma_maps.clear()

    def status(self) -> dict[str, Any]:
        """For the daemon's "status" line (read from the daemon's thread: plain attributes,
        each read whole). ``messages`` counts every client's, as "client disconnected" does."""
        return {
            "engine": "libvfio-user",
            "client": self.client,
            "negotiating": self.negotiating,
            "connections": self.connections,
            "messages": self.messages,
            "stalls": self.watchdog.stalls,
            "dma_maps": len(self._dma_maps),
            "memory_allocated": self.memory_files.allocated(),
        }

    async def wait_idle(self) -> None:
        """Wait until no client is attached or negotiating (used by tests)."""
        async with self._idle:
            while self.attached or self.negotiating:
                await self._idle.wait()

    async def _notify_idle(self) -> None:
        async with self._idle:
            self._idle.notify_all()

    # -- callbacks (called from C: must not raise) ---------------------------------------

    def _region_callback(self, index: int) -> Callable[[Any, Any, int, int, bool], int]:
        device, ffi, bridge = self.device, self._ffi, self._bridge

        def access(_ctx: Any, buf: Any, count: int, offset: int, is_write: bool) -> int:
            try:
                if is_write:
                    if index == CONFIG_REGION_INDEX:
                        self._config_write(offset, ffi.buffer(buf, count)[:])
                    else:
                        device.region_write(index, offset, ffi.buffer(buf, count)[:])
                    bridge.drain()  # a doorbell or config write may have raised an interrupt
                else:
                    data = device.region_read(index, offset, count)
                    ffi.memmove(buf, data, min(len(data), count))
                return count
            except DeviceError as exc:
                ffi.errno = exc.errno
            except Exception:
                self._internal_error("region access failed", region=index, offset=offset)
                ffi.errno = errno.EIO
            return -1

        return access

    def _config_write(self, offset: int, data: bytes) -> None:
        """A config write, which may be an FLR (DEVCTL bit 15, spec vfio-user.md §5.3): the
        device then resets itself and drops its pending interrupts, so the ones the bridge
        holds for vectors the client has not wired go too, as on DEVICE_RESET (one raised
        before a guest's FLR used to reach it after). The device tells by its reset count."""
        resets = getattr(self.device, "reset_count", None)
        if resets is None:
            self.device.region_write(CONFIG_REGION_INDEX, offset, data)
            return
        self._bridge.drain()  # raised before the write: the client gets it before, as ever
        self.device.region_write(CONFIG_REGION_INDEX, offset, data)
        if getattr(self.device, "reset_count", resets) != resets:
            self._bridge.drop_pending()

    def _on_reset(self, _ctx: Any, reset_type: int) -> int:
        try:
            if reset_type == self._lib.VFU_RESET_LOST_CONN:
                self._client_gone()
                return 0
            self._bridge.reset()
            self.device.reset()
            flr = reset_type == self._lib.VFU_RESET_PCI_FLR
            self._log_limit.log(self.log, "info", "device reset", flr=flr)
            self._bridge.drain()  # what the reset itself raised
            return 0
        except DeviceError as exc:
            self._ffi.errno = exc.errno
        except Exception:
            self._internal_error("reset failed")
            self._ffi.errno = errno.EIO
        return -1

    def _on_intx_state(self, _ctx: Any, start: int, count: int, mask: bool) -> None:
        action = IrqAction.MASK if mask else IrqAction.UNMASK
        try:
            self.device.set_irqs(INTX_IRQ_INDEX, action, start, count)
            self._bridge.drain()
        except DeviceError as exc:
            self._log_limit.log(self.log, "info", "INTx (un)mask refused", error=str(exc))
        except Exception:
            self._internal_error("INTx (un)mask failed")

    def _on_dma_register(self, _ctx: Any, info: Any) -> None:
        ffi = self._ffi
        try:
            iova = int(ffi.cast("uintptr_t", info.iova.iov_base))
            size = int(info.iova.iov_len)
            if (iova, size) in self._dma_maps:
                # An identical re-map: libvfio-user keeps the mapping it has (lib/dma.c
                # dma_controller_add_region) yet calls us again. The device has it already, as
                # the Python engine sees it (spec vfio-user.md R15).
                return
            memory: memoryview | None = None
            if info.vaddr != ffi.NULL:
                memory = memoryview(ffi.buffer(ffi.cast("char *", info.vaddr), size))
                if not info.prot & _PROT_WRITE:
                    memory = memory.toreadonly()
                self._dma_views[(iova, size)] = memory
            region = DmaRegion(
                iova, size, bool(info.prot & _PROT_READ), bool(info.prot & _PROT_WRITE), memory
            )
            self._dma_maps.add((iova, size))  # libvfio-user has taken it, whatever the device says
            self.device.dma_map(region)
        except DeviceError as exc:
            # libvfio-user gives this callback no way to refuse the map.
            self._log_limit.log(
                self.log, "warning", "device refused a DMA map it cannot veto here", error=str(exc)
            )
        except Exception:
            self._internal_error("DMA map notification failed")

    def _on_dma_unregister(self, _ctx: Any, info: Any) -> None:
        try:
            iova = int(self._ffi.cast("uintptr_t", info.iova.iov_base))
            size = int(info.iova.iov_len)
            self._dma_maps.discard((iova, size))
            try:
                self.device.dma_unmap(iova, size)
            finally:
                # libvfio-user munmaps right after we return: no view may outlive this.
                view = self._dma_views.pop((iova, size), None)
                if view is not None:
                    view.release()
        except DeviceError as exc:
            self._log_limit.log(self.log, "warning", "device refused a DMA unmap", error=str(exc))
        except Exception:
            self._internal_error("DMA unmap notification failed")

    def _internal_error(self, what: str, **context: Any) -> None:
        """A callback met a bug in vgpud (an unexpected exception): count it, log it."""
        self.internal_errors += 1
        self.log.exception(what, **context)

    def _on_log(self, _ctx: Any, level: int, msg: Any) -> None:
        if self._bridge.quiet:
            return  # "no fd for interrupt" while retrying a pending vector (irq.py)
        try:
            self._library_log.emit(level, self._ffi.string(msg).decode(errors="replace"))
        except Exception:
            pass  # a log line must never fail a request


async def serve_device(
    built: BuiltDevice,
    socket_path: Path,
    *,
    socket_mode: int = 0o600,
    socket_group: str | None = None,
    no_mmap: bool = False,
    library: Library | str | os.PathLike[str] | None = None,
    listener: socket.socket | None = None,
    max_dma_maps: int = MAX_DMA_MAPS,
    stall_limit: float = STALL_LIMIT,
    memory_files: MemoryFiles | None = None,
    task_status: trio.TaskStatus[LibvfioUserServer] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``built.device`` with libvfio-user on ``socket_path`` until cancelled.

    ``library``: a loaded :class:`Library`, or a path/soname to load (default:
    ``$VGPUD_LIBVFIO_USER``, else ``libvfio-user.so.0``). ``task_status.started()`` fires once
    the socket listens. Raises :class:`EngineUnavailable` (library missing or incompatible) or
    :class:`ListenerError` (socket) before that. The socket is removed on exit.
    ``listener``: an inherited listening socket to serve instead (``socket_path``, its mode
    and group then unused; its file is left in place on exit). ``max_dma_maps``: how many
    DMA regions a client may register (the daemon passes its share, vgpud/budget.py).
    ``stall_limit``: how long a client may block the library mid-message (watchdog.py).
    ``memory_files``: the device's, if already taken (vgpud/memory_files.py).
    """
    loaded = library if isinstance(library, Library) else load_library(library)
    server = LibvfioUserServer(
        built.name,
        built.device,
        socket_path,
        loaded,
        socket_mode=socket_mode,
        socket_group=socket_group,
        no_mmap=no_mmap,
        listener=listener,
        max_dma_maps=max_dma_maps,
        stall_limit=stall_limit,
        memory_files=memory_files,
    )
    try:
        server.create()
        task_status.started(server)
        await server.serve()
    finally:
        server.destroy()
