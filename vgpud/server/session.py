"""One client connection: the protocol connection, the DMA table and the device, glued.

The loop is deliberately plain: read a header with its fds, then exactly its body, hand both
to the protocol connection (``receive_header``/``receive_body``: no reassembly buffer), turn
each request into ``VfioDevice`` calls, send the reply. A header that arrives split goes
through the connection's buffered path (``receive_data``/``next_event``) instead. Requests
are handled strictly in arrival order and each reply is sent before the next request is read,
which gives spec vfio-user.md R11 (posted writes take effect before any later read) for free.
Trapped accesses are on the VM's critical path: when the socket has the bytes, a message is
read, handled and answered without a coroutine or a pass through trio's scheduler (the
transport's ``*_nowait`` calls; a fairness budget still forces a checkpoint every so often),
and nothing is logged above debug level. REGION_READ/REGION_WRITE, the messages every guest
access to a trapped register is, go further: the connection's fast path
(:mod:`protocol.trapped`) hands them over as a ``TrappedAccess`` with the checks done, and
they are answered without a ``Request`` event, a dispatch or an ``Outgoing``. Plain config
reads go further still: at each message boundary the C loop of :mod:`vgpud.server.fast_reads`
answers those waiting on the socket from the device's config bytes, and waits for the next
one in ``poll()`` when trio has nothing else to do; it leaves everything else unread.

Ownership: every fd that arrives is closed on every path -- by the DMA table (with its
mapping), by the device (eventfds, per the VfioDevice contract), or here (rejected
messages, fds a command must not carry, a stream that dies mid-message).

A live upgrade (vgpud/upgrade.py) *freezes* a session: it comes to rest between two messages
(parked waiting for the next one, or holding still before reading it) and stays there, so
its connection, DMA table and device can be handed to the next process, which resumes it
from :meth:`Session.handover`'s description (``handed``). An upgrade that does not happen
thaws it.
"""

from __future__ import annotations

import errno
import math
from collections.abc import Callable, Coroutine, Mapping, Sequence
from types import CoroutineType
from typing import Any

import trio

import protocol as p
from backends.device import (
    CONFIG_REGION_INDEX,
    DeviceError,
    IrqAction,
    RegionFlags,
    VfioDevice,
)
from vgpud.log_limit import LogLimiter
from vgpud.server import fast_reads
from vgpud.server.dma import DmaError, DmaTable
from vgpud.server.transport import FdStream, TransportError, close_fds
from vgpud.server.watchers import FdWatchers

# VFIO_IRQ_SET_* (linux/vfio.h; spec vfio-user.md §3.8, §4).
_DATA_NONE, _DATA_BOOL, _DATA_EVENTFD = 1, 2, 4
_DATA_MASK = 0x7
_ACTIONS = {8: IrqAction.MASK, 16: IrqAction.UNMASK, 32: IrqAction.TRIGGER}
_ACTION_MASK = 0x38
_DMA_READ, _DMA_WRITE = 1, 2
_UNMAP_ALL = 2
_UNMAP_DIRTY_BITMAP = 1
# Seconds a client has from connecting to its VERSION reply. The device takes one client at
# a time, so one that connects and never negotiates (a hung tool, a stray script) would keep
# the VM it is meant for refused indefinitely; QEMU sends VERSION as it connects. Once
# negotiated, a client may stay idle as long as it likes (a guest that leaves the GPU alone).
NEGOTIATION_TIMEOUT = 10.0

# What reading one message gives: an event; the reply to a trapped access served on the spot
# (bytes); None (a split header now buffered, or a posted write served); or, when a read
# would block, the coroutine that finishes the job.
_Read = p.Event | bytes | None | Coroutine[Any, Any, "p.Event | bytes | None"]


