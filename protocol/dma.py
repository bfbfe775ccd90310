"""DMA_MAP (2), DMA_UNMAP (3), and message-based DMA_READ (11) / DMA_WRITE (12).

DMA_READ/WRITE exist in two incompatible encodings (spec vfio-user.md §3.12):

* **spec layout** (``DmaReadRequest`` ...; libvfio-user uses it): ``address u64, count u64,
  data @16``; the WRITE reply echoes ``address, count``.
* **QEMU layout** (``QemuDmaReadRequest`` ...; what QEMU's client actually parses):
  ``offset u64, count u32, data @12`` in a struct padded to 16 bytes, so messages are
  ``32 + count`` bytes with 4 trailing pad bytes; the WRITE reply is header only.

The layout of a reply follows the request it answers; a client picks the layout of the
requests it receives when it is created.
"""

from __future__ import annotations

import enum
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

DMA_MAP_STRUCT = struct.Struct("<IIQQQ")  # argsz, flags, offset, address, size
DMA_UNMAP_STRUCT = struct.Struct("<IIQQ")  # argsz, flags, address, size
DIRTY_BITMAP_STRUCT = struct.Struct("<QQ")  # pgsize, size (then the bitmap bytes)
DMA_ACCESS_STRUCT = struct.Struct("<QQ")  # spec layout: address, count
QEMU_DMA_ACCESS_STRUCT = struct.Struct("<QI")  # QEMU layout: offset, count (data follows @12)
QEMU_DMA_PAD = 4  # QEMU's struct is padded to 16 bytes: 4 bytes trail the data


class DmaMapFlags(enum.IntFlag):
    """``vfio_user_dma_map.flags``."""

    READ = 1
    WRITE = 2


class DmaUnmapFlags(enum.IntFlag):
    """``vfio_user_dma_unmap.flags`` (spec §3.3: QEMU sends ALL; GET_DIRTY_BITMAP is v1)."""

    GET_DIRTY_BITMAP = 1
    ALL = 2


class DmaLayout(enum.Enum):
    """Which DMA_READ/DMA_WRITE encoding a client expects (spec §3.12)."""

    SPEC = "spec"
    QEMU = "qemu"


@dataclass(frozen=True, slots=True)
class DmaMap:
    """DMA_MAP request (32 bytes; argsz 32). The optional fd travels beside it."""

    COMMAND: ClassVar[Command] = Command.DMA_MAP

    flags: int
    offset: int
    address: int
    size: int

    def __post_init__(self) -> None:
        check_uint(self, 32, "flags")
        check_uint(self, 64, "offset", "address", "size")
        require(self.flags & ~int(DmaMapFlags.READ | DmaMapFlags.WRITE) == 0, "unknown map flags")
        require(self.size > 0, "DMA_MAP of size 0")
        require(no_overflow(self.address, self.size), "DMA_MAP address + size overflows")
        require(no_overflow(self.offset, self.size), "DMA_MAP offset + size overflows")

    def pack(self) -> bytes:
        """Wire payload."""
        return DMA_MAP_STRUCT.pack(
            DMA_MAP_STRUCT.size, self.flags, self.offset, self.address, self.size
        )

    @classmethod
    def unpack(cls, payload: bytes) -> Self:
        """Parse; argsz must be 32 (spec §3.2)."""
        with peer_input("DMA_MAP"):
            exact_length(payload, DMA_MAP_STRUCT.size, "DMA_MAP")
            argsz, flags, offset, address, size = DMA_MAP_STRUCT.unpack(payload)
            require(argsz == DMA_MAP_STRUCT.size, f"DMA_MAP argsz {argsz} != 32")
            return cls(flags, offset, address, size)


