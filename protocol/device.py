"""DEVICE_GET_INFO (4), DEVICE_GET_IRQ_INFO (7), DEVICE_SET_IRQS (8), DEVICE_RESET (13)."""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from typing import ClassVar, Self

from protocol._fields import check_bytes, check_uint, exact_length, min_length, peer_input, require
from protocol.header import Command

DEVICE_INFO_STRUCT = struct.Struct("<IIII")  # argsz, flags, num_regions, num_irqs
IRQ_INFO_STRUCT = struct.Struct("<IIII")  # argsz, flags, index, count
IRQ_SET_STRUCT = struct.Struct("<IIIII")  # argsz, flags, index, start, count (+ data)


class DeviceInfoFlags(enum.IntFlag):
    """``vfio_device_info.flags`` (spec §4)."""

    RESET = 1 << 0
    PCI = 1 << 1
    CAPS = 1 << 7


class IrqInfoFlags(enum.IntFlag):
    """``vfio_irq_info.flags``."""

    EVENTFD = 1
    MASKABLE = 2
    AUTOMASKED = 4
    NORESIZE = 8


class SetIrqsFlags(enum.IntFlag):
    """``vfio_irq_set.flags``: one data type and one action (spec §3.8)."""

    DATA_NONE = 1
    DATA_BOOL = 2
    DATA_EVENTFD = 4
    ACTION_MASK = 8
    ACTION_UNMASK = 16
    ACTION_TRIGGER = 32


DATA_TYPE_MASK = SetIrqsFlags.DATA_NONE | SetIrqsFlags.DATA_BOOL | SetIrqsFlags.DATA_EVENTFD
ACTION_TYPE_MASK = (
    SetIrqsFlags.ACTION_MASK | SetIrqsFlags.ACTION_UNMASK | SetIrqsFlags.ACTION_TRIGGER
)


@dataclass(frozen=True, slots=True)
class DeviceInfo:
    """DEVICE_GET_INFO request and reply (16 bytes each, spec §3.4)."""

    COMMAND: ClassVar[Command] = Command.DEVICE_GET_INFO

    argsz: int
    flags: int = 0
    num_regions: int = 0
    num_irqs: int = 0

    def __post_init__(self) -> None:
        check_uint(self, 32, "argsz", "flags", "num_regions", "num_irqs")
        require(self.argsz >= DEVICE_INFO_STRUCT.size, f"argsz {self.argsz} < 16")

    def pack(self) -> bytes:
        """Wire payload."""
        return DEVICE_INFO_STRUCT.pack(self.argsz, self.flags, self.num_regions, self.num_irqs)

    @classmethod
    def unpack(cls, payload: bytes) -> Self:
        """Parse."""
        with peer_input("DEVICE_GET_INFO"):
            exact_length(payload, DEVICE_INFO_STRUCT.size, "DEVICE_GET_INFO")
            return cls(*DEVICE_INFO_STRUCT.unpack(payload))


@dataclass(frozen=True, slots=True)
class IrqInfo:
    """DEVICE_GET_IRQ_INFO request and reply (16 bytes each, spec §3.7)."""

    COMMAND: ClassVar[Command] = Command.DEVICE_GET_IRQ_INFO

    argsz: int
    flags: int = 0
    index: int = 0
    count: int = 0

    def __post_init__(self) -> None:
        check_uint(self, 32, "argsz", "flags", "index", "count")
        require(self.argsz >= IRQ_INFO_STRUCT.size, f"argsz {self.argsz} < 16")

    def pack(self) -> bytes:
        """Wire payload."""
        return IRQ_INFO_STRUCT.pack(self.argsz, self.flags, self.index, self.count)

    @classmethod
    def unpack(cls, payload: bytes) -> Self:
        """Parse."""
        with peer_input("DEVICE_GET_IRQ_INFO"):
            exact_length(payload, IRQ_INFO_STRUCT.size, "DEVICE_GET_IRQ_INFO")
            return cls(*IRQ_INFO_STRUCT.unpack(payload))


