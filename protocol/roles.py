"""The two roles on top of the shared engine in :mod:`protocol.connection`."""

from __future__ import annotations

from collections.abc import Sequence

from protocol.capabilities import Capabilities
from protocol.connection import _Connection
from protocol.dma import DmaLayout
from protocol.errors import LocalProtocolError
from protocol.events import Outgoing, Request, RequestMessage
from protocol.header import Command
from protocol.state import Role
from protocol.version import PROTOCOL_MAJOR, PROTOCOL_MINOR, Version


class ServerConnection(_Connection):
    """The server end (the daemon): receives the client's requests, answers them, and may
    send DMA_READ/DMA_WRITE requests of either layout (spec §3.12)."""

    _role = Role.SERVER

    def __init__(self, capabilities: Capabilities) -> None:
        super().__init__(capabilities, dma_layout=DmaLayout.SPEC)

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
