"""DEVICE_GET_REGION_INFO (5) with its capability chain, and DEVICE_GET_REGION_IO_FDS (6).

Region-info replies follow the small-argsz rule (spec vfio-user.md §3.5, R5, R6): when the
full info does not fit the request's ``argsz``, the reply is the bare 32-byte struct with
``argsz`` = the size needed, CAPS clear and no caps; the client then asks again.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from typing import ClassVar, Self

from protocol._fields import check_uint, exact_length, min_length, peer_input, require
from protocol.errors import LocalProtocolError
from protocol.header import Command

REGION_INFO_STRUCT = struct.Struct("<IIIIQQ")  # argsz, flags, index, cap_offset, size, offset
CAP_HEADER_STRUCT = struct.Struct("<HHI")  # id, version, next
SPARSE_HEAD_STRUCT = struct.Struct("<II")  # nr_areas, reserved
SPARSE_AREA_STRUCT = struct.Struct("<QQ")  # offset, size
TYPE_CAP_STRUCT = struct.Struct("<II")  # type, subtype
IO_FDS_STRUCT = struct.Struct("<IIII")  # argsz, flags, index, count
IO_FD_ENTRY_STRUCT = struct.Struct("<QQIIIIQ")  # offset, size, fd_index, type, flags, pad, data
# Bounds a peer's chain walk; real chains hold 1-2 caps.
MAX_CAPS = 64


class RegionInfoFlags(enum.IntFlag):
    """``vfio_region_info.flags``."""

    READ = 1
    WRITE = 2
    MMAP = 4
    CAPS = 8


class CapId(enum.IntEnum):
    """Region-info capability ids (spec §4)."""

    SPARSE_MMAP = 1
    TYPE = 2
    MSIX_MAPPABLE = 3


@dataclass(frozen=True, slots=True)
class SparseMmapCap:
    """Sparse mmap areas ``(offset, size)`` relative to the region (id 1, version 1)."""

    areas: tuple[tuple[int, int], ...]

    CAP_ID: ClassVar[int] = CapId.SPARSE_MMAP
    VERSION: ClassVar[int] = 1

    def __post_init__(self) -> None:
        require(isinstance(self.areas, tuple), "areas must be a tuple")
        for area in self.areas:
            require(
                isinstance(area, tuple)
                and len(area) == 2
                and all(type(v) is int and 0 <= v < 1 << 64 for v in area),
                "each sparse area is a (u64 offset, u64 size) tuple",
            )

    def body(self) -> bytes:
        """Bytes after the 8-byte cap header."""
        parts = [SPARSE_HEAD_STRUCT.pack(len(self.areas), 0)]
        parts += [SPARSE_AREA_STRUCT.pack(off, size) for off, size in self.areas]
        return b"".join(parts)

    @classmethod
    def from_body(cls, body: bytes) -> SparseMmapCap:
        """Parse the bytes after the cap header (``body`` may run on past the cap)."""
        min_length(body, SPARSE_HEAD_STRUCT.size, "sparse mmap cap")
        (count, _reserved) = SPARSE_HEAD_STRUCT.unpack_from(body)
        need = SPARSE_HEAD_STRUCT.size + count * SPARSE_AREA_STRUCT.size
        min_length(body, need, "sparse mmap cap")
        areas = tuple(
            SPARSE_AREA_STRUCT.unpack_from(body, SPARSE_HEAD_STRUCT.size + i * 16)
            for i in range(count)
        )
        return cls(areas)


@dataclass(frozen=True, slots=True)
class TypeCap:
    """Region type/subtype for device-specific regions (id 2, version 1)."""

    type: int
    subtype: int

    CAP_ID: ClassVar[int] = CapId.TYPE
    VERSION: ClassVar[int] = 1

    def __post_init__(self) -> None:
        check_uint(self, 32, "type", "subtype")

    def body(self) -> bytes:
        """Bytes after the 8-byte cap header."""
        return TYPE_CAP_STRUCT.pack(self.type, self.subtype)

    @classmethod
    def from_body(cls, body: bytes) -> TypeCap:
        """Parse the bytes after the cap header."""
        min_length(body, TYPE_CAP_STRUCT.size, "type cap")
        return cls(*TYPE_CAP_STRUCT.unpack_from(body))


@dataclass(frozen=True, slots=True)
class MsixMappableCap:
    """The MSI-X table page may stay mmapped (id 3, version 1, header only)."""

    CAP_ID: ClassVar[int] = CapId.MSIX_MAPPABLE
    VERSION: ClassVar[int] = 1

    def body(self) -> bytes:
        """Bytes after the 8-byte cap header (none)."""
        return b""


Cap = SparseMmapCap | TypeCap | MsixMappableCap


def _cap_size(cap: Cap) -> int:
    return CAP_HEADER_STRUCT.size + len(cap.body())


def caps_size(caps: tuple[Cap, ...]) -> int:
    """Bytes the chain takes after the 32-byte struct."""
    return sum(_cap_size(cap) for cap in caps)


@dataclass(frozen=True, slots=True)
class RegionInfoRequest:
    """DEVICE_GET_REGION_INFO request (32 bytes; ``argsz`` = room for the reply payload)."""

    COMMAND: ClassVar[Command] = Command.DEVICE_GET_REGION_INFO

    argsz: int
    index: int

    def __post_init__(self) -> None:
        check_uint(self, 32, "argsz", "index")
        require(self.argsz >= REGION_INFO_STRUCT.size, f"argsz {self.argsz} < 32")

    def pack(self) -> bytes:
        """Wire payload (flags, cap_offset, size, offset are 0 in a request)."""
        return REGION_INFO_STRUCT.pack(self.argsz, 0, self.index, 0, 0, 0)

    @classmethod
    def unpack(cls, payload: bytes) -> Self:
        """Parse; the output-only fields are ignored."""
        with peer_input("DEVICE_GET_REGION_INFO"):
            exact_length(payload, REGION_INFO_STRUCT.size, "DEVICE_GET_REGION_INFO")
            argsz, _flags, index, _cap, _size, _offset = REGION_INFO_STRUCT.unpack(payload)
            return cls(argsz, index)


@dataclass(frozen=True, slots=True)
class RegionInfo:
    """DEVICE_GET_REGION_INFO reply: ``vfio_region_info`` plus a capability chain.

    With caps, they are laid out back to back from ``cap_offset`` and ``argsz`` is the total
    (R6: cap_offset >= 32, ``next`` offsets from the struct start, 0 ends the chain). Without
    caps the payload is the 32-byte struct and ``argsz`` may be larger: the size the full
    info needs (the small-argsz rule).
    """

    COMMAND: ClassVar[Command] = Command.DEVICE_GET_REGION_INFO

    argsz: int
    flags: int
    index: int
    cap_offset: int
    size: int
    offset: int
    caps: tuple[Cap, ...] = ()

    def __post_init__(self) -> None:
        check_uint(self, 32, "argsz", "flags", "index", "cap_offset")
        check_uint(self, 64, "size", "offset")
        require(isinstance(self.caps, tuple), "caps must be a tuple")
        require(self.argsz >= REGION_INFO_STRUCT.size, f"argsz {self.argsz} < 32")
        if self.caps:
            require(len(self.caps) <= MAX_CAPS, "too many region caps")
            require(bool(self.flags & RegionInfoFlags.CAPS), "caps without the CAPS flag")
            require(self.cap_offset >= REGION_INFO_STRUCT.size, "cap_offset < 32")
            total = self.cap_offset + caps_size(self.caps)
            require(self.argsz == total, f"argsz {self.argsz} != {total} with caps")

    @property
    def sparse_areas(self) -> tuple[tuple[int, int], ...] | None:
        """The sparse-mmap areas, or None without that cap."""
        for cap in self.caps:
            if isinstance(cap, SparseMmapCap):
                return cap.areas
        return None

    def pack(self) -> bytes:
        """Wire payload."""
        head = REGION_INFO_STRUCT.pack(
            self.argsz, self.flags, self.index, self.cap_offset, self.size, self.offset
        )
        if not self.caps:
            return head
        parts = [head, bytes(self.cap_offset - REGION_INFO_STRUCT.size)]
        at = self.cap_offset
        for i, cap in enumerate(self.caps):
            body = cap.body()
            end = at + CAP_HEADER_STRUCT.size + len(body)
            nxt = end if i + 1 < len(self.caps) else 0
            parts.append(CAP_HEADER_STRUCT.pack(cap.CAP_ID, cap.VERSION, nxt) + body)
            at = end
        return b"".join(parts)

    @classmethod
    def unpack(cls, payload: bytes) -> Self:
        """Parse a reply. A bare struct whose argsz asks for more carries no caps."""
        with peer_input("DEVICE_GET_REGION_INFO reply"):
            min_length(payload, REGION_INFO_STRUCT.size, "region info")
            argsz, flags, index, cap_offset, size, offset = REGION_INFO_STRUCT.unpack_from(payload)
            if len(payload) == REGION_INFO_STRUCT.size:
                # Either no caps, or the truncated form (a server may leave CAPS set there:
                # the caps are simply absent and the client asks again with argsz).
                return cls(argsz, flags, index, cap_offset, size, offset)
            require(bool(flags & RegionInfoFlags.CAPS), "trailing bytes without CAPS flag")
            require(argsz == len(payload), f"argsz {argsz} != payload length {len(payload)}")
            caps = _parse_chain(payload, cap_offset)
            return cls(argsz, flags, index, cap_offset, size, offset, caps)


def _parse_chain(payload: bytes, first: int) -> tuple[Cap, ...]:
    caps: list[Cap] = []
    at = first
    expected = first
    while at:
        require(len(caps) < MAX_CAPS, "region cap chain too long")
        # Caps must be contiguous: pack() lays them out that way and anything else (gaps,
        # loops, backward pointers) is refused rather than walked.
        require(at == expected, f"region cap at {at}, expected {expected}")
        require(at + CAP_HEADER_STRUCT.size <= len(payload), "region cap header out of bounds")
        cap_id, version, nxt = CAP_HEADER_STRUCT.unpack_from(payload, at)
        end = nxt if nxt else len(payload)
        require(end > at, "region cap next pointer goes backwards")
        body = payload[at + CAP_HEADER_STRUCT.size : end]
        cap: Cap
        if cap_id == CapId.SPARSE_MMAP:
            cap = SparseMmapCap.from_body(body)
        elif cap_id == CapId.TYPE:
            cap = TypeCap.from_body(body)
        elif cap_id == CapId.MSIX_MAPPABLE:
            cap = MsixMappableCap()
        else:
            # Refused rather than skipped: QEMU only knows these three either (spec §3.5).
            raise LocalProtocolError(f"unknown region cap id {cap_id}")
        require(version == cap.VERSION, f"region cap {cap_id} version {version}")
        require(_cap_size(cap) == end - at, f"region cap {cap_id} size mismatch")
        caps.append(cap)
        expected = end
        at = nxt
    require(expected == len(payload), "bytes after the last region cap")
    return tuple(caps)


def build_region_info_reply(  # noqa: PLR0917 (the daemon's agreed signature)
    request_argsz: int,
    index: int,
    flags: int,
    size: int,
    offset: int,
    caps: tuple[Cap, ...] = (),
) -> RegionInfo:
    """The reply to a region-info request with ``argsz`` = ``request_argsz``.

    If the full info (32 + caps) is larger than ``request_argsz``: the bare 32-byte struct,
    ``argsz`` = bytes needed, CAPS flag and caps dropped (spec R5/R6). The caller should then
    attach no fd either (libvfio-user sends it only with the full reply; QEMU re-asks).
    """
    # int(): ~ on an IntFlag would also clear every bit the enum does not name.
    flags &= ~int(RegionInfoFlags.CAPS)
    if not caps:
        return RegionInfo(REGION_INFO_STRUCT.size, flags, index, 0, size, offset)
    needed = REGION_INFO_STRUCT.size + caps_size(caps)
    if needed > request_argsz:
        return RegionInfo(needed, flags, index, 0, size, offset)
    return RegionInfo(
        needed, flags | RegionInfoFlags.CAPS, index, REGION_INFO_STRUCT.size, size, offset, caps
    )


@dataclass(frozen=True, slots=True)
class RegionIoFdsRequest:
    """DEVICE_GET_REGION_IO_FDS request (16 bytes; flags and count are 0, spec §3.6)."""

    COMMAND: ClassVar[Command] = Command.DEVICE_GET_REGION_IO_FDS

    argsz: int
    index: int

    def __post_init__(self) -> None:
        check_uint(self, 32, "argsz", "index")
        require(self.argsz >= IO_FDS_STRUCT.size, f"argsz {self.argsz} < 16")

    def pack(self) -> bytes:
        """Wire payload."""
        return IO_FDS_STRUCT.pack(self.argsz, 0, self.index, 0)

    @classmethod
    def unpack(cls, payload: bytes) -> Self:
        """Parse."""
        with peer_input("DEVICE_GET_REGION_IO_FDS"):
            exact_length(payload, IO_FDS_STRUCT.size, "DEVICE_GET_REGION_IO_FDS")
            argsz, flags, index, count = IO_FDS_STRUCT.unpack(payload)
            require(flags == 0 and count == 0, "flags and count must be 0 in the request")
            return cls(argsz, index)


@dataclass(frozen=True, slots=True)
class IoFdEntry:
    """One sub-region of a GET_REGION_IO_FDS reply, spec's 40-byte layout."""

    offset: int
    size: int
    fd_index: int
    type: int
    flags: int
    datamatch: int

    def __post_init__(self) -> None:
        check_uint(self, 64, "offset", "size", "datamatch")
        check_uint(self, 32, "fd_index", "type", "flags")


