"""The sans-IO engine of both roles (``ServerConnection``, ``ClientConnection``: protocol.roles).

Bytes + fds in (``receive_data``, or ``receive_header`` + ``receive_body`` for exact reads),
events out (``next_event``); messages in (``send_*``), ``Outgoing`` bytes + fds out. No I/O and
no fd closed here: every fd fed in comes out in exactly one event or exception, and the caller
closes it. The rules (state machine, directions, pending requests, what is fatal) are tabulated
in :mod:`protocol.state`; per-command payload and fd rules are in :mod:`protocol.commands`.
"""

from __future__ import annotations

import errno
from collections import deque
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import ClassVar

from protocol.capabilities import Capabilities
from protocol.commands import (
    TOO_BIG,
    data_size,
    decode_reply,
    decode_request,
    reply_fd_error,
    request_fd_error,
)
from protocol.dma import DmaLayout
from protocol.errors import LocalProtocolError, RemoteProtocolError
from protocol.events import (
    NEED_DATA,
    ConnectionClosed,
    ErrorReply,
    Event,
    NeedDataType,
    Outgoing,
    RejectedRequest,
    Reply,
    ReplyMessage,
    Request,
    RequestMessage,
    new_outgoing,
    new_request,
)
from protocol.framing import Frame, FrameReader
from protocol.header import (
    FLAG_ERROR,
    FLAG_NO_REPLY,
    FLAG_TYPE_COMMAND,
    FLAG_TYPE_MASK,
    FLAG_TYPE_REPLY,
    HEADER_SIZE,
    HEADER_STRUCT,
    Command,
)
from protocol.region_access import pack_access_reply, trapped_access_reply_ok
from protocol.state import ACCEPTED, SENDABLE, Role, State, Trigger, refusal, transition
from protocol.version import PROTOCOL_MAJOR, PROTOCOL_MINOR, Version, negotiate_reply, reply_problem

#: Room for fixed structs and JSON on top of ``max_data_xfer_size`` when bounding a
#: received message's ``size`` (spec §1 "Sizes": data messages are bounded by the receiver's
#: max_data_xfer_size; headers and argument structs come on top).
MESSAGE_OVERHEAD = 4096

# Enum members cost a metaclass lookup (~60 ns each); the per-message paths use these.
_BROKEN, _CLOSED, _VERSION = State.BROKEN, State.CLOSED, Command.VERSION


@contextmanager
def _our_bug(what: str) -> Iterator[None]:
    # What we send is checked with the rules we apply to the peer: failing them is our bug.
    try:
        yield
    except RemoteProtocolError as exc:
        raise LocalProtocolError(f"{what}: {exc.message}", errno=exc.errno) from None