@dataclass(frozen=True, slots=True)
class DirtyBitmap:
    """The GET_DIRTY_BITMAP tail of DMA_UNMAP: empty ``data`` in a request, ``size`` bytes in
    the reply."""

    pgsize: int
    size: int
    data: bytes = b""

    def __post_init__(self) -> None:
        check_uint(self, 64, "pgsize", "size")
        check_bytes(self, "data")
        require(self.pgsize > 0, "bitmap pgsize must be > 0")
        require(len(self.data) in (0, self.size), "bitmap data length != bitmap size")


@dataclass(frozen=True, slots=True)
class DmaUnmap:
    """DMA_UNMAP request, and its optional echo reply (spec §3.3).

    ``argsz`` is derived: 24, plus 16 + bitmap size with GET_DIRTY_BITMAP (a received argsz
    may be larger: it is room for the reply, docs/interop/vfio-user.rst DMA_UNMAP; the
    sheet's §3.3 only says QEMU sends 24). QEMU quirk accepted:
    ``ALL`` with address = size = 0 unmaps everything (spec R15).
    """

    COMMAND: ClassVar[Command] = Command.DMA_UNMAP

    flags: int
    address: int
    size: int
    bitmap: DirtyBitmap | None = None

    def __post_init__(self) -> None:
        check_uint(self, 32, "flags")
        check_uint(self, 64, "address", "size")
        known = DmaUnmapFlags.GET_DIRTY_BITMAP | DmaUnmapFlags.ALL
        require(self.flags & ~int(known) == 0, "unknown unmap flags")
        want_bitmap = bool(self.flags & DmaUnmapFlags.GET_DIRTY_BITMAP)
        require(want_bitmap == (self.bitmap is not None), "bitmap iff GET_DIRTY_BITMAP")
        if self.flags & DmaUnmapFlags.ALL:
            require(not want_bitmap, "ALL cannot be combined with GET_DIRTY_BITMAP")
            require(self.address == 0 and self.size == 0, "ALL needs address = size = 0")
        else:
            require(self.size > 0, "DMA_UNMAP of size 0")
            require(no_overflow(self.address, self.size), "DMA_UNMAP address + size overflows")

    @property
    def argsz(self) -> int:
        """What ``argsz`` says on the wire."""
        if self.bitmap is None:
            return DMA_UNMAP_STRUCT.size
        return DMA_UNMAP_STRUCT.size + DIRTY_BITMAP_STRUCT.size + self.bitmap.size

    @property
    def unmap_all(self) -> bool:
        """The ALL flag is set."""
        return bool(self.flags & DmaUnmapFlags.ALL)

    def pack(self) -> bytes:
        """Wire payload."""
        head = DMA_UNMAP_STRUCT.pack(self.argsz, self.flags, self.address, self.size)
        if self.bitmap is None:
            return head
        return (
            head + DIRTY_BITMAP_STRUCT.pack(self.bitmap.pgsize, self.bitmap.size) + self.bitmap.data
        )

    @classmethod
    def unpack(cls, payload: bytes) -> Self:
        """Parse a request or an echo reply."""
        with peer_input("DMA_UNMAP"):
            min_length(payload, DMA_UNMAP_STRUCT.size, "DMA_UNMAP")
            argsz, flags, address, size = DMA_UNMAP_STRUCT.unpack_from(payload)
            bitmap = None
            if flags & DmaUnmapFlags.GET_DIRTY_BITMAP:
                min_length(payload, DMA_UNMAP_STRUCT.size + DIRTY_BITMAP_STRUCT.size, "DMA_UNMAP")
                pgsize, bsize = DIRTY_BITMAP_STRUCT.unpack_from(payload, DMA_UNMAP_STRUCT.size)
                data = payload[DMA_UNMAP_STRUCT.size + DIRTY_BITMAP_STRUCT.size :]
                bitmap = DirtyBitmap(pgsize, bsize, bytes(data))
            else:
                exact_length(payload, DMA_UNMAP_STRUCT.size, "DMA_UNMAP")
            message = cls(flags, address, size, bitmap)
            # argsz is the most reply payload the sender takes (docs/interop/vfio-user.rst
            # DMA_UNMAP; the sheet's §3.3 gives only QEMU's 24): at least the echo
            # (+ bitmap), more is room to spare, as for the kernel's argsz and libvfio-user's
            # is_valid_unmap.
            require(argsz >= message.argsz, f"DMA_UNMAP argsz {argsz} < {message.argsz}")
            return message


