"""A vfio-user client on trio, built on ``protocol.ClientConnection``.

Used by ``vgpud probe``, the benchmarks and the server tests: the same transport as the
daemon (``FdStream``), the same sans-IO codec, the client role. One request at a time unless
the caller pipelines with ``send``/``receive`` explicitly (DMA_MAP bursts, as QEMU does).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import trio

import protocol as p
from vgpud.server.transport import FdStream, close_fds

_M = TypeVar("_M")

CLIENT_CAPABILITIES = p.Capabilities(
    max_msg_fds=16, max_data_xfer_size=1 << 20, pgsizes=4096, max_dma_maps=65535
)


class VfioUserError(Exception):
    """The server answered a request with an error reply."""

    def __init__(self, command: p.Command, errno_: int) -> None:
        super().__init__(f"{command.name} failed: {_strerror(errno_)} (errno {errno_})")
        self.command = command
        self.errno = errno_


class MisbehavingServerError(Exception):
    """The server broke the protocol in a way the protocol layer cannot see: an answer to
    another request, a request of its own, a reply of the wrong kind."""


def _strerror(errno_: int) -> str:
    # Any u32 can come in an error reply; os.strerror rejects what does not fit a C int.
    if errno_ == 0:
        return "no error code"
    try:
        return os.strerror(errno_)
    except (ValueError, OverflowError):
        return "unknown error"


# How often a region-info request may be repeated with the larger argsz the server asks for:
# once is what a correct server needs; one that keeps asking for more is broken.
REGION_INFO_RETRIES = 2


@dataclass(frozen=True, slots=True)
class RegionInfoResult:
    """A region-info reply and the fd that came with it (caller closes it)."""

    info: p.RegionInfo
    fd: int | None


class VfioUserClient:
    """One connection to a vfio-user server."""

    def __init__(self, stream: FdStream, capabilities: p.Capabilities) -> None:
        self.stream = stream
        self.conn = p.ClientConnection(capabilities)
        self.server_capabilities: p.Capabilities | None = None

    @classmethod
    async def connect(
        cls, path: str | Path, capabilities: p.Capabilities = CLIENT_CAPABILITIES
    ) -> VfioUserClient:
        """Connect and negotiate (VERSION), as QEMU does first."""
        sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
        try:
            await sock.connect(str(path))
        except BaseException:
            sock.close()
            raise
        client = cls(FdStream.from_trio(sock), capabilities)
        try:
            # Every key written, as QEMU does, so the reply has room for the server's limits.
            version = p.Version(major=0, minor=0, capabilities=capabilities, explicit_json=True)
            await client.request(version)
        except BaseException:
            client.close()
            raise
        client.server_capabilities = client.conn.negotiated
        return client

    def close(self) -> None:
        """Close the connection."""
        self.stream.close()

    async def __aenter__(self) -> VfioUserClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    # -- raw request/reply ----------------------------------------------------------------

    async def send(self, message: Any, fds: Sequence[int] = (), no_reply: bool = False) -> int:
        """Send a request without waiting; returns its msg_id."""
        msg_id, outgoing = self.conn.send_request(message, fds, no_reply=no_reply)
        await self.stream.send(outgoing.data, outgoing.fds)
        return msg_id

    async def receive(self) -> p.Reply | p.ErrorReply:
        """The next reply (server->client requests are not expected by this client)."""
        while True:
            event = self.conn.next_event()
            if event is p.NEED_DATA:
                data, fds = await self.stream.receive(self.conn.bytes_wanted, self.conn.max_fds)
                self.conn.receive_data(data, fds)
                continue
            if isinstance(event, p.Reply | p.ErrorReply):
                return event
            if isinstance(event, p.ConnectionClosed):
                raise EOFError("server closed the connection")
            if isinstance(event, p.Request | p.RejectedRequest):
                close_fds(event.fds)
            raise MisbehavingServerError(f"unexpected message from the server: {event!r}")

    async def request(self, message: Any, fds: Sequence[int] = ()) -> p.Reply:
        """Send one request and wait for its reply; error replies raise VfioUserError."""
        msg_id = await self.send(message, fds)
        reply = await self.receive()
        if reply.msg_id != msg_id:
            close_fds(reply.fds)
            raise MisbehavingServerError(f"reply {reply.msg_id} does not answer request {msg_id}")
        if isinstance(reply, p.ErrorReply):
            # The server's error, or a reply refused (EPROTO), with fds it could not carry
            close_fds(reply.fds)
            raise VfioUserError(reply.command, reply.errno)
        return reply

    async def call(self, message: Any, reply_type: type[_M], fds: Sequence[int] = ()) -> _M:
        """``request`` and check the reply's message type."""
        reply = await self.request(message, fds)
        got = reply.message
        if not isinstance(got, reply_type):
            close_fds(reply.fds)
            raise MisbehavingServerError(f"expected {reply_type.__name__}, got {got!r}")
        return got

    # -- typed helpers ----------------------------------------------------------------------

    async def device_info(self) -> p.DeviceInfo:
        """DEVICE_GET_INFO."""
        return await self.call(
            p.DeviceInfo(argsz=16, flags=0, num_regions=0, num_irqs=0), p.DeviceInfo
        )

    async def region_info(self, index: int, argsz: int = 32) -> RegionInfoResult:
        """DEVICE_GET_REGION_INFO, retrying with the argsz the server asks for (as QEMU)."""
        for _ in range(REGION_INFO_RETRIES + 1):
            reply = await self.request(p.RegionInfoRequest(argsz=argsz, index=index))
            info = reply.message
            fd = reply.fds[0] if reply.fds else None
            close_fds(reply.fds[1:])
            if not isinstance(info, p.RegionInfo):
                close_fds(reply.fds[:1])
                raise MisbehavingServerError(f"expected RegionInfo, got {info!r}")
            if info.argsz > argsz:
                if fd is not None:
                    os.close(fd)
                argsz = info.argsz
                continue
            return RegionInfoResult(info, fd)
        raise MisbehavingServerError(f"region {index}: the server keeps asking for a larger argsz")

    async def irq_info(self, index: int) -> p.IrqInfo:
        """DEVICE_GET_IRQ_INFO."""
        return await self.call(p.IrqInfo(argsz=16, flags=0, index=index, count=0), p.IrqInfo)

    async def region_read(self, region: int, offset: int, count: int) -> bytes:
        """REGION_READ."""
        reply = await self.call(
            p.RegionReadRequest(offset=offset, region=region, count=count), p.RegionReadReply
        )
        return reply.data

    async def region_write(self, region: int, offset: int, data: bytes) -> None:
        """REGION_WRITE (with a reply)."""
        await self.request(
            p.RegionWriteRequest(offset=offset, region=region, count=len(data), data=data)
        )

    async def set_irqs(
        self, index: int, flags: int, start: int, count: int, fds: Sequence[int] = ()
    ) -> None:
        """DEVICE_SET_IRQS; ``fds`` are sent (not closed) for DATA_EVENTFD."""
        await self.request(
            p.SetIrqs(argsz=20, flags=flags, index=index, start=start, count=count, data=b""), fds
        )

    async def dma_map(
        self, address: int, size: int, flags: int = 3, fd: int | None = None, offset: int = 0
    ) -> None:
        """DMA_MAP, optionally with a backing fd (sent, not closed)."""
        msg = p.DmaMap(flags=flags, offset=offset, address=address, size=size)
        await self.request(msg, (fd,) if fd is not None else ())

    async def dma_unmap(self, address: int, size: int, flags: int = 0) -> None:
        """DMA_UNMAP (flags 2 = unmap all, with address = size = 0)."""
        await self.request(p.DmaUnmap(flags=flags, address=address, size=size))

    async def reset(self) -> None:
        """DEVICE_RESET."""
        await self.request(p.DeviceReset())
