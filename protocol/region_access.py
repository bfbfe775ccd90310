"""REGION_READ (9), REGION_WRITE (10) and REGION_WRITE_MULTI (15) (spec vfio-user.md §3.9,
§3.11). All share the 16-byte access head ``offset u64, region u32, count u32``."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import ClassVar, Self

from protocol._fields import (
    check_bytes,
    check_uint,
    exact_length,
    min_length,
    no_overflow,
    peer_input,
    require,
)
from protocol.header import Command

REGION_ACCESS_STRUCT = struct.Struct("<QII")  # offset, region, count
WRITE_MULTI_COUNT_STRUCT = struct.Struct("<Q")  # wr_cnt
WRITE_MULTI_ENTRY_STRUCT = struct.Struct("<QII8s")  # offset, region, count, data[8]
#: A WRITE_MULTI entry holds at most 8 data bytes (spec §3.11).
WRITE_MULTI_MAX_DATA = 8


def _check_head(obj: object, offset: int, count: int) -> None:
    check_uint(obj, 64, "offset")
    check_uint(obj, 32, "region", "count")
    require(no_overflow(offset, count), "offset + count overflows")


@dataclass(frozen=True, slots=True)
class RegionReadRequest:
    """REGION_READ request: read ``count`` bytes of ``region`` at ``offset``."""

    COMMAND: ClassVar[Command] = Command.REGION_READ

    offset: int
    region: int
    count: int

    def __post_init__(self) -> None:
        _check_head(self, self.offset, self.count)

    def pack(self) -> bytes:
        """Wire payload."""
        return REGION_ACCESS_STRUCT.pack(self.offset, self.region, self.count)

    @classmethod
    def unpack(cls, payload: bytes) -> Self:
        """Parse."""
        with peer_input("REGION_READ"):
            exact_length(payload, REGION_ACCESS_STRUCT.size, "REGION_READ")
            return cls(*REGION_ACCESS_STRUCT.unpack(payload))


@dataclass(frozen=True, slots=True)
class RegionReadReply:
    """REGION_READ reply: the head echoed plus exactly ``count`` bytes (spec R10)."""

    COMMAND: ClassVar[Command] = Command.REGION_READ

    offset: int
    region: int
    count: int
    data: bytes

    def __post_init__(self) -> None:
        _check_head(self, self.offset, self.count)
        check_bytes(self, "data")
        require(len(self.data) == self.count, "REGION_READ reply data length != count")

    def pack(self) -> bytes:
        """Wire payload."""
        return REGION_ACCESS_STRUCT.pack(self.offset, self.region, self.count) + self.data

    @classmethod
    def unpack(cls, payload: bytes) -> Self:
        """Parse."""
        with peer_input("REGION_READ reply"):
            min_length(payload, REGION_ACCESS_STRUCT.size, "REGION_READ reply")
            offset, region, count = REGION_ACCESS_STRUCT.unpack_from(payload)
            return cls(offset, region, count, bytes(payload[REGION_ACCESS_STRUCT.size :]))


@dataclass(frozen=True, slots=True)
class RegionWriteRequest:
    """REGION_WRITE request: ``data`` (exactly ``count`` bytes, spec R20) at ``offset``."""

    COMMAND: ClassVar[Command] = Command.REGION_WRITE

    offset: int
    region: int
    count: int
    data: bytes

    def __post_init__(self) -> None:
        _check_head(self, self.offset, self.count)
        check_bytes(self, "data")
        require(len(self.data) == self.count, "REGION_WRITE data length != count")

    def pack(self) -> bytes:
        """Wire payload."""
        return REGION_ACCESS_STRUCT.pack(self.offset, self.region, self.count) + self.data

    @classmethod
    def unpack(cls, payload: bytes) -> Self:
        """Parse."""
        with peer_input("REGION_WRITE"):
            min_length(payload, REGION_ACCESS_STRUCT.size, "REGION_WRITE")
            offset, region, count = REGION_ACCESS_STRUCT.unpack_from(payload)
            return cls(offset, region, count, bytes(payload[REGION_ACCESS_STRUCT.size :]))


@dataclass(frozen=True, slots=True)
class RegionWriteReply:
    """REGION_WRITE reply: the head echoed (a header-only reply is also fine for QEMU)."""

    COMMAND: ClassVar[Command] = Command.REGION_WRITE

    offset: int
    region: int
    count: int

    def __post_init__(self) -> None:
        _check_head(self, self.offset, self.count)

    def pack(self) -> bytes:
        """Wire payload."""
        return REGION_ACCESS_STRUCT.pack(self.offset, self.region, self.count)

    @classmethod
    def unpack(cls, payload: bytes) -> Self:
        """Parse."""
        with peer_input("REGION_WRITE reply"):
            exact_length(payload, REGION_ACCESS_STRUCT.size, "REGION_WRITE reply")
            return cls(*REGION_ACCESS_STRUCT.unpack(payload))


@dataclass(frozen=True, slots=True)
class WriteMultiEntry:
    """One posted write of a REGION_WRITE_MULTI (``count`` <= 8 bytes of ``data``)."""

    offset: int
    region: int
    count: int
    data: bytes

    def __post_init__(self) -> None:
        _check_head(self, self.offset, self.count)
        check_bytes(self, "data")
        require(self.count <= WRITE_MULTI_MAX_DATA, "WRITE_MULTI entry count > 8")
        require(len(self.data) == self.count, "WRITE_MULTI entry data length != count")


@dataclass(frozen=True, slots=True)
class RegionWriteMulti:
    """REGION_WRITE_MULTI request: ``wr_cnt u64`` then 24-byte entries (spec §3.11).

    QEMU sends it NO_REPLY; apply entries in order, exactly as individual posted writes.
    """

    COMMAND: ClassVar[Command] = Command.REGION_WRITE_MULTI

    entries: tuple[WriteMultiEntry, ...]

    def __post_init__(self) -> None:
        require(isinstance(self.entries, tuple), "entries must be a tuple")
        require(len(self.entries) > 0, "REGION_WRITE_MULTI without entries")

    def pack(self) -> bytes:
        """Wire payload (each entry's data is zero-padded to 8 bytes)."""
        parts = [WRITE_MULTI_COUNT_STRUCT.pack(len(self.entries))]
        parts += [
            WRITE_MULTI_ENTRY_STRUCT.pack(e.offset, e.region, e.count, e.data) for e in self.entries
        ]
        return b"".join(parts)

    @classmethod
    def unpack(cls, payload: bytes) -> Self:
        """Parse."""
        with peer_input("REGION_WRITE_MULTI"):
            min_length(payload, WRITE_MULTI_COUNT_STRUCT.size, "REGION_WRITE_MULTI")
            (wr_cnt,) = WRITE_MULTI_COUNT_STRUCT.unpack_from(payload)
            body = payload[WRITE_MULTI_COUNT_STRUCT.size :]
            require(wr_cnt * WRITE_MULTI_ENTRY_STRUCT.size == len(body), "wr_cnt != entries")
            entries = []
            for i in range(wr_cnt):
                offset, region, count, data = WRITE_MULTI_ENTRY_STRUCT.unpack_from(
                    body, i * WRITE_MULTI_ENTRY_STRUCT.size
                )
                require(count <= WRITE_MULTI_MAX_DATA, "WRITE_MULTI entry count > 8")
                entries.append(WriteMultiEntry(offset, region, count, data[:count]))
            return cls(tuple(entries))


@dataclass(frozen=True, slots=True)
class RegionWriteMultiReply:
    """REGION_WRITE_MULTI reply, if one was asked for: ``wr_cnt`` completed."""

    COMMAND: ClassVar[Command] = Command.REGION_WRITE_MULTI

    wr_cnt: int

    def __post_init__(self) -> None:
        check_uint(self, 64, "wr_cnt")

    def pack(self) -> bytes:
        """Wire payload."""
        return WRITE_MULTI_COUNT_STRUCT.pack(self.wr_cnt)

    @classmethod
    def unpack(cls, payload: bytes) -> Self:
        """Parse."""
        with peer_input("REGION_WRITE_MULTI reply"):
            exact_length(payload, WRITE_MULTI_COUNT_STRUCT.size, "REGION_WRITE_MULTI reply")
            return cls(*WRITE_MULTI_COUNT_STRUCT.unpack(payload))
