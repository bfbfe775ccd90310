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
    slot_setters,
)
from protocol.errors import LocalProtocolError
from protocol.header import FLAG_TYPE_REPLY, HEADER_STRUCT, Command

REGION_ACCESS_STRUCT = struct.Struct("<QII")  # offset, region, count
WRITE_MULTI_COUNT_STRUCT = struct.Struct("<Q")  # wr_cnt
WRITE_MULTI_ENTRY_STRUCT = struct.Struct("<QII8s")  # offset, region, count, data[8]
#: A WRITE_MULTI entry holds at most 8 data bytes (spec §3.11).
WRITE_MULTI_MAX_DATA = 8
_ACCESS_SIZE = REGION_ACCESS_STRUCT.size
_ADDRESS_LIMIT = 1 << 64
_unpack_access = REGION_ACCESS_STRUCT.unpack_from
_new = object.__new__
#: A REGION_READ/REGION_WRITE reply up to its data: message header and access head.
_ACCESS_REPLY_STRUCT = struct.Struct(HEADER_STRUCT.format + REGION_ACCESS_STRUCT.format[1:])
_pack_access_reply = _ACCESS_REPLY_STRUCT.pack
_READ = int(Command.REGION_READ)


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
        if len(payload) == _ACCESS_SIZE:
            # Trapped-access fast path: unpacked u64/u32 fields are in range by construction,
            # so of __post_init__'s checks only the overflow one is left to make here. Any
            # payload that fails it takes the full path below, for the same error.
            offset, region, count = _unpack_access(payload)
            if offset + count <= _ADDRESS_LIMIT:
                message = _new(cls)
                _rd_offset(message, offset)
                _rd_region(message, region)
                _rd_count(message, count)
                return message
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
        if len(payload) >= _ACCESS_SIZE:
            # Trapped-access fast path, as for REGION_READ: what __post_init__ would still
            # check is the overflow and that exactly ``count`` bytes follow (spec R20).
            offset, region, count = _unpack_access(payload)
            data = payload[_ACCESS_SIZE:]
            if offset + count <= _ADDRESS_LIMIT and len(data) == count:
                message = _new(cls)
                _wr_offset(message, offset)
                _wr_region(message, region)
                _wr_count(message, count)
                _wr_data(message, bytes(data))
                return message
        with peer_input("REGION_WRITE"):
            min_length(payload, REGION_ACCESS_STRUCT.size, "REGION_WRITE")
            offset, region, count = REGION_ACCESS_STRUCT.unpack_from(payload)
            return cls(offset, region, count, bytes(payload[REGION_ACCESS_STRUCT.size :]))


_rd_offset, _rd_region, _rd_count = slot_setters(RegionReadRequest, "offset", "region", "count")
_wr_offset, _wr_region, _wr_count, _wr_data = slot_setters(
    RegionWriteRequest, "offset", "region", "count", "data"
)


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


def trapped_access_reply_ok(request: object, reply: object) -> bool:
    """Cheap self-check for REGION_READ/WRITE replies, the per-guest-access path.

    The dataclasses validated their own fields when built; what decoding would add is the
    cross-check against the request, done here directly (spec R10: exactly ``count`` bytes).
    """
    if type(reply) is RegionReadReply and type(request) is RegionReadRequest:
        if reply.count != request.count:
            raise LocalProtocolError(
                f"REGION_READ reply of {reply.count} bytes, {request.count} asked"
            )
        return True
    return type(reply) is RegionWriteReply and type(request) is RegionWriteRequest


def pack_access_reply(msg_id: int, request: object, data: bytes) -> bytes:
    """The whole reply message to a REGION_READ (``data`` = the bytes read) or a REGION_WRITE
    (no ``data``), echoing the request's head: the bytes ``RegionReadReply``/
    ``RegionWriteReply`` would pack, with the checks they and the reply decoder would make.

    The head needs none: it is the request's, validated when it arrived.
    """
    if type(request) is not RegionReadRequest and type(request) is not RegionWriteRequest:
        raise LocalProtocolError(
            f"an access reply answers REGION_READ or REGION_WRITE, not {type(request).__name__}"
        )
    return access_reply_wire(
        msg_id, request.COMMAND, request.offset, request.region, request.count, data=data
    )


def access_reply_wire(
    msg_id: int, command: int, offset: int, region: int, count: int, *, data: bytes
) -> bytes:
    """:func:`pack_access_reply` from the request's fields (the trapped-access fast path has
    no request object): header, the echoed head, then ``data`` -- exactly ``count`` bytes for
    a read (spec R10: QEMU fails the access otherwise), none for a write."""
    if command == _READ:
        if type(data) is not bytes:
            raise LocalProtocolError("REGION_READ reply data must be bytes")
        if len(data) != count:
            # Spec R10: QEMU fails an access whose reply is not exactly count bytes.
            raise LocalProtocolError(f"REGION_READ reply of {len(data)} bytes, {count} asked")
    elif data:
        raise LocalProtocolError("a REGION_WRITE reply carries no data")
    head = _pack_access_reply(
        msg_id,
        command,
        _ACCESS_REPLY_STRUCT.size + len(data),
        FLAG_TYPE_REPLY,
        0,
        offset,
        region,
        count,
    )
    return head + data if data else head