class _Connection:
    """The engine shared by both roles."""

    _role: ClassVar[Role]

    def __init__(self, capabilities: Capabilities, *, dma_layout: DmaLayout) -> None:
        self.capabilities = capabilities
        #: The peer's capabilities once VERSION is done (None before).
        self.negotiated: Capabilities | None = None
        self.dma_layout = dma_layout
        self._state = State.AWAITING_VERSION
        self._accepted = ACCEPTED[self._role, self._state]
        self._reader = FrameReader(capabilities.max_data_xfer_size + MESSAGE_OVERHEAD)
        self._truncated = False
        self._broken_reason = ""
        # Requests we received and still owe a reply, by (msg_id, command): count >= 1.
        self._incoming: dict[tuple[int, int], int] = {}
        # Requests we sent and await a reply to, FIFO per (msg_id, command).
        self._outgoing: dict[tuple[int, int], deque[RequestMessage]] = {}
        self._next_msg_id = 0
        self._version_request_size = 0

    # -- receiving -----------------------------------------------------------------------

    @property
    def state(self) -> State:
        """Negotiation state (see :mod:`protocol.state`)."""
        return self._state

    @property
    def bytes_wanted(self) -> int:
        """How many bytes to read next so a read never crosses a message boundary: the rest
        of the header, else the rest of the body. 0 once closed or broken."""
        state = self._state
        if state is _CLOSED or state is _BROKEN or self._reader.eof:
            return 0
        return self._reader.bytes_wanted

    @property
    def max_fds(self) -> int:
        """Ancillary capacity the transport should allow: our advertised ``max_msg_fds``."""
        return self.capabilities.max_msg_fds

    def receive_data(
        self, data: bytes, fds: Sequence[int] = (), *, truncated: bool = False
    ) -> None:
        """Feed bytes read from the socket (``b""`` = EOF) and the fds read with them.

        ``fds`` belong to the message whose first byte is ``data[0]``. ``truncated`` reports
        MSG_CTRUNC: fds were lost, which is fatal at the next ``next_event()``. On a broken
        connection this raises RemoteProtocolError carrying ``fds`` straight back; after EOF
        it raises LocalProtocolError and the fds stay the caller's.
        """
        if self._state is _BROKEN:
            raise RemoteProtocolError(
                f"connection is broken: {self._broken_reason}", fatal=True, fds=fds
            )
        if self._reader.eof:
            raise LocalProtocolError("receive_data() after EOF")
        if self._reader.exact_pending:
            raise LocalProtocolError("receive_data() between receive_header() and receive_body()")
        # No bytes() copy: the reader's buffer copies whatever buffer type it is given.
        self._reader.feed(data, fds)
        self._truncated |= truncated

    @property
    def at_message_boundary(self) -> bool:
        """Open, with nothing buffered: :meth:`receive_header` may be called."""
        state = self._state
        open_ = state is not _BROKEN and state is not _CLOSED
        return open_ and self._reader.idle and not self._truncated

    def receive_header(self, header: bytes, fds: Sequence[int] = ()) -> int:
        """Exact reads, instead of ``receive_data``: the next message's 16-byte header and
        the fds read with it; returns the body length to read for :meth:`receive_body`.
        Same rules and outcome as ``receive_data`` + ``next_event``, without buffering (a
        bad header is fatal here). Only valid :attr:`at_message_boundary`."""
        if self._state is _BROKEN:
            raise RemoteProtocolError(
                f"connection is broken: {self._broken_reason}", fatal=True, fds=fds
            )
        if not self.at_message_boundary or len(header) != HEADER_SIZE:
            raise LocalProtocolError("receive_header() takes a whole header at a boundary")
        try:
            return self._reader.feed_header(header, fds)
        except RemoteProtocolError as exc:
            self._break(exc.message)
            raise

    def receive_body(
        self, body: bytes, stray_fds: Sequence[int] = (), *, eof: bool = False
    ) -> Request | RejectedRequest | Reply | ErrorReply:
        """The body :meth:`receive_header` announced (or the part read when fds came with
        it: ``stray_fds``), and the message's event; stray fds or ``eof`` are fatal."""
        if self._state is _BROKEN:
            raise RemoteProtocolError(
                f"connection is broken: {self._broken_reason}", fatal=True, fds=stray_fds
            )
        if not self._reader.exact_pending:
            raise LocalProtocolError("receive_body() without receive_header()")
        try:
            frame = self._reader.feed_body(body, stray_fds, eof)
        except RemoteProtocolError as exc:
            self._break(exc.message)
            raise
        if frame.flags & FLAG_TYPE_MASK == FLAG_TYPE_REPLY:
            return self._on_reply(frame)
        return self._on_request(frame)

    def release_fds(self) -> tuple[int, ...]:
        """fds fed in and not yet handed out (an incomplete message), for the caller to
        close when it abandons the connection, e.g. because the socket failed."""
        return self._reader.release_fds()

    def next_event(self) -> Event | NeedDataType:
        """The next event, or NEED_DATA. Raises a fatal RemoteProtocolError when the stream
        is lost (then on every later call too)."""
        state = self._state
        if state is _BROKEN:
            raise RemoteProtocolError(f"connection is broken: {self._broken_reason}", fatal=True)
        if state is _CLOSED:
            return ConnectionClosed()
        try:
            if self._truncated:
                raise self._reader.fatal("MSG_CTRUNC: the peer sent more fds than allowed")
            frame = self._reader.next_frame()
        except RemoteProtocolError as exc:
            self._break(exc.message)
            raise
        if frame is None:
            if self._reader.exact_pending:
                raise LocalProtocolError("next_event() between receive_header() and receive_body()")
            if self._reader.eof:
                self._enter(State.CLOSED)
                return ConnectionClosed()
            return NEED_DATA
        if frame.flags & FLAG_TYPE_MASK == FLAG_TYPE_REPLY:
            return self._on_reply(frame)
        return self._on_request(frame)

    def _enter(self, state: State) -> None:
        self._state = state
        self._accepted = ACCEPTED.get((self._role, state), {})

    def _break(self, reason: str) -> None:
        self._enter(State.BROKEN)
        self._broken_reason = reason

    def _reject(self, frame: Frame, err: int, reason: str) -> RejectedRequest:
        no_reply = frame.no_reply
        if not no_reply:
            key = (frame.msg_id, frame.command)
            self._incoming[key] = self._incoming.get(key, 0) + 1
        return RejectedRequest(frame.msg_id, frame.command, no_reply, err, reason, frame.fds)

    def _on_request(self, frame: Frame) -> Request | RejectedRequest:
        command = self._accepted.get(frame.command)
        if command is None or frame.flags & ~(FLAG_TYPE_MASK | FLAG_NO_REPLY):
            return self._reject(
                frame, *refusal(self._role, self._state, frame.command, frame.flags)
            )
        fds = frame.fds
        if len(fds) > self.capabilities.max_msg_fds:
            return self._reject(frame, errno.EINVAL, f"{len(fds)} fds > max_msg_fds")
        try:
            message = decode_request(command, frame.payload, self.dma_layout)
        except RemoteProtocolError as exc:
            return self._reject(frame, exc.errno, exc.message)
        if data_size(message) > self.capabilities.max_data_xfer_size:
            return self._reject(
                frame, TOO_BIG, f"{command.name} transfer exceeds max_data_xfer_size"
            )
        if fds:
            # Without fds there is nothing to check: no request needs fds (DMA_MAP without
            # one is anonymous memory, SET_IRQS eventfds without any de-assigns).
            fd_error = request_fd_error(message, len(fds))
            if fd_error is not None:
                return self._reject(frame, errno.EINVAL, fd_error)
        no_reply = frame.no_reply
        if isinstance(message, Version):
            # Spec §3.1: the reply major must equal the proposal; we only speak 0.
            if no_reply or message.major != PROTOCOL_MAJOR:
                return self._reject(frame, errno.EINVAL, f"cannot answer VERSION {message.major}.x")
            self._version_request_size = frame.size
            self._move(Trigger.RECEIVE_VERSION_REQUEST)
        msg_id = frame.msg_id
        if not no_reply:
            key = (msg_id, command)
            self._incoming[key] = self._incoming.get(key, 0) + 1
        return new_request(msg_id, command, no_reply, message, fds)

    def _on_reply(self, frame: Frame) -> Reply | ErrorReply:
        fds = frame.fds
        key = (frame.msg_id, frame.command)
        queue = self._outgoing.get(key)
        if not queue:
            # The body could be anything (even a crafted request): never parse it on (§12).
            reason = f"unexpected reply msg_id {frame.msg_id} command {frame.command}"
            self._break(reason)
            raise RemoteProtocolError(
                reason, errno=errno.EPROTO, fatal=True, fds=fds + self._reader.release_fds()
            )
        request = queue.popleft()
        if not queue:
            del self._outgoing[key]
        command = Command(frame.command)
        if frame.flags & FLAG_ERROR:
            # Payloads on error replies (a libvfio-user habit) are ignored.
            if command is Command.VERSION:
                self._move(Trigger.RECEIVE_VERSION_ERROR)
            return ErrorReply(frame.msg_id, command, frame.error, fds, "", request)
        try:
            message = decode_reply(request, frame.payload)
            fd_error = reply_fd_error(message, len(fds))
            if len(fds) > self.capabilities.max_msg_fds:
                fd_error = f"{len(fds)} fds > max_msg_fds"
            if fd_error is not None:
                raise RemoteProtocolError(fd_error)
            if isinstance(message, Version):
                self._accept_version_reply(message)
        except RemoteProtocolError as exc:
            if command is Command.VERSION:
                self._move(Trigger.RECEIVE_VERSION_ERROR)
            return ErrorReply(frame.msg_id, command, errno.EPROTO, fds, exc.message, request)
        return Reply(frame.msg_id, command, message, fds, request)

    def _accept_version_reply(self, reply: Version) -> None:
        if reply.major != PROTOCOL_MAJOR or reply.minor > PROTOCOL_MINOR:
            raise RemoteProtocolError(f"server answered version {reply.major}.{reply.minor}")
        self.negotiated = reply.capabilities or Capabilities()
        self._move(Trigger.RECEIVE_VERSION_REPLY)

    def _move(self, trigger: Trigger) -> None:
        self._enter(transition(self._role, self._state, trigger))

    # -- sending -------------------------------------------------------------------------

    def _peer(self) -> Capabilities:
        # Before VERSION the spec defaults apply (spec §3.1).
        return self.negotiated or Capabilities()

    def _send_request(
        self, message: RequestMessage, fds: Sequence[int], no_reply: bool
    ) -> tuple[int, Outgoing]:
        command = message.COMMAND
        if command not in SENDABLE[self._role, self._state]:
            raise LocalProtocolError(
                f"a {self._role.value} cannot send {command.name} in state {self._state.value}"
            )
        if no_reply and command is Command.VERSION:
            raise LocalProtocolError("VERSION needs a reply")
        peer = self._peer()
        limit = min(peer.max_data_xfer_size, self.capabilities.max_data_xfer_size)
        if data_size(message) > limit:
            raise LocalProtocolError(f"{command.name} transfer exceeds max_data_xfer_size")
        self._check_fds(request_fd_error(message, len(fds)), fds, peer)
        payload = message.pack()
        msg_id = self._next_msg_id
        self._next_msg_id = (msg_id + 1) & 0xFFFF
        if not no_reply:
            self._outgoing.setdefault((msg_id, command), deque()).append(message)
        if command is Command.VERSION:
            self._move(Trigger.SEND_VERSION_REQUEST)
        flags = FLAG_TYPE_COMMAND | (FLAG_NO_REPLY if no_reply else 0)
        header = HEADER_STRUCT.pack(msg_id, command, HEADER_SIZE + len(payload), flags, 0)
        return msg_id, Outgoing(header + payload, tuple(fds))

    @staticmethod
    def _check_fds(fd_error: str | None, fds: Sequence[int], peer: Capabilities) -> None:
        if fd_error is not None:
            raise LocalProtocolError(fd_error)
        if len(fds) > peer.max_msg_fds:
            raise LocalProtocolError(f"{len(fds)} fds > the peer's max_msg_fds")
        if not all(isinstance(fd, int) and fd >= 0 for fd in fds):
            raise LocalProtocolError("fds must be non-negative ints")

    def _check_pending(self, request: Request | RejectedRequest) -> tuple[int, int]:
        key = (request.msg_id, int(request.command))
        if self._incoming.get(key, 0) <= 0:
            raise LocalProtocolError(
                f"no pending request msg_id {request.msg_id} command {request.command}"
                " (already answered?)"
            )
        return key

    def _settle(self, key: tuple[int, int]) -> None:
        left = self._incoming[key] - 1
        if left:
            self._incoming[key] = left
        else:
            del self._incoming[key]

    def send_reply(
        self, request: Request, message: ReplyMessage = None, fds: Sequence[int] = ()
    ) -> Outgoing | None:
        """The reply to ``request`` (``message`` None = header only). Returns None, sending
        nothing, for a NO_REPLY request (spec R4). For VERSION, ``message`` None builds our
        reply (see :meth:`ServerConnection.version_reply`)."""
        if not isinstance(request, Request):
            raise LocalProtocolError("send_reply() takes a Request; use send_error() otherwise")
        if request.no_reply:
            return None
        key = self._check_pending(request)
        if request.command is _VERSION:
            message = self._version_reply_message(request, message)
        payload = b"" if message is None else message.pack()
        trapped = trapped_access_reply_ok(request.message, message)
        if not trapped:
            # Everything but the trapped-access hot path is checked by decoding what we are
            # about to send with the peer's rules: our mistakes surface here, not in QEMU.
            with _our_bug(f"{request.command.name} reply"):
                decoded = decode_reply(request.message, payload)
            if type(decoded) is not type(message):
                raise LocalProtocolError(
                    f"{type(message).__name__} is not a {request.command.name} reply"
                )
        if fds or not trapped:
            # A trapped-access reply without fds passes these checks by definition.
            self._check_fds(reply_fd_error(message, len(fds)), fds, self._peer())
        self._settle(key)
        if isinstance(request.message, Version):
            self.negotiated = request.message.capabilities or Capabilities()
            self._move(Trigger.SEND_VERSION_REPLY)
        size = HEADER_SIZE + len(payload)
        header = HEADER_STRUCT.pack(request.msg_id, request.command, size, FLAG_TYPE_REPLY, 0)
        return new_outgoing(header + payload, tuple(fds))

    def send_access_reply(self, request: Request, data: bytes = b"") -> Outgoing | None:
        """The reply to a REGION_READ (``data``: exactly the ``count`` bytes read, spec R10)
        or a REGION_WRITE (no ``data``): the trapped-access hot path.

        Sends the same bytes, with the same checks and bookkeeping, as ``send_reply`` with a
        ``RegionReadReply``/``RegionWriteReply`` echoing the request's offset, region and
        count, without building that message: the head is the request's own, validated when
        it arrived. None for a NO_REPLY request.
        """
        if not isinstance(request, Request):
            raise LocalProtocolError("send_access_reply() takes a Request")
        if request.no_reply:
            return None
        key = self._check_pending(request)
        wire = pack_access_reply(request.msg_id, request.message, data)
        self._settle(key)
        return new_outgoing(wire, ())

    def _version_reply_message(self, request: Request, message: ReplyMessage) -> Version:
        assert isinstance(request.message, Version)
        if self._state is not State.VERSION_PENDING:
            raise LocalProtocolError("no VERSION request to answer")
        if message is None:
            return negotiate_reply(request.message, self.capabilities, self._version_request_size)
        problem = reply_problem(request.message, message, self._version_request_size)
        if problem is not None:
            raise LocalProtocolError(problem)
        assert isinstance(message, Version)
        return message

    def send_error(self, request: Request | RejectedRequest, errno: int) -> Outgoing | None:
        """A header-only error reply (flags 0x21, positive errno; spec R3), or None for a
        NO_REPLY request."""
        if not isinstance(request, Request | RejectedRequest):
            raise LocalProtocolError("send_error() takes a Request or a RejectedRequest")
        if isinstance(errno, bool) or not isinstance(errno, int) or not 0 < errno < 1 << 32:
            raise LocalProtocolError(f"errno must be a positive u32, not {errno!r}")
        if request.no_reply:
            return None
        key = self._check_pending(request)
        self._settle(key)
        if isinstance(request, Request) and isinstance(request.message, Version):
            self._move(Trigger.SEND_VERSION_ERROR)
        flags = FLAG_TYPE_REPLY | FLAG_ERROR
        header = HEADER_STRUCT.pack(request.msg_id, request.command, HEADER_SIZE, flags, errno)
        return new_outgoing(header, ())