@dataclass(frozen=True, slots=True)
class SetIrqs:
    """DEVICE_SET_IRQS request (spec §3.8, R9).

    Accepted QEMU forms: DATA_EVENTFD with 0 fds (de-assign, including count 1 for ERR),
    DATA_NONE|TRIGGER with count 0 (disable every vector). ``data`` is only for DATA_BOOL:
    ``count`` bytes of 0/1. Eventfds travel as fds, never in the payload; the fd-count rule
    (``nfds == count`` or 0) is checked by the connection, which sees the fds.
    """

    COMMAND: ClassVar[Command] = Command.DEVICE_SET_IRQS

    argsz: int
    flags: int
    index: int
    start: int
    count: int
    data: bytes = b""

    def __post_init__(self) -> None:
        check_uint(self, 32, "argsz", "flags", "index", "start", "count")
        check_bytes(self, "data")
        require(self.argsz == IRQ_SET_STRUCT.size + len(self.data), "SET_IRQS argsz mismatch")
        require(self.flags & ~int(DATA_TYPE_MASK | ACTION_TYPE_MASK) == 0, "unknown SET_IRQS flags")
        require(_one_bit(self.flags & DATA_TYPE_MASK), "SET_IRQS needs exactly one data type")
        require(_one_bit(self.flags & ACTION_TYPE_MASK), "SET_IRQS needs exactly one action")
        require(self.start + self.count < 1 << 32, "SET_IRQS start + count overflows")
        if self.count == 0:
            # Only "disable all" may name no vector (libvfio-user's rule, spec §3.8).
            require(
                self.data_type == SetIrqsFlags.DATA_NONE
                and self.action == SetIrqsFlags.ACTION_TRIGGER,
                "SET_IRQS count 0 needs DATA_NONE|ACTION_TRIGGER",
            )
        if self.data_type == SetIrqsFlags.DATA_BOOL:
            require(len(self.data) == self.count, "DATA_BOOL needs count bytes of data")
            require(all(b in (0, 1) for b in self.data), "DATA_BOOL bytes must be 0 or 1")
        else:
            require(not self.data, "only DATA_BOOL carries data")

    @property
    def data_type(self) -> SetIrqsFlags:
        """DATA_NONE, DATA_BOOL or DATA_EVENTFD."""
        return SetIrqsFlags(self.flags & DATA_TYPE_MASK)

    @property
    def action(self) -> SetIrqsFlags:
        """ACTION_MASK, ACTION_UNMASK or ACTION_TRIGGER."""
        return SetIrqsFlags(self.flags & ACTION_TYPE_MASK)

    @property
    def bools(self) -> tuple[bool, ...]:
        """The DATA_BOOL values (empty for other data types)."""
        return tuple(bool(b) for b in self.data)

    def pack(self) -> bytes:
        """Wire payload."""
        head = IRQ_SET_STRUCT.pack(self.argsz, self.flags, self.index, self.start, self.count)
        return head + self.data

    @classmethod
    def build(cls, flags: int, index: int, start: int, count: int, data: bytes = b"") -> SetIrqs:
        """Construct with the right ``argsz``."""
        return cls(IRQ_SET_STRUCT.size + len(data), flags, index, start, count, data)

    @classmethod
    def unpack(cls, payload: bytes) -> Self:
        """Parse."""
        with peer_input("DEVICE_SET_IRQS"):
            min_length(payload, IRQ_SET_STRUCT.size, "DEVICE_SET_IRQS")
            argsz, flags, index, start, count = IRQ_SET_STRUCT.unpack_from(payload)
            data = bytes(payload[IRQ_SET_STRUCT.size :])
            return cls(argsz, flags, index, start, count, data)


@dataclass(frozen=True, slots=True)
class DeviceReset:
    """DEVICE_RESET request: no payload (spec §3.10)."""

    COMMAND: ClassVar[Command] = Command.DEVICE_RESET

    def pack(self) -> bytes:
        """Wire payload (empty)."""
        return b""

    @classmethod
    def unpack(cls, payload: bytes) -> Self:
        """Parse: the payload must be empty."""
        with peer_input("DEVICE_RESET"):
            exact_length(payload, 0, "DEVICE_RESET")
            return cls()


def _one_bit(value: int) -> bool:
    return value != 0 and value & (value - 1) == 0