@dataclass(frozen=True, slots=True)
class RegionIoFdsReply:
    """DEVICE_GET_REGION_IO_FDS reply. ``entries`` is empty in the too-small-argsz form."""

    COMMAND: ClassVar[Command] = Command.DEVICE_GET_REGION_IO_FDS

    argsz: int
    flags: int
    index: int
    count: int
    entries: tuple[IoFdEntry, ...] = ()

    def __post_init__(self) -> None:
        check_uint(self, 32, "argsz", "flags", "index", "count")
        require(isinstance(self.entries, tuple), "entries must be a tuple")
        require(len(self.entries) in (0, self.count), "entries length != count")
        needed = IO_FDS_STRUCT.size + self.count * IO_FD_ENTRY_STRUCT.size
        require(self.argsz == needed, f"argsz {self.argsz} != {needed}")

    def pack(self) -> bytes:
        """Wire payload."""
        head = IO_FDS_STRUCT.pack(self.argsz, self.flags, self.index, self.count)
        return head + b"".join(
            IO_FD_ENTRY_STRUCT.pack(e.offset, e.size, e.fd_index, e.type, e.flags, 0, e.datamatch)
            for e in self.entries
        )

    @classmethod
    def unpack(cls, payload: bytes) -> Self:
        """Parse."""
        with peer_input("DEVICE_GET_REGION_IO_FDS reply"):
            min_length(payload, IO_FDS_STRUCT.size, "region io fds")
            argsz, flags, index, count = IO_FDS_STRUCT.unpack_from(payload)
            body = payload[IO_FDS_STRUCT.size :]
            entries: tuple[IoFdEntry, ...] = ()
            if body:
                exact_length(body, count * IO_FD_ENTRY_STRUCT.size, "region io fds entries")
                entries = tuple(
                    _entry(IO_FD_ENTRY_STRUCT.unpack_from(body, i * IO_FD_ENTRY_STRUCT.size))
                    for i in range(count)
                )
            return cls(argsz, flags, index, count, entries)


def _entry(fields: tuple[int, ...]) -> IoFdEntry:
    offset, size, fd_index, kind, flags, _pad, datamatch = fields
    return IoFdEntry(offset, size, fd_index, kind, flags, datamatch)