@dataclass(frozen=True, slots=True)
class DmaReadRequest:
    """DMA_READ request, spec layout (server -> client)."""

    COMMAND: ClassVar[Command] = Command.DMA_READ

    address: int
    count: int

    def __post_init__(self) -> None:
        check_uint(self, 64, "address", "count")
        require(no_overflow(self.address, self.count), "DMA_READ address + count overflows")

    def pack(self) -> bytes:
        """Wire payload."""
        return DMA_ACCESS_STRUCT.pack(self.address, self.count)

    @classmethod
    def unpack(cls, payload: bytes) -> Self:
        """Parse."""
        with peer_input("DMA_READ"):
            exact_length(payload, DMA_ACCESS_STRUCT.size, "DMA_READ")
            return cls(*DMA_ACCESS_STRUCT.unpack(payload))


@dataclass(frozen=True, slots=True)
class DmaReadReply:
    """DMA_READ reply, spec layout: ``address, count, data``."""

    COMMAND: ClassVar[Command] = Command.DMA_READ

    address: int
    count: int
    data: bytes

    def __post_init__(self) -> None:
        check_uint(self, 64, "address", "count")
        check_bytes(self, "data")
        require(len(self.data) == self.count, "DMA_READ reply data length != count")

    def pack(self) -> bytes:
        """Wire payload."""
        return DMA_ACCESS_STRUCT.pack(self.address, self.count) + self.data

    @classmethod
    def unpack(cls, payload: bytes) -> Self:
        """Parse."""
        with peer_input("DMA_READ reply"):
            min_length(payload, DMA_ACCESS_STRUCT.size, "DMA_READ reply")
            address, count = DMA_ACCESS_STRUCT.unpack_from(payload)
            return cls(address, count, bytes(payload[DMA_ACCESS_STRUCT.size :]))


@dataclass(frozen=True, slots=True)
class DmaWriteRequest:
    """DMA_WRITE request, spec layout: ``address, count, data``."""

    COMMAND: ClassVar[Command] = Command.DMA_WRITE

    address: int
    count: int
    data: bytes

    def __post_init__(self) -> None:
        check_uint(self, 64, "address", "count")
        check_bytes(self, "data")
        require(len(self.data) == self.count, "DMA_WRITE data length != count")
        require(no_overflow(self.address, self.count), "DMA_WRITE address + count overflows")

    def pack(self) -> bytes:
        """Wire payload."""
        return DMA_ACCESS_STRUCT.pack(self.address, self.count) + self.data

    @classmethod
    def unpack(cls, payload: bytes) -> Self:
        """Parse."""
        with peer_input("DMA_WRITE"):
            min_length(payload, DMA_ACCESS_STRUCT.size, "DMA_WRITE")
            address, count = DMA_ACCESS_STRUCT.unpack_from(payload)
            return cls(address, count, bytes(payload[DMA_ACCESS_STRUCT.size :]))


@dataclass(frozen=True, slots=True)
class DmaWriteReply:
    """DMA_WRITE reply, spec layout: ``address u64, count u64`` (libvfio-user's 16 bytes)."""

    COMMAND: ClassVar[Command] = Command.DMA_WRITE

    address: int
    count: int

    def __post_init__(self) -> None:
        check_uint(self, 64, "address", "count")

    def pack(self) -> bytes:
        """Wire payload."""
        return DMA_ACCESS_STRUCT.pack(self.address, self.count)

    @classmethod
    def unpack(cls, payload: bytes) -> Self:
        """Parse."""
        with peer_input("DMA_WRITE reply"):
            exact_length(payload, DMA_ACCESS_STRUCT.size, "DMA_WRITE reply")
            return cls(*DMA_ACCESS_STRUCT.unpack(payload))


