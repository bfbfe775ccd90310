"""A byte-level client for feeding the daemon exactly what a test wants (bad input included)."""

from __future__ import annotations

import gzip
import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from vgpud.server.transport import FdStream, TransportError, close_fds

HEADER = struct.Struct("<HHIII")
# Real QEMU 11.1.3 traffic (shared/captures, vendored gzipped; see tests/captures/README.md).
CAPTURES = Path(__file__).resolve().parents[1] / "captures"

# QEMU 11.1.3's VERSION request, byte for byte (shared/captures/README.md).
QEMU_VERSION_JSON = (
    b'{"capabilities": {"pgsizes": 4096, "max_msg_fds": 16, "max_dma_maps": 65535, '
    b'"max_data_xfer_size": 1048576, "migration": {"max_bitmap_size": 268435456, '
    b'"pgsize": 4096}, "write_multiple": true}}\0'
)
QEMU_VERSION = HEADER.pack(0, 1, 214, 0, 0) + struct.pack("<HH", 0, 0) + QEMU_VERSION_JSON


@dataclass
class RawReply:
    msg_id: int
    command: int
    size: int
    flags: int
    error: int
    payload: bytes
    fds: list[int]

    @property
    def is_error(self) -> bool:
        return bool(self.flags & 0x20)


class RawConn:
    """Send arbitrary bytes + fds; read whole replies (or learn the daemon closed us)."""

    def __init__(self, stream: FdStream) -> None:
        self.stream = stream
        self._buffer = b""
        self._fds: list[int] = []

    @classmethod
    async def open(cls, path: Path, negotiate: bool = True) -> RawConn:
        sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
        await sock.connect(str(path))
        conn = cls(FdStream.from_trio(sock))
        if negotiate:
            await conn.send(QEMU_VERSION)
            reply = await conn.receive()
            assert reply is not None and not reply.is_error
        return conn

    async def send(self, data: bytes, fds: list[int] | tuple[int, ...] = ()) -> None:
        await self.stream.send(data, fds)

    async def request(
        self, msg_id: int, command: int, payload: bytes, fds: tuple[int, ...] = (), flags: int = 0
    ) -> RawReply | None:
        await self.send(HEADER.pack(msg_id, command, 16 + len(payload), flags, 0) + payload, fds)
        return await self.receive()

    async def _fill(self, n: int) -> bool:
        while len(self._buffer) < n:
            try:
                data, fds = await self.stream.receive(n - len(self._buffer), 16)
            except TransportError:
                # The daemon closed with our bytes unread: the kernel resets the connection.
                return False
            self._fds += fds
            if not data:
                return False
            self._buffer += data
        return True

    async def receive(self) -> RawReply | None:
        """The next whole message, or None at EOF."""
        if not await self._fill(16):
            return None
        msg_id, command, size, flags, error = HEADER.unpack(self._buffer[:16])
        if not await self._fill(size):
            return None
        payload = self._buffer[16:size]
        self._buffer = self._buffer[size:]
        fds, self._fds = self._fds, []
        return RawReply(msg_id, command, size, flags, error, payload, fds)

    def close(self) -> None:
        close_fds(self._fds)
        self.stream.close()


def load_capture(name: str) -> list[dict[str, Any]]:
    """Message records of one capture file."""
    with gzip.open(CAPTURES / f"{name}.gz", "rt") as handle:
        return [r for line in handle if (r := json.loads(line)).get("event") == "msg"]