class Session:
    """Serve one vfio-user client on ``stream`` with ``device`` until either side ends it."""

    def __init__(
        self,
        stream: FdStream,
        device: VfioDevice,
        capabilities: p.Capabilities,
        log: Any,
        *,
        no_mmap: bool = False,
        log_limit: LogLimiter | None = None,
        handed: Mapping[str, Any] | None = None,
        on_rest: Callable[[], None] | None = None,
        fast_config_reads: bool = True,
    ) -> None:
        """``handed``: resume the session another process described with :meth:`handover`
        (a live upgrade); ValueError if it cannot be, with every fd it names closed or
        taken (the caller closes the stream). ``on_rest``: called each time the session
        comes to rest while frozen (:meth:`freeze`). ``fast_config_reads``: let the C loop
        answer plain config reads where it can (:mod:`vgpud.server.fast_reads`)."""
        self.stream = stream
        self.device = device
        self.log = log
        # Lines a client can cause per request (vgpud/log_limit.py); the device's limiter,
        # so that reconnecting does not refill it.
        self.log_limit = log_limit if log_limit is not None else LogLimiter()
        self.no_mmap = no_mmap
        self.conn = p.ServerConnection(capabilities)
        self.dma = DmaTable(capabilities.max_dma_maps)
        self.resumed = handed is not None
        # Freezing for a live upgrade: ``_freezing`` makes the loop hold still at the next
        # message boundary until ``_thawed``; ``at_rest`` is true while it does so, or while
        # it waits for a message with none of one read.
        self._freezing = False
        self._frozen = False
        self._parked = False
        self._thawed = trio.Event()
        self._rest_changed = trio.Event()
        self._on_rest = on_rest
        info = device.device_info()
        self.num_regions = info.num_regions
        self.num_irqs = info.num_irqs
        # Region sizes never change while a device exists; cache them for bounds checks.
        self._region_sizes = [device.region_info(i).size for i in range(info.num_regions)]
        self._irq_counts = [device.irq_info(i).count for i in range(info.num_irqs)]
        self.messages = 0
        # The C loop for config reads, made once the session runs (it waits in trio's loop).
        self.fast_config_reads = fast_config_reads and fast_reads.MISSING is None
        self.fast: fast_reads.FastReads | None = None
        # Whether the C loop is worth a try at the next boundary: the last message was a
        # config read (or none came yet). A guest's BAR0 accesses come in runs too, and the
        # C loop's look at each of them cost them more than it saved (session 26: 49-59 µs
        # against 30-46 same-CPU): so after one it has declined, it waits for the next
        # config read the Python path serves.
        self._try_fast = True
        self.internal_errors = 0  # requests that met a bug in vgpud (answered with EIO)
        self.watchers = FdWatchers(None, device, log)
        self._negotiation = trio.CancelScope()  # run()'s deadline for VERSION, lifted by it
        # Keyed by message type: one dict lookup per request, and typed handlers.
        self._handlers: dict[type, Callable[[p.Request, Any], p.Outgoing | None]] = {
            p.RegionReadRequest: self._region_read,
            p.RegionWriteRequest: self._region_write,
            p.RegionWriteMulti: self._region_write_multi,
            p.Version: self._version,
            p.DmaMap: self._dma_map,
            p.DmaUnmap: self._dma_unmap,
            p.DeviceInfo: self._get_info,
            p.RegionInfoRequest: self._get_region_info,
            p.RegionIoFdsRequest: self._get_region_io_fds,
            p.IrqInfo: self._get_irq_info,
            p.SetIrqs: self._set_irqs,
            p.DeviceReset: self._reset,
            p.DeviceFeature: self._device_feature,
            p.MigDataRead: self._no_migration,
            p.MigDataWrite: self._no_migration,
        }
        if handed is not None:
            self._take_over(handed)

    async def run(self) -> str:
        """Serve until the client leaves; return why the session ended."""
        if not self.resumed:  # a resumed client attached long ago, in the last process
            self.device.open()
        try:
            self.fast = self._fast_reads()
            async with trio.open_nursery() as nursery:
                self.watchers = FdWatchers(nursery, self.device, self.log)
                # A resumed session's device already holds the client's eventfds (the INTx
                # resampler among them): watch them from the start, not from the next
                # SET_IRQS or reset.
                self.watchers.start()
                deadline = NEGOTIATION_TIMEOUT if self.conn.negotiated is None else math.inf
                with trio.move_on_after(deadline) as self._negotiation:
                    reason = await self._serve()
                if self._negotiation.cancelled_caught:
                    self.log_limit.log(
                        self.log,
                        "warning",
                        "client did not negotiate in time, closing",
                        timeout_seconds=NEGOTIATION_TIMEOUT,
                    )
                    reason = "negotiation-timeout"
                self.watchers.stop()
            return reason
        finally:
            # Spec vfio-user.md R19: drop the client's DMA mappings and eventfds, keep the
            # device's state and memory for the next client.
            for mapping in self.dma.unmap_all():
                self._notify_unmap(mapping.iova, mapping.size)
            self.device.close()
            if self.fast is not None:
                self.fast.close()

    async def _serve(self) -> str:
        conn, stream = self.conn, self.stream
        woke = False  # from a park: what woke it is read before any holding still
        try:
            while True:
                if self._freezing and conn.at_message_boundary and not woke:
                    await self._hold_still()
                    continue
                try:
                    if conn.at_message_boundary:
                        # A frozen session serves one message at a time: not the C loop.
                        fast = self.fast if self._try_fast and not self._freezing else None
                        if fast is not None and (limits := conn.fast_read_limits()):
                            served, outcome = fast.serve(*limits)
                            if served:
                                self.messages += served
                                conn.skip_fast_reads(served)
                            self._try_fast = outcome is not fast_reads.Outcome.NOT_OURS
                            if self._try_fast:
                                reason = await self._after_fast_reads(outcome)
                                if reason is None:
                                    woke = outcome is fast_reads.Outcome.WOULD_BLOCK
                                    continue  # to the C loop again, as a rule
                                return reason
                        woke = False
                        read = self._read_message()
                        event = await read if type(read) is CoroutineType else read
                        if event is None:
                            continue  # a split header (now buffered), or a posted write
                    else:
                        next_event = conn.next_event()
                        if next_event is p.NEED_DATA:
                            data, fds = await stream.receive(conn.bytes_wanted, conn.max_fds)
                            conn.receive_data(data, fds)
                            continue
                        event = next_event
                except p.RemoteProtocolError as exc:
                    close_fds(exc.fds)
                    self.log_limit.log(
                        self.log,
                        "warning",
                        "protocol violation, closing",
                        error=str(exc),
                        errno=exc.errno,
                    )
                    return "protocol-error"
                except TransportError as exc:
                    self.log_limit.log(
                        self.log, "warning", "transport error, closing", error=str(exc)
                    )
                    return "transport-error"
                if type(event) is bytes:
                    # A trapped access (protocol.trapped), already answered.
                    reply: bytes = event
                    reply_fds: Sequence[int] = ()
                else:
                    if type(event) is p.ConnectionClosed:
                        return "closed"
                    # Requests skip _handle's classification.
                    outgoing = (
                        self._dispatch(event) if type(event) is p.Request else self._handle(event)
                    )
                    if outgoing is None:
                        continue
                    reply, reply_fds = outgoing.data, outgoing.fds
                try:
                    sent = 0 if reply_fds else stream.send_nowait(reply)
                    if sent < len(reply):
                        await stream.send(reply[sent:], reply_fds)
                except TransportError as exc:
                    self.log.info("client went away while we replied", error=str(exc))
                    return "transport-error"
        finally:
            # fds of a message the socket failed in the middle of.
            close_fds(conn.release_fds())

    def _fast_reads(self) -> fast_reads.FastReads | None:
        """The C loop for this session, if the device lets it read config space."""
        if not self.fast_config_reads:
            return None
        view = fast_reads.view_of(self.device)
        if view is None or self.num_regions <= CONFIG_REGION_INDEX:
            return None
        if len(view.data) != self._region_sizes[CONFIG_REGION_INDEX]:
            self.log.warning("config view is not the config region's size; fast reads off")
            return None
        loop = fast_reads.LoopWait.current()
        if isinstance(loop, str):
            self.log.debug("fast reads will not wait in the loop", reason=loop)
        return fast_reads.FastReads(
            self.stream.socket.fileno(), view, None if isinstance(loop, str) else loop
        )

    async def _after_fast_reads(self, outcome: fast_reads.Outcome) -> str | None:
        """What the C loop left to the event loop; why the session ends, or None."""
        if outcome is fast_reads.Outcome.WOULD_BLOCK:
            await self._park()  # then the C loop takes what came, if it is a config read
            return None
        if outcome is fast_reads.Outcome.BUDGET:
            await trio.lowlevel.checkpoint()  # fairness, as the transport's budget does
            return None
        if outcome is fast_reads.Outcome.UNSENT:
            assert self.fast is not None
            try:
                await self.stream.send(self.fast.unsent())
            except TransportError as exc:
                self.log.info("client went away while we replied", error=str(exc))
                return "transport-error"
            return None
        self.log_limit.log(
            self.log, "warning", "protocol violation, closing", error="socket read mismatch"
        )
        return "protocol-error"

    def _read_message(self) -> _Read:
        """One whole message with exact reads: its header and fds, then exactly its body
        (spec vfio-user.md §1: fds come with a message's first byte); None when the header
        came split or the peer closed (those bytes went to the connection's buffered path).

        Not a coroutine: when both reads complete at once (the usual case for a trapped
        access) the event comes back without the cost of creating and running one; when a
        read would block, the coroutine that finishes the job comes back, to be awaited."""
        got = self.stream.receive_nowait(p.HEADER_SIZE, self.conn.max_fds)
        if got is None:
            return self._read_message_slowly()
        return self._on_header(*got)

    async def _park(self) -> None:
        """Wait until the socket has something (bytes or EOF), reading nothing: parked
        here, the session holds no part of a message."""
        self._parked = True
        if self._freezing:
            self._came_to_rest()
        try:
            await self.stream.wait_readable()
        finally:
            self._parked = False

    async def _read_message_slowly(self) -> p.Event | bytes | None:
        await self._park()  # wait first, read after
        header, fds = await self.stream.receive(p.HEADER_SIZE, self.conn.max_fds)
        read = self._on_header(header, fds)
        return await read if isinstance(read, Coroutine) else read

    def _on_header(self, header: bytes, fds: list[int]) -> _Read:
        """Take a header read; the event when the body is there at once, else as above. A
        trapped access whose body is there too is served on the spot: its reply comes back
        (or None, posted)."""
        conn = self.conn
        if len(header) != p.HEADER_SIZE:
            conn.receive_data(header, fds)
            return None
        size = -1 if fds else conn.trapped_access_body(header)
        got: tuple[bytes, list[int]] | None = None
        if size >= 0:
            got = self.stream.receive_nowait(size, conn.max_fds)
            if got is not None and not got[1]:
                access = conn.receive_trapped_access(header, got[0])
                if access is not None:
                    return self._serve_access(access)
        # The general path, with what the fast path read of the body (if it tried: a read
        # that would have blocked is not tried again).
        remaining = conn.receive_header(header, fds)
        if not remaining:
            return conn.receive_body(b"")
        if size < 0:
            got = self.stream.receive_nowait(remaining, conn.max_fds)
        if got is not None and len(got[0]) == remaining:
            return conn.receive_body(*got)
        return self._finish_body(remaining, got)

    def _serve_access(self, access: p.TrappedAccess) -> bytes | None:
        """Serve a trapped REGION_READ/REGION_WRITE as ``_region_read``/``_region_write`` do,
        with the errors ``_dispatch`` gives; the reply bytes, or None for a posted write."""
        self.messages += 1
        self._try_fast = access.is_read and access.region == CONFIG_REGION_INDEX
        try:
            written = None if access.is_read else access.data
            data = self._access(access.region, access.offset, access.count, written)
            # For a read, checks that the device returned exactly ``count`` bytes (spec R10).
            return self.conn.answer_access(access, data)
        except Exception as exc:
            command = "REGION_READ" if access.is_read else "REGION_WRITE"
            return self.conn.refuse_access(access, self._refusal(exc, command))

    async def _finish_body(
        self, remaining: int, first: tuple[bytes, list[int]] | None
    ) -> p.Event | bytes | None:
        """Read the rest of a body (``first``: what was read of it already, if anything)."""
        receive, max_fds = self.stream.receive, self.conn.max_fds
        body, stray = first if first is not None else await receive(remaining, max_fds)
        if len(body) == remaining or not body:
            return self.conn.receive_body(body, stray, eof=not body)
        # A body the peer's send split (large REGION_WRITEs): gather the rest -- unless fds
        # came with it, which is fatal now: reading on would let a client trickle a body
        # with fds on every byte and have the daemon hold them all (or, cut off by the
        # negotiation timeout, lose them), however many the whole daemon may have.
        parts, got = [body], len(body)
        while got < remaining and not stray:
            chunk, stray = await receive(remaining - got, max_fds)
            if not chunk:
                break
            parts.append(chunk)
            got += len(chunk)
        return self.conn.receive_body(b"".join(parts), stray, eof=got < remaining)

    # -- a live upgrade (vgpud/upgrade.py) ------------------------------------------------

    def freeze(self) -> None:
        """Come to rest at the next message boundary and stay there until :meth:`thaw`."""
        if not self._freezing:
            self._freezing = True
            self._thawed = trio.Event()
            if self._parked:
                self._came_to_rest()

    def thaw(self) -> None:
        """Carry on serving (the upgrade did not happen)."""
        self._freezing = False
        self._thawed.set()

    @property
    def at_rest(self) -> bool:
        """Between two messages, with nothing of the next one read and no reply owed: what
        :meth:`handover` needs."""
        return (self._frozen or self._parked) and self.conn.at_message_boundary

    async def wait_at_rest(self) -> None:
        """Until :attr:`at_rest` (after :meth:`freeze`)."""
        while not self.at_rest:
            changed = self._rest_changed
            await changed.wait()

    def handover(self) -> tuple[dict[str, Any], list[int]]:
        """The session as JSON-able data for the next process (``handed``), and the fds it
        names: the client's DMA fds. Only :attr:`at_rest` (LocalProtocolError otherwise).
        The client's socket and the device are the caller's to hand over."""
        connection = self.conn.handover()
        dma, fds = self.dma.handover()
        return {"connection": connection, "dma": dma, "messages": self.messages}, fds

    def _take_over(self, handed: Mapping[str, Any]) -> None:
        try:
            self.conn = p.ServerConnection.taken_over(handed["connection"])
            negotiated = self.conn.negotiated
            max_maps = self.conn.capabilities.max_dma_maps
            if negotiated is not None:
                max_maps = min(max_maps, negotiated.max_dma_maps)
            self.dma = DmaTable(max_maps)
            self.messages = int(handed["messages"])
            for entry in self.dma.adopt(handed["dma"]):
                self.device.dma_map(entry.region())
        except Exception as exc:
            # Whatever failed, a bug included: what was mapped again is let go here, as no
            # session will ever unmap it.
            for mapping in self.dma.unmap_all():
                self._notify_unmap(mapping.iova, mapping.size)
            if isinstance(exc, (KeyError, TypeError, ValueError, DmaError, DeviceError)):
                raise ValueError(f"session state unusable: {exc}") from exc
            raise

    async def _hold_still(self) -> None:
        self._frozen = True
        self._came_to_rest()
        try:
            await self._thawed.wait()
        finally:
            self._frozen = False

    def _came_to_rest(self) -> None:
        changed, self._rest_changed = self._rest_changed, trio.Event()
        changed.set()
        if self._on_rest is not None:
            self._on_rest()

    def _handle(self, event: object) -> p.Outgoing | None:
        """Turn one event into (at most) one reply."""
        if type(event) is p.Request:
            return self._dispatch(event)
        if isinstance(event, p.RejectedRequest):
            close_fds(event.fds)
            self.log.info(
                "rejected request",
                command=event.command,
                msg_id=event.msg_id,
                errno=event.errno,
                reason=event.reason,
            )
            return self.conn.send_error(event, event.errno)
        if not isinstance(event, p.Request):
            # We never send server->client requests, so the connection cannot produce
            # replies for us; anything else is a bug in the protocol layer.
            fds = getattr(event, "fds", ())
            close_fds(fds)
            raise AssertionError(f"unexpected event {event!r}")
        return self._dispatch(event)

    def _dispatch(self, event: p.Request) -> p.Outgoing | None:
        self.messages += 1
        handler = self._handlers.get(type(event.message))
        try:
            if handler is None:
                raise DeviceError(errno.ENOSYS, f"command {event.command} not supported")
            return handler(event, event.message)
        except Exception as exc:
            return self.conn.send_error(event, self._refusal(exc, event.command.name))

    def _refusal(self, exc: Exception, command: str) -> int:
        """The errno to answer a request that raised ``exc`` with (called while handling it).

        A device or DMA refusal is the client's business (logged at debug); anything else is
        a bug in vgpud, which must cost this request, not the daemon (DESIGN.md "Errors")."""
        if isinstance(exc, DeviceError | DmaError):
            # The errno is what the VMM reports ("Invalid argument"): logged so the two can
            # be matched (docs/operations.md, Logs).
            self.log.debug("request refused", command=command, errno=exc.errno, error=str(exc))
            return exc.errno
        self.internal_errors += 1
        self.log.exception("internal error handling request", command=command)
        return errno.EIO

    # -- negotiation --------------------------------------------------------------------

    def _version(self, request: p.Request, msg: p.Version) -> p.Outgoing | None:
        outgoing = self.conn.version_reply(request)
        negotiated = self.conn.negotiated
        if negotiated is not None:
            self.dma.max_maps = min(self.dma.max_maps, negotiated.max_dma_maps)
            self._negotiation.deadline = math.inf
        self.log_limit.log(
            self.log, "info", "negotiated", client_capabilities=_caps_summary(negotiated)
        )
        return outgoing

    # -- DMA ------------------------------------------------------------------------------

    def _dma_map(self, request: p.Request, msg: p.DmaMap) -> p.Outgoing | None:
        fds = request.fds
        fd = fds[0] if fds else None
        if msg.flags & ~(_DMA_READ | _DMA_WRITE):
            close_fds(fds)
            raise DmaError(errno.EINVAL, f"DMA_MAP flags {msg.flags:#x} not supported")
        entry = self.dma.map(
            msg.address,
            msg.size,
            readable=bool(msg.flags & _DMA_READ),
            writable=bool(msg.flags & _DMA_WRITE),
            fd=fd,
            file_offset=msg.offset if fd is not None else 0,
        )
        if entry is not None:
            try:
                self.device.dma_map(entry.region())
            except DeviceError:
                self.dma.unmap(entry.iova, entry.size)
                raise
        return self.conn.send_reply(request)

    def _dma_unmap(self, request: p.Request, msg: p.DmaUnmap) -> p.Outgoing | None:
        if msg.flags & _UNMAP_DIRTY_BITMAP:
            raise DmaError(errno.ENOTSUP, "dirty page tracking is not supported")
        if msg.flags & _UNMAP_ALL:
            for entry in self.dma.unmap_all():
                self._notify_unmap(entry.iova, entry.size)
        else:
            for entry in self.dma.unmap(msg.address, msg.size):
                self._notify_unmap(entry.iova, entry.size)
        # Spec vfio-user.md §3.3: the reply echoes the request struct (40 bytes <= QEMU's cap).
        return self.conn.send_reply(request, msg)

    def _notify_unmap(self, iova: int, size: int) -> None:
        try:
            self.device.dma_unmap(iova, size)
        except DeviceError as exc:
            self.log_limit.log(
                self.log,
                "warning",
                "device refused a DMA unmap",
                iova=iova,
                size=size,
                error=str(exc),
            )

    # -- device and region info ------------------------------------------------------------

    def _get_info(self, request: p.Request, msg: p.DeviceInfo) -> p.Outgoing | None:
        info = self.device.device_info()
        reply = p.DeviceInfo(
            argsz=16, flags=int(info.flags), num_regions=info.num_regions, num_irqs=info.num_irqs
        )
        return self.conn.send_reply(request, reply)

    def _get_region_info(self, request: p.Request, msg: p.RegionInfoRequest) -> p.Outgoing | None:
        self._check_region(msg.index)
        info = self.device.region_info(msg.index)
        flags = info.flags
        caps: list[Any] = []
        mmap_fd: int | None = None
        # MMAP promises the fd with the reply (docs/interop/vfio-user.rst, GET_REGION_INFO;
        # spec vfio-user.md §3.5), so a client that takes no fds (max_msg_fds 0) gets the
        # region trapped, as with --no-mmap: no MMAP, no sparse or MSI-X-mappable cap. (QEMU
        # offers 16. libvfio-user sends the fd regardless: it reads max_msg_fds but never
        # checks it when replying, docs/libvfio-user-engine.md.)
        negotiated = self.conn.negotiated
        takes_fds = negotiated is not None and negotiated.max_msg_fds > 0
        if info.mmap is not None and not self.no_mmap and takes_fds:
            mmap_fd = info.mmap.fd
            if info.sparse_areas:
                caps.append(p.SparseMmapCap(tuple((a.offset, a.size) for a in info.sparse_areas)))
            if info.msix_mappable:
                caps.append(p.MsixMappableCap())
        else:
            flags &= ~RegionFlags.MMAP
        if info.type_cap is not None:
            caps.append(p.TypeCap(*info.type_cap))
        offset = info.mmap.offset if mmap_fd is not None and info.mmap is not None else 0
        reply = p.build_region_info_reply(
            msg.argsz, msg.index, int(flags & ~RegionFlags.CAPS), info.size, offset, tuple(caps)
        )
        # Spec vfio-user.md §3.5/R7: the fd goes with the reply that carries the whole info
        # (a truncated reply only tells QEMU which argsz to retry with).
        # `is not None`: a daemon started with stdin closed can hold a memory file on fd 0.
        send_fd = mmap_fd is not None and reply.argsz <= msg.argsz
        fds = (mmap_fd,) if send_fd and mmap_fd is not None else ()
        return self.conn.send_reply(request, reply, fds)

    def _get_region_io_fds(
        self, request: p.Request, msg: p.RegionIoFdsRequest
    ) -> p.Outgoing | None:
        self._check_region(msg.index)
        io_fds = getattr(self.device, "region_io_fds", None)
        if io_fds is not None:
            io_fds(msg.index)
        # Spec nvgrace-gpu.md §5.4: the variant refuses ioeventfds for every region.
        raise DeviceError(errno.ENOTTY, "ioeventfds are not supported")

    def _get_irq_info(self, request: p.Request, msg: p.IrqInfo) -> p.Outgoing | None:
        index = msg.index
        if index >= self.num_irqs:
            raise DeviceError(errno.EINVAL, f"irq index {index} >= {self.num_irqs}")
        info = self.device.irq_info(index)
        reply = p.IrqInfo(argsz=16, flags=int(info.flags), index=index, count=info.count)
        return self.conn.send_reply(request, reply)

    def _set_irqs(self, request: p.Request, msg: p.SetIrqs) -> p.Outgoing | None:
        fds: Sequence[int] = request.fds
        try:
            if msg.index >= self.num_irqs:
                raise DeviceError(errno.EINVAL, f"irq index {msg.index} >= {self.num_irqs}")
            action = _ACTIONS.get(msg.flags & _ACTION_MASK)
            data_type = msg.flags & _DATA_MASK
            if action is None or data_type not in (_DATA_NONE, _DATA_BOOL, _DATA_EVENTFD):
                raise DeviceError(errno.EINVAL, f"SET_IRQS flags {msg.flags:#x} invalid")
            if msg.count > self._irq_counts[msg.index]:
                # Before anything is sized by it: a de-assign builds one entry per vector,
                # and a count near 2^32 took the daemon's memory (an adversarial run).
                raise DeviceError(
                    errno.EINVAL,
                    f"SET_IRQS count {msg.count} > irq {msg.index}'s "
                    f"{self._irq_counts[msg.index]} vectors",
                )
        except DeviceError:
            close_fds(fds)
            raise
        # The device may close (and replace) eventfds it asked us to watch.
        self.watchers.stop()
        try:
            if data_type == _DATA_EVENTFD:
                # Zero fds de-assigns the vectors (spec vfio-user.md §3.8); ownership of the
                # fds passes to the device, which closes them on every path.
                eventfds = list(fds) if fds else [-1] * msg.count
                self.device.set_irqs(msg.index, action, msg.start, msg.count, eventfds=eventfds)
            elif data_type == _DATA_BOOL:
                flags_bool = [bool(b) for b in msg.data[: msg.count]]
                self.device.set_irqs(msg.index, action, msg.start, msg.count, data_bool=flags_bool)
            else:
                self.device.set_irqs(msg.index, action, msg.start, msg.count)
        finally:
            self.watchers.start()
        return self.conn.send_reply(request)

    # -- region access ---------------------------------------------------------------------

    def _check_region(self, index: int) -> None:
        if index >= self.num_regions:
            raise DeviceError(errno.EINVAL, f"region {index} >= {self.num_regions}")

    def _check_access(self, index: int, offset: int, count: int) -> None:
        if index >= self.num_regions:
            raise DeviceError(errno.EINVAL, f"region {index} >= {self.num_regions}")
        size = self._region_sizes[index]
        if offset >= size or count > size - offset:
            raise DeviceError(
                errno.EINVAL, f"access [{offset:#x}, +{count:#x}) outside region {index}"
            )

    def _region_read(self, request: p.Request, msg: p.RegionReadRequest) -> p.Outgoing | None:
        self._try_fast = msg.region == CONFIG_REGION_INDEX
        data = self._access(msg.region, msg.offset, msg.count, None)
        # Checks that the device returned exactly ``count`` bytes (spec R10).
        return self.conn.send_access_reply(request, data)

    def _region_write(self, request: p.Request, msg: p.RegionWriteRequest) -> p.Outgoing | None:
        self._access(msg.region, msg.offset, msg.count, msg.data)
        return self.conn.send_access_reply(request)

    def _access(self, region: int, offset: int, count: int, written: bytes | None) -> bytes:
        """The device side of a REGION_READ (``written`` None: returns what was read) or a
        REGION_WRITE (returns nothing), for the general and the fast path alike."""
        self._check_access(region, offset, count)  # an empty access too (adversarial run)
        if not count:
            return b""
        if written is None:
            return self.device.region_read(region, offset, count)
        self.device.region_write(region, offset, written)
        return b""

    def _region_write_multi(self, request: p.Request, msg: p.RegionWriteMulti) -> p.Outgoing | None:
        # Spec vfio-user.md §3.11: entries apply in order, each like a posted write. So one
        # the device refuses costs that write only, as it would have had QEMU not coalesced
        # them; the first refusal is then the message's (a reply, if one is asked for).
        refused: DeviceError | None = None
        for entry in msg.entries:
            try:
                self._check_access(entry.region, entry.offset, entry.count)
                if entry.count:
                    self.device.region_write(entry.region, entry.offset, entry.data[: entry.count])
            except DeviceError as exc:
                refused = refused or exc
        if refused is not None:
            raise refused
        return self.conn.send_reply(request, p.RegionWriteMultiReply(len(msg.entries)))

    # -- reset and the rest ------------------------------------------------------------------

    def _reset(self, request: p.Request, msg: p.DeviceReset) -> p.Outgoing | None:
        self.watchers.stop()
        try:
            self.device.reset()
        finally:
            self.watchers.start()
        # A VMM can send these back to back (vgpud/log_limit.py).
        self.log_limit.log(self.log, "info", "device reset")
        return self.conn.send_reply(request)

    def _device_feature(self, request: p.Request, msg: p.DeviceFeature) -> p.Outgoing | None:
        # No migration, no DMA logging, no dma-buf: ENOTTY, the kernel's answer for an
        # unsupported feature (spec vfio-user.md §3.13, R18).
        raise DeviceError(errno.ENOTTY, "device features are not supported")

    def _no_migration(self, request: p.Request, msg: object) -> p.Outgoing | None:
        raise DeviceError(errno.ENOTSUP, "migration is not supported")


def _caps_summary(caps: p.Capabilities | None) -> dict[str, Any]:
    if caps is None:
        return {}
    return {
        "max_msg_fds": caps.max_msg_fds,
        "max_data_xfer_size": caps.max_data_xfer_size,
        "max_dma_maps": caps.max_dma_maps,
        "pgsizes": caps.pgsizes,
    }