@dataclass(frozen=True, slots=True)
class QemuDmaReadRequest:
    """DMA_READ request, QEMU layout: ``offset u64, count u32, pad u32`` (msg size 32)."""

    COMMAND: ClassVar[Command] = Command.DMA_READ

    offset: int
    count: int

    def __post_init__(self) -> None:
        check_uint(self, 64, "offset")
        check_uint(self, 32, "count")
        require(no_overflow(self.offset, self.count), "DMA_READ offset + count overflows")

    def pack(self) -> bytes:
        """Wire payload."""
        return QEMU_DMA_ACCESS_STRUCT.pack(self.offset, self.count) + bytes(QEMU_DMA_PAD)

    @classmethod
    def unpack(cls, payload: bytes) -> Self:
        """Parse (QEMU requires the full padded 16 bytes)."""
        with peer_input("DMA_READ"):
            exact_length(payload, QEMU_DMA_ACCESS_STRUCT.size + QEMU_DMA_PAD, "DMA_READ")
            return cls(*QEMU_DMA_ACCESS_STRUCT.unpack_from(payload))


@dataclass(frozen=True, slots=True)
class QemuDmaReadReply:
    """DMA_READ reply, QEMU layout: ``offset, count u32, data @12``, then 4 zero bytes."""

    COMMAND: ClassVar[Command] = Command.DMA_READ

    offset: int
    count: int
    data: bytes

    def __post_init__(self) -> None:
        check_uint(self, 64, "offset")
        check_uint(self, 32, "count")
        check_bytes(self, "data")
        require(len(self.data) == self.count, "DMA_READ reply data length != count")

    def pack(self) -> bytes:
        """Wire payload."""
        head = QEMU_DMA_ACCESS_STRUCT.pack(self.offset, self.count)
        return head + self.data + bytes(QEMU_DMA_PAD)

    @classmethod
    def unpack(cls, payload: bytes) -> Self:
        """Parse; the trailing pad may be absent."""
        with peer_input("DMA_READ reply"):
            return cls(*_qemu_data(payload, "DMA_READ reply"))


@dataclass(frozen=True, slots=True)
class QemuDmaWriteRequest:
    """DMA_WRITE request, QEMU layout: ``offset, count u32, data @12``, then 4 pad bytes."""

    COMMAND: ClassVar[Command] = Command.DMA_WRITE

    offset: int
    count: int
    data: bytes

    def __post_init__(self) -> None:
        check_uint(self, 64, "offset")
        check_uint(self, 32, "count")
        check_bytes(self, "data")
        require(len(self.data) == self.count, "DMA_WRITE data length != count")
        require(no_overflow(self.offset, self.count), "DMA_WRITE offset + count overflows")

    def pack(self) -> bytes:
        """Wire payload; QEMU rejects ``count > size - 32``, hence the pad (spec §3.12)."""
        head = QEMU_DMA_ACCESS_STRUCT.pack(self.offset, self.count)
        return head + self.data + bytes(QEMU_DMA_PAD)

    @classmethod
    def unpack(cls, payload: bytes) -> Self:
        """Parse; the trailing pad may be absent."""
        with peer_input("DMA_WRITE"):
            return cls(*_qemu_data(payload, "DMA_WRITE"))


def _qemu_data(payload: bytes, what: str) -> tuple[int, int, bytes]:
    min_length(payload, QEMU_DMA_ACCESS_STRUCT.size, what)
    offset, count = QEMU_DMA_ACCESS_STRUCT.unpack_from(payload)
    start = QEMU_DMA_ACCESS_STRUCT.size
    extra = len(payload) - start - count
    require(0 <= extra <= QEMU_DMA_PAD, f"{what}: {len(payload)} bytes for count {count}")
    return offset, count, bytes(payload[start : start + count])
