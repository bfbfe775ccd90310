"""Listening sockets, one per device, and the accept loop that allows one client at a time.

The design's rule (DESIGN.md "Engines"): one client per device; a second connection is
refused with a logged reason and the first is unaffected; when a client leaves its DMA
mappings and eventfds go, the device stays, and the next client can attach.

"Leaves" is when the client closes its end, not when its session has read the EOF: a client
that connects in between (a VMM restarted at once) waits for that session to end instead of
being refused.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import select
import socket
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import structlog
import trio

import protocol as p
from backends.device import VfioDevice
from vgpud.log_limit import LogLimiter
from vgpud.mappers import SharedMemoryCheck
from vgpud.memory_files import MemoryFiles
from vgpud.server.refusal import Refusals
from vgpud.server.session import Session
from vgpud.server.transport import FdStream

# accept() errors that mean "out of resources right now", not "this listener is broken"
# (trio's serve_listeners treats the same set as transient).
TRANSIENT_ACCEPT_ERRORS = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}
ACCEPT_BACKOFF_SECONDS = 0.1
# How long a client may wait for the session of a client that has closed its end to finish
# (it ends at its next read; only one blocked sending replies to a half-closed client that
# no longer reads them takes longer).
HANDOVER_TIMEOUT = 5.0

# What the server offers in its VERSION reply (spec vfio-user.md §3.1, R8): max_msg_fds is
# explicit because QEMU assumes 8 when absent; 16 is QEMU's own limit. pgsizes is the host's
# page size, the granule the DMA table maps (server/dma.py): 4 KiB on x86, 64 KiB on an arm64
# Grace host with a 64K-page kernel, where a 4 KiB promise would be one the table refuses.
SERVER_CAPABILITIES = p.Capabilities(
    max_msg_fds=16, max_data_xfer_size=1 << 20, pgsizes=mmap.PAGESIZE, max_dma_maps=65535
)


def peer_closed(fd: int) -> bool:
    """Whether the peer of the connected socket ``fd`` has closed its end (POLLRDHUP, or
    HUP/ERR/NVAL, which poll always reports), even if requests are still queued before the
    EOF: a client that has left, though its session has yet to read that far."""
    poller = select.poll()
    poller.register(fd, select.POLLRDHUP)
    return bool(poller.poll(0))


def peer_closed_or_gone(sock: socket.socket | None) -> bool:
    """:func:`peer_closed` for a socket we may have closed already (then: gone)."""
    if sock is None:
        return False
    fd = sock.fileno()
    return fd < 0 or peer_closed(fd)


def peer_credentials(sock: socket.socket) -> dict[str, int]:
    """pid/uid/gid of the connected peer (SO_PEERCRED), for the log."""
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return {}
    pid, uid, gid = struct.unpack("3i", raw)
    return {"peer_pid": pid, "peer_uid": uid, "peer_gid": gid}


@dataclass(slots=True)
class _Waiter:
    """A client accepted while the departed active client's session is still ending."""

    number: int
    sock: socket.socket
    scope: trio.CancelScope  # cancelled when the waiter itself leaves before its turn


