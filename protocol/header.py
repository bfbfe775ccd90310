"""The 16-byte message header and the command numbers (spec vfio-user.md §2, §3)."""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

from protocol._fields import check_uint

HEADER_SIZE = 16
#: msg_id u16, command u16, size u32, flags u32, error u32 (spec §2).
HEADER_STRUCT = struct.Struct("<HHIII")

#: Low 4 bits of ``flags``: 0 = command (request), 1 = reply; everything else is fatal (§2).
FLAG_TYPE_MASK = 0x0F
FLAG_TYPE_COMMAND = 0x0
FLAG_TYPE_REPLY = 0x1
#: The sender expects no reply (posted writes; spec R4).
FLAG_NO_REPLY = 0x10
#: A reply that carries a positive errno in ``error`` (spec R3).
FLAG_ERROR = 0x20
#: Every bit the spec defines; the rest must be 0.
FLAGS_KNOWN = FLAG_TYPE_MASK | FLAG_NO_REPLY | FLAG_ERROR


class Command(enum.IntEnum):
    """vfio-user command numbers (spec §3 table). 14 (DIRTY_PAGES) is obsolete and absent."""

    VERSION = 1
    DMA_MAP = 2
    DMA_UNMAP = 3
    DEVICE_GET_INFO = 4
    DEVICE_GET_REGION_INFO = 5
    DEVICE_GET_REGION_IO_FDS = 6
    DEVICE_GET_IRQ_INFO = 7
    DEVICE_SET_IRQS = 8
    REGION_READ = 9
    REGION_WRITE = 10
    DMA_READ = 11
    DMA_WRITE = 12
    DEVICE_RESET = 13
    REGION_WRITE_MULTI = 15
    DEVICE_FEATURE = 16
    MIG_DATA_READ = 17
    MIG_DATA_WRITE = 18


@dataclass(frozen=True, slots=True)
class Header:
    """One message header. ``command`` is a plain int: unknown numbers must be representable."""

    msg_id: int
    command: int
    size: int
    flags: int
    error: int = 0

    def __post_init__(self) -> None:
        check_uint(self, 16, "msg_id", "command")
        check_uint(self, 32, "size", "flags", "error")

    @property
    def is_reply(self) -> bool:
        """Type field says reply (1)."""
        return self.flags & FLAG_TYPE_MASK == FLAG_TYPE_REPLY

    @property
    def no_reply(self) -> bool:
        """The NO_REPLY bit (0x10)."""
        return bool(self.flags & FLAG_NO_REPLY)

    @property
    def is_error(self) -> bool:
        """The ERROR bit (0x20)."""
        return bool(self.flags & FLAG_ERROR)

    def pack(self) -> bytes:
        """The 16 wire bytes."""
        return HEADER_STRUCT.pack(self.msg_id, self.command, self.size, self.flags, self.error)

    @classmethod
    def unpack(cls, data: bytes | bytearray | memoryview) -> Header:
        """Parse the first 16 bytes of ``data`` (no semantic checks: that is framing's job)."""
        return cls(*HEADER_STRUCT.unpack_from(data))
