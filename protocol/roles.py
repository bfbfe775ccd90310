"""The two roles on top of the shared engine in :mod:`protocol.connection`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from protocol.capabilities import Capabilities
from protocol.connection import _Connection
from protocol.dma import DmaLayout
from protocol.errors import LocalProtocolError
from protocol.events import Outgoing, Request, RequestMessage
from protocol.header import FLAG_NO_REPLY, HEADER_SIZE, HEADER_STRUCT, Command
from protocol.state import Role, State
from protocol.trapped import (
    ACCESS_SIZE,
    REGION_READ,
    REGION_WRITE,
    TrappedAccess,
    access_error,
    access_reply,
    decode_access,
)
from protocol.version import PROTOCOL_MAJOR, PROTOCOL_MINOR, Version


class ServerConnection(_Connection):
    """The server end (the daemon): receives the client's requests, answers them, and may
    send DMA_READ/DMA_WRITE requests of either layout (spec §3.12)."""

    _role = Role.SERVER

    def __init__(self, capabilities: Capabilities) -> None:
        super().__init__(capabilities, dma_layout=DmaLayout.SPEC)
        # The fast-path access owed a reply (protocol.trapped: one at a time).
        self._pending_access: TrappedAccess | None = None

    # -- handing the connection to another process -----------------------------------------

    def handover(self) -> dict[str, Any]:
        """What another process needs to carry this connection on, as JSON-able data: the
        state, our capabilities and the client's. Only at a message boundary with no reply
        owed either way (the stream then holds nothing of ours half-read or half-answered);
        raises LocalProtocolError otherwise."""
        state = self._state
        if (
            state not in (State.AWAITING_VERSION, State.READY)
            or not self.at_message_boundary
            or self._incoming
            or self._outgoing
            or self._pending_access is not None
        ):
            raise LocalProtocolError(
                f"a connection is handed over only between messages ({state.value})"
            )
        negotiated = self.negotiated
        return {
            "state": state.value,
            "capabilities": self.capabilities.to_json(explicit=True),
            "negotiated": None if negotiated is None else negotiated.to_json(explicit=True),
        }

    @classmethod
    def taken_over(cls, handed: Mapping[str, Any]) -> ServerConnection:
        """The connection :meth:`handover` described, carried on here. Raises ValueError
        for a description it cannot be (the caller closes the stream then)."""
        try:
            state = State(handed["state"])
            capabilities = Capabilities.from_json(handed["capabilities"])
            raw = handed["negotiated"]
            negotiated = None if raw is None else Capabilities.from_json(raw)
        except (KeyError, TypeError, ValueError, LocalProtocolError) as exc:
            raise ValueError(f"connection state unusable: {exc}") from exc
        if state not in (State.AWAITING_VERSION, State.READY) or (
            (negotiated is None) != (state is State.AWAITING_VERSION)
        ):
            raise ValueError(f"connection state unusable: {state.value} with {raw!r}")
        conn = cls(capabilities)
        conn.negotiated = negotiated
        conn._enter(state)
        return conn

    # -- the trapped-access fast path (exact reads; see protocol.trapped) -------------------

    def trapped_access_body(self, header: bytes) -> int:
        """The body length to read for the fast path, or -1: ``header`` (read with no fds,
        at a message boundary) is not a REGION_READ/REGION_WRITE the fast path may take, so
        it goes to :meth:`receive_header` as usual. Changes nothing."""
        head = self._trapped_head(header)
        return -1 if head is None else head[2] - HEADER_SIZE

    def receive_trapped_access(self, header: bytes, body: bytes) -> TrappedAccess | None:
        """The access in ``header`` + ``body`` (read with no fds), consumed, or None with
        nothing consumed: hand both to :meth:`receive_header`/:meth:`receive_body` then.
        Unless posted, the access is owed :meth:`answer_access` or :meth:`refuse_access`."""
        head = self._trapped_head(header)
        if head is None:
            return None
        msg_id, command, size, flags, _ = head
        if len(body) != size - HEADER_SIZE:
            return None
        no_reply = flags == FLAG_NO_REPLY
        access = decode_access(
            msg_id, command, no_reply, body, self.capabilities.max_data_xfer_size
        )
        if access is None:
            return None
        self._reader.skip(size)
        if not no_reply:
            self._pending_access = access
        return access

    def answer_access(self, access: TrappedAccess, data: bytes = b"") -> bytes | None:
        """The reply to ``access`` (``data``: exactly ``count`` bytes read, none for a
        write), or None for a posted write."""
        if access.no_reply:
            return None
        self._check_owed(access)
        wire = access_reply(access, data)  # may refuse the data: then it is still owed
        self._pending_access = None
        return wire

    def refuse_access(self, access: TrappedAccess, errno: int) -> bytes | None:
        """A header-only error reply to ``access``, or None for a posted write."""
        if access.no_reply:
            return None
        self._check_owed(access)
        wire = access_error(access, errno)
        self._pending_access = None
        return wire

    def fast_read_limits(self) -> tuple[int, int] | None:
        """``(max message size, max_data_xfer_size)`` when the fast path would take a plain
        REGION_READ now (a server's C loop answers some without this connection: see
        vgpud/server/fast_reads.py), else None. Changes nothing."""
        if not self._may_take(REGION_READ):
            return None
        return self._reader.max_size, self.capabilities.max_data_xfer_size

    def skip_fast_reads(self, count: int) -> None:
        """``count`` REGION_READs (the request head only: 32 bytes each, no fds) were read
        and answered by the caller while :meth:`fast_read_limits` allowed it."""
        self._reader.skip(count * (HEADER_SIZE + ACCESS_SIZE))

    def _check_owed(self, access: TrappedAccess) -> None:
        if access is not self._pending_access:
            raise LocalProtocolError(f"{access!r} is not owed a reply (already answered?)")

    def _trapped_head(self, header: bytes) -> tuple[int, int, int, int, int] | None:
        if len(header) != HEADER_SIZE:
            return None
        head: tuple[int, int, int, int, int] = HEADER_STRUCT.unpack(header)
        command, size, flags = head[1], head[2], head[3]
        if command == REGION_READ:
            if flags or size != HEADER_SIZE + 16:
                return None  # a posted read is legal but rare: the general path has it
        elif command != REGION_WRITE or flags & ~FLAG_NO_REPLY or size < HEADER_SIZE + 16:
            return None
        if size > self._reader.max_size or not self._may_take(command):
            return None
        return head

    def _may_take(self, command: int) -> bool:
        """The state-dependent half of the fast path's conditions."""
        return (
            self._pending_access is None and command in self._accepted and self.at_message_boundary
        )

    def version_reply(self, request: Request) -> Outgoing:
        """Our VERSION reply: 0.0, our capabilities (only features the client offered), never
        longer than the request (spec R2). Sets ``negotiated`` to the client's."""
        if request.command is not Command.VERSION or request.no_reply:
            raise LocalProtocolError("version_reply() answers a VERSION request")
        outgoing = self.send_reply(request)
        assert outgoing is not None
        return outgoing

    def send_request(
        self, message: RequestMessage, fds: Sequence[int] = ()
    ) -> tuple[int, Outgoing]:
        """A server -> client request (DMA_READ / DMA_WRITE only); returns its msg_id. The
        matching reply comes out of ``next_event()`` decoded with the same layout."""
        return self._send_request(message, fds, no_reply=False)


class ClientConnection(_Connection):
    """The client end (tests, ``vgpud probe``, benchmarks). ``dma_layout`` says how to decode
    the server's DMA_READ/DMA_WRITE requests (QEMU uses ``DmaLayout.QEMU``)."""

    _role = Role.CLIENT

    def __init__(
        self, capabilities: Capabilities, *, dma_layout: DmaLayout = DmaLayout.SPEC
    ) -> None:
        super().__init__(capabilities, dma_layout=dma_layout)

    def send_request(
        self, message: RequestMessage, fds: Sequence[int] = (), no_reply: bool = False
    ) -> tuple[int, Outgoing]:
        """Send a request; returns its msg_id (16-bit, wrapping). Its reply comes out of
        ``next_event()`` decoded for this request."""
        return self._send_request(message, fds, no_reply)

    def version_request(self) -> tuple[int, Outgoing]:
        """VERSION 0.0 with our capabilities."""
        return self.send_request(Version(PROTOCOL_MAJOR, PROTOCOL_MINOR, self.capabilities))