class DeviceServer:
    """Serves one device on one listening socket."""

    def __init__(
        self,
        name: str,
        device: VfioDevice,
        listener: socket.socket | None,
        *,
        no_mmap: bool = False,
        fast_config_reads: bool = True,
        capabilities: p.Capabilities = SERVER_CAPABILITIES,
        memory_files: MemoryFiles | None = None,
        handed: Mapping[str, Any] | None = None,
    ) -> None:
        """``handed``: carry on from what :meth:`handover` described in the previous
        process (a live upgrade): the connection count, retiring, and the attached client,
        whose session :meth:`serve` resumes first."""
        self.name = name
        self.device = device
        self.listener = trio.socket.from_stdlib_socket(listener) if listener else None
        self.no_mmap = no_mmap
        self.fast_config_reads = fast_config_reads  # Session's
        self.capabilities = capabilities
        self.log: Any = structlog.get_logger("vgpud").bind(device=name)
        self.connections = 0
        # Bugs met while serving: requests answered EIO by an unexpected exception, and
        # sessions that failed outright. Both are logged; these counts are for tests.
        self.internal_errors = 0
        self.active: int | None = None
        self.current_session: Session | None = None
        # The active client's socket from the moment it is accepted, before its session
        # has started: whether that client has already left is read from it.
        self._active_sock: socket.socket | None = None
        self._waiter: _Waiter | None = None  # a client waiting for a departed one's session
        self._session_finished = trio.Condition()
        # Lines a client can cause per request or per connection (vgpud/log_limit.py), for
        # every session of this device.
        self.log_limit = LogLimiter()
        self._refusals = Refusals(self.log, self.log_limit)
        # Before any client: the device may open its memory files to answer, and those stay
        # open with the device (a client must not seem to leave fds behind). The daemon
        # passes the ones it took at start-up.
        self.memory_files = memory_files or MemoryFiles(device)
        self._shared_memory = SharedMemoryCheck(self.memory_files)
        self._nursery: trio.Nursery | None = None
        # Set by retire(): every new client is refused, and serve() returns once the
        # attached one (and one already waiting for its turn) has been served.
        self.retiring = False
        self._accepting = trio.CancelScope()
        self._accept_waiting = trio.CancelScope()  # the accept under way, for freeze()
        # A live upgrade (vgpud/upgrade.py): see freeze().
        self._freezing = False
        self._thawed = trio.Event()
        self._changed = trio.Event()  # a session started or ended
        self._handed_client: Mapping[str, Any] | None = None
        if handed is not None:
            self.connections = int(handed["connections"])
            self.retiring = bool(handed["retiring"])
            self._handed_client = handed["client"]

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Accept clients, one at a time, until :meth:`retire` (or cancelled)."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            if self._handed_client is not None:
                self._resume_client(self._handed_client)
            if self.retiring:
                nursery.start_soon(self._stop_accepting_once_idle)
            task_status.started()
            with self._accepting:
                await self._accept_clients(nursery)
        # Retired: the sessions and refusals the nursery held have ended.

    async def retire(self, *, only_if_idle: bool = False) -> bool:
        """Take no new client (a reload removed or changed the device): those that connect
        are refused as while a client is attached; :meth:`serve` returns once the attached
        client, if any, has left. With ``only_if_idle``, only when no client is attached or
        waiting; whether it retired. (Async for the libvfio-user engine's sake, whose
        device lives in another thread; here nothing is awaited between check and act.)"""
        assert self._nursery is not None, "retire() a device that serves"
        if only_if_idle and not self.idle:
            return False
        if not self.retiring:
            self.retiring = True
            self._nursery.start_soon(self._stop_accepting_once_idle)
        return True

    @property
    def idle(self) -> bool:
        """No client attached or waiting for its turn."""
        return self.active is None and self._waiter is None

    async def _stop_accepting_once_idle(self) -> None:
        await self.wait_idle()
        self._accepting.cancel()

    async def _accept_clients(self, nursery: trio.Nursery) -> None:
        while True:
            if self._freezing:
                # A client connecting now waits in the backlog for the next process.
                await self._thawed.wait()
                continue
            # freeze() cancels an accept already waiting: a client that connects after the
            # freeze stays in the backlog rather than start a session as the device rests.
            with trio.CancelScope() as self._accept_waiting:
                accepted = await self._accept()
            if self._accept_waiting.cancelled_caught:
                continue  # trio's accept takes nothing from the backlog when cancelled
            sock = socket.socket(fileno=accepted.detach())
            self.connections += 1
            number = self.connections
            creds = peer_credentials(sock)
            if self.retiring:
                self._refuse(sock, number, creds, retiring=True)
                continue
            if self._waiter is not None and peer_closed_or_gone(self._waiter.sock):
                self._drop_waiter()  # it left while waiting: this client takes its turn
            if self.active is None and self._waiter is None:
                self._start_session(sock, number, creds)
            elif self._waiter is None and peer_closed_or_gone(self._active_sock):
                # A VMM reconnecting (say, restarted) before its old session has read
                # the EOF, or even begun: that session ends at its next read, then this
                # client is served.
                self.log.info(
                    "client waits for the departed client's session to end",
                    connection=number,
                    active_connection=self.active,
                )
                self._waiter = _Waiter(number, sock, trio.CancelScope())
                nursery.start_soon(self._run_when_free, self._waiter, creds)
            else:
                self._refuse(sock, number, creds)

    def _start_session(self, sock: socket.socket, number: int, creds: dict[str, int]) -> None:
        assert self._nursery is not None, "only serve() starts sessions"
        self.active, self._active_sock = number, sock
        self._nursery.start_soon(self._run_session, sock, number, creds)

    def _resume_client(self, client: Mapping[str, Any]) -> None:
        """Serve again the client a previous process handed over (a live upgrade)."""
        sock = socket.socket(fileno=int(client["fd"]))
        number = int(client["number"])
        assert self._nursery is not None, "only serve() resumes sessions"
        self.active, self._active_sock = number, sock
        self._nursery.start_soon(
            self._run_session, sock, number, peer_credentials(sock), client["session"]
        )

    # -- a live upgrade (vgpud/upgrade.py) --------------------------------------------------

    def freeze(self) -> None:
        """Accept no client and bring the attached one's session to rest (see
        :meth:`Session.freeze`) until :meth:`thaw`; :meth:`wait_at_rest` waits for it."""
        if self._freezing:
            return
        self._freezing = True
        self._thawed = trio.Event()
        self._accept_waiting.cancel()
        if self.current_session is not None:
            self.current_session.freeze()

    def thaw(self) -> None:
        """Serve on (the upgrade did not happen)."""
        self._freezing = False
        self._thawed.set()
        if self.current_session is not None:
            self.current_session.thaw()

    @property
    def at_rest(self) -> bool:
        """Nothing half done: no client waiting for its turn, and the attached client's
        session (if any) started and between two messages."""
        if self._waiter is not None:
            return False
        if self.active is None:
            return True
        session = self.current_session
        return session is not None and session.at_rest

    async def wait_at_rest(self) -> None:
        """Until :attr:`at_rest` (after :meth:`freeze`)."""
        while not self.at_rest:
            changed = self._changed  # set when a session starts, ends or comes to rest
            await changed.wait()

    def cut_unrested(self) -> list[int]:
        """Shut the connection of each client that keeps the device from rest (half-way
        through a message, or waiting for its turn): its session then ends as at any
        disconnect, and releases what the client had. Only for an upgrade that can no
        longer be refused (vgpud/upgrade.py, the stand-in). The connections cut."""
        cut: list[int] = []
        session, sock = self.current_session, self._active_sock
        resting = session is not None and session.at_rest
        if self.active is not None and sock is not None and not resting:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            cut.append(self.active)
        if self._waiter is not None:
            cut.append(self._waiter.number)
            with contextlib.suppress(OSError):
                self._waiter.sock.shutdown(socket.SHUT_RDWR)
        return cut

    def handover(self) -> tuple[dict[str, Any], list[int]]:
        """What the next process needs to go on serving this device (``handed``), as
        JSON-able data, and the fds it names: the client's socket and DMA fds. Only
        :attr:`at_rest`. The listening socket and the device are the caller's."""
        state: dict[str, Any] = {
            "connections": self.connections,
            "retiring": self.retiring,
            "client": None,
        }
        fds: list[int] = []
        session, sock = self.current_session, self._active_sock
        if session is not None and sock is not None:
            handed, fds = session.handover()
            state["client"] = {"number": self.active, "fd": sock.fileno(), "session": handed}
            fds.append(sock.fileno())
        return state, fds

    def _note_change(self) -> None:
        changed, self._changed = self._changed, trio.Event()
        changed.set()

    def _drop_waiter(self) -> None:
        waiter = self._waiter
        assert waiter is not None
        self.log.info("waiting client left before its turn", connection=waiter.number)
        self._waiter = None
        waiter.scope.cancel()  # its task sees it is no longer the waiter and closes it

    def _refuse(
        self, sock: socket.socket, number: int, creds: dict[str, int], *, retiring: bool = False
    ) -> None:
        assert self._nursery is not None, "only serve() refuses clients"
        self._refusals.start(
            self._nursery,
            sock,
            connection=number,
            active_connection=self.active,
            creds=creds,
            retiring=retiring,
        )

    async def _run_when_free(self, waiter: _Waiter, creds: dict[str, int]) -> None:
        try:
            with waiter.scope:
                waiter.scope.deadline = trio.current_time() + HANDOVER_TIMEOUT
                async with self._session_finished:
                    while self.active is not None:
                        await self._session_finished.wait()
            if self._waiter is not waiter:  # dropped by serve() (it left while waiting)
                waiter.sock.close()
                return
            self._waiter = None
            if self.active is not None:
                self._refuse(waiter.sock, waiter.number, creds)  # the old session is stuck
                async with self._session_finished:
                    self._session_finished.notify_all()  # for wait_idle: no client waits now
                return
        except BaseException:
            if self._waiter is waiter:
                self._waiter = None
            waiter.sock.close()
            raise
        self.active, self._active_sock = waiter.number, waiter.sock
        await self._run_session(waiter.sock, waiter.number, creds)

    async def serve_connected(self, sock: socket.socket) -> None:
        """Serve a single already-connected client (``--fd`` with a connected socket), or
        the one handed over with it (a live upgrade)."""
        client = self._handed_client
        if client is None:
            self.connections += 1
            number, handed = self.connections, None
        else:
            number, handed = int(client["number"]), client["session"]
        self.active, self._active_sock = number, sock
        await self._run_session(sock, number, peer_credentials(sock), handed)

    async def _accept(self) -> trio.socket.SocketType:
        assert self.listener is not None, "serve() needs a listening socket"
        while True:
            try:
                sock, _ = await self.listener.accept()
            except OSError as exc:
                if exc.errno in TRANSIENT_ACCEPT_ERRORS:
                    self.log.error("accept failed, backing off", error=exc.strerror)
                    await trio.sleep(ACCEPT_BACKOFF_SECONDS)
                    continue
                raise
            return sock

    async def _run_session(
        self,
        sock: socket.socket,
        number: int,
        creds: dict[str, int],
        handed: Mapping[str, Any] | None = None,
    ) -> None:
        # Lines logged below the session (the device model, its memory files) carry the
        # device and connection too; trio gives each task its own copy of the context.
        with structlog.contextvars.bound_contextvars(device=self.name, connection=number):
            await self._run_session_in_context(sock, number, creds, handed)

    async def _run_session_in_context(
        self,
        sock: socket.socket,
        number: int,
        creds: dict[str, int],
        handed: Mapping[str, Any] | None,
    ) -> None:
        stream = FdStream(sock)
        log = self.log.bind(connection=number)
        if handed is None:
            self.log_limit.log(log, "info", "client connected", **creds)
        reason = "error"
        session: Session | None = None
        try:
            if handed is None:
                # Before the session: the client waits for the search once (bounded), and a
                # session that ends finds no search of its own still reading /proc. Inside
                # the try, so that a stop meanwhile still closes the connection below.
                await self._shared_memory.at_attach(log, self.log_limit, creds)
            try:
                session = Session(
                    stream,
                    self.device,
                    self.capabilities,
                    log,
                    no_mmap=self.no_mmap,
                    fast_config_reads=self.fast_config_reads,
                    log_limit=self.log_limit,
                    handed=handed,
                    on_rest=self._note_change,
                )
            except Exception as exc:
                if handed is None:
                    raise
                # Only a resumed session's state can be refused: its client is closed (QEMU
                # then reports the device gone), the device serves the next one. So too when
                # resuming it met a bug, or the device would keep the client's eventfds.
                if isinstance(exc, ValueError):
                    log.error("client could not be taken over; closing it", error=str(exc))
                else:
                    self.internal_errors += 1
                    log.exception("taking the client over failed; closing it")
                self.device.close()  # the client's eventfds, which the device took over
                return
            if handed is not None:
                log.info("client resumed", messages=session.messages, **creds)
            self.current_session = session
            if self._freezing:
                session.freeze()
            self._note_change()
            reason = await session.run()
            self.log_limit.log(
                log, "info", "client disconnected", reason=reason, messages=session.messages
            )
        except Exception:
            self.internal_errors += 1
            log.exception("session failed; device kept, waiting for the next client")
        finally:
            if session is not None:
                self.internal_errors += session.internal_errors
            stream.close()
            if self.active == number:
                self.active = None
                self._active_sock = None
                self.current_session = None
            self._note_change()
            async with self._session_finished:
                self._session_finished.notify_all()

    def status(self) -> dict[str, Any]:
        """For the daemon's "status" line: the client's connection number (None: no client),
        connections so far, the messages and DMA mappings of the current session, and how
        much of the device memory its filesystem holds."""
        session = self.current_session
        return {
            "engine": "python",
            "client": self.active,
            "connections": self.connections,
            "messages": session.messages if session is not None else 0,
            "dma_maps": len(session.dma) if session is not None else 0,
            "memory_allocated": self.memory_files.allocated(),
        }

    async def wait_idle(self) -> None:
        """Wait until no client is attached or waiting to be (used by tests)."""
        async with self._session_finished:
            while not self.idle:
                await self._session_finished.wait()
