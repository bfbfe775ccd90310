"""DEVICE_FEATURE (16) and MIG_DATA_READ (17) / MIG_DATA_WRITE (18) (spec vfio-user.md
§3.13, §3.14). QEMU 11.1.3 sends none of them; a server answers ENOTTY to features it does
not support. The typed feature payloads decode ``DeviceFeature.data``."""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from typing import ClassVar, Self

from protocol._fields import check_bytes, check_uint, exact_length, min_length, peer_input, require
from protocol.header import Command

FEATURE_STRUCT = struct.Struct("<II")  # argsz, flags (+ data)
MIG_DATA_STRUCT = struct.Struct("<II")  # argsz, size (+ data)
MIGRATION_FEATURE_STRUCT = struct.Struct("<Q")  # flags
MIG_STATE_STRUCT = struct.Struct("<II")  # device_state, data_fd
LOGGING_CONTROL_STRUCT = struct.Struct("<QII")  # page_size, num_ranges, reserved
LOGGING_RANGE_STRUCT = struct.Struct("<QQ")  # iova, length
LOGGING_REPORT_STRUCT = struct.Struct("<QQQ")  # iova, length, page_size (+ bitmap)


class FeatureFlags(enum.IntFlag):
    """``vfio_device_feature.flags``: low 16 bits are the feature id."""

    MASK = 0xFFFF
    GET = 1 << 16
    SET = 1 << 17
    PROBE = 1 << 18


class Feature(enum.IntEnum):
    """Feature ids used over vfio-user."""

    MIGRATION = 1
    MIG_DEVICE_STATE = 2
    DMA_LOGGING_START = 6
    DMA_LOGGING_STOP = 7
    DMA_LOGGING_REPORT = 8


class MigrationState(enum.IntEnum):
    """``vfio_device_mig_state``."""

    ERROR = 0
    STOP = 1
    RUNNING = 2
    STOP_COPY = 3
    RESUMING = 4
    RUNNING_P2P = 5
    PRE_COPY = 6
    PRE_COPY_P2P = 7


@dataclass(frozen=True, slots=True)
class DeviceFeature:
    """DEVICE_FEATURE request and reply: ``argsz, flags, data`` (spec §3.13).

    ``argsz`` is the payload room the requester offers for the reply; it must cover what it
    sends. One of GET/SET, or PROBE with either, both or neither: GET and SET together only
    with PROBE, as the kernel's ``vfio_ioctl_device_feature`` allows (asking whether both
    are supported).
    """

    COMMAND: ClassVar[Command] = Command.DEVICE_FEATURE

    argsz: int
    flags: int
    data: bytes = b""

    def __post_init__(self) -> None:
        check_uint(self, 32, "argsz", "flags")
        check_bytes(self, "data")
        known = FeatureFlags.MASK | FeatureFlags.GET | FeatureFlags.SET | FeatureFlags.PROBE
        require(self.flags & ~int(known) == 0, "unknown DEVICE_FEATURE flags")
        get, put = bool(self.flags & FeatureFlags.GET), bool(self.flags & FeatureFlags.SET)
        require(not (get and put) or self.probe, "DEVICE_FEATURE with GET and SET needs PROBE")
        require(get or put or self.probe, "DEVICE_FEATURE without GET, SET or PROBE")
        need = FEATURE_STRUCT.size + len(self.data)
        require(self.argsz >= need, f"DEVICE_FEATURE argsz {self.argsz} < {need}")

    @property
    def feature(self) -> int:
        """The feature id (low 16 bits of flags)."""
        return self.flags & FeatureFlags.MASK

    @property
    def get(self) -> bool:
        """GET is set."""
        return bool(self.flags & FeatureFlags.GET)

    @property
    def set(self) -> bool:
        """SET is set."""
        return bool(self.flags & FeatureFlags.SET)

    @property
    def probe(self) -> bool:
        """PROBE is set."""
        return bool(self.flags & FeatureFlags.PROBE)

    def pack(self) -> bytes:
        """Wire payload."""
        return FEATURE_STRUCT.pack(self.argsz, self.flags) + self.data

    @classmethod
    def unpack(cls, payload: bytes) -> Self:
        """Parse."""
        with peer_input("DEVICE_FEATURE"):
            min_length(payload, FEATURE_STRUCT.size, "DEVICE_FEATURE")
            argsz, flags = FEATURE_STRUCT.unpack_from(payload)
            return cls(argsz, flags, bytes(payload[FEATURE_STRUCT.size :]))


@dataclass(frozen=True, slots=True)
class MigrationFeature:
    """Feature MIGRATION (GET reply data): ``flags u64`` (STOP_COPY 1, P2P 2, PRE_COPY 4)."""

    flags: int

    def __post_init__(self) -> None:
        check_uint(self, 64, "flags")

    def pack(self) -> bytes:
        """Feature data."""
        return MIGRATION_FEATURE_STRUCT.pack(self.flags)

    @classmethod
    def unpack(cls, data: bytes) -> Self:
        """Parse feature data."""
        with peer_input("MIGRATION feature"):
            exact_length(data, MIGRATION_FEATURE_STRUCT.size, "MIGRATION feature")
            return cls(*MIGRATION_FEATURE_STRUCT.unpack(data))


@dataclass(frozen=True, slots=True)
class MigDeviceStateFeature:
    """Feature MIG_DEVICE_STATE: ``device_state u32, data_fd u32`` (data_fd unused)."""

    device_state: int
    data_fd: int = 0

    def __post_init__(self) -> None:
        check_uint(self, 32, "device_state", "data_fd")

    def pack(self) -> bytes:
        """Feature data."""
        return MIG_STATE_STRUCT.pack(self.device_state, self.data_fd)

    @classmethod
    def unpack(cls, data: bytes) -> Self:
        """Parse feature data."""
        with peer_input("MIG_DEVICE_STATE feature"):
            exact_length(data, MIG_STATE_STRUCT.size, "MIG_DEVICE_STATE feature")
            return cls(*MIG_STATE_STRUCT.unpack(data))


@dataclass(frozen=True, slots=True)
class DmaLoggingControl:
    """Features DMA_LOGGING_START / STOP: ``page_size``, ``(iova, length)`` ranges."""

    page_size: int
    ranges: tuple[tuple[int, int], ...] = ()

    def __post_init__(self) -> None:
        check_uint(self, 64, "page_size")
        require(isinstance(self.ranges, tuple) and len(self.ranges) < 1 << 32, "bad ranges")
        for rng in self.ranges:
            require(
                isinstance(rng, tuple)
                and len(rng) == 2
                and all(type(v) is int and 0 <= v < 1 << 64 for v in rng),
                "each range is a (u64 iova, u64 length) tuple",
            )

    def pack(self) -> bytes:
        """Feature data."""
        head = LOGGING_CONTROL_STRUCT.pack(self.page_size, len(self.ranges), 0)
        return head + b"".join(LOGGING_RANGE_STRUCT.pack(*r) for r in self.ranges)

    @classmethod
    def unpack(cls, data: bytes) -> Self:
        """Parse feature data."""
        with peer_input("DMA_LOGGING feature"):
            min_length(data, LOGGING_CONTROL_STRUCT.size, "DMA_LOGGING feature")
            page_size, num, _reserved = LOGGING_CONTROL_STRUCT.unpack_from(data)
            body = data[LOGGING_CONTROL_STRUCT.size :]
            exact_length(body, num * LOGGING_RANGE_STRUCT.size, "DMA_LOGGING ranges")
            ranges = tuple(
                LOGGING_RANGE_STRUCT.unpack_from(body, i * LOGGING_RANGE_STRUCT.size)
                for i in range(num)
            )
            return cls(page_size, ranges)


@dataclass(frozen=True, slots=True)
class DmaLoggingReport:
    """Feature DMA_LOGGING_REPORT: ``iova, length, page_size``; the GET reply appends the
    dirty bitmap."""

    iova: int
    length: int
    page_size: int
    bitmap: bytes = b""

    def __post_init__(self) -> None:
        check_uint(self, 64, "iova", "length", "page_size")
        check_bytes(self, "bitmap")

    def pack(self) -> bytes:
        """Feature data."""
        return LOGGING_REPORT_STRUCT.pack(self.iova, self.length, self.page_size) + self.bitmap

    @classmethod
    def unpack(cls, data: bytes) -> Self:
        """Parse feature data."""
        with peer_input("DMA_LOGGING_REPORT feature"):
            min_length(data, LOGGING_REPORT_STRUCT.size, "DMA_LOGGING_REPORT feature")
            iova, length, page_size = LOGGING_REPORT_STRUCT.unpack_from(data)
            return cls(iova, length, page_size, bytes(data[LOGGING_REPORT_STRUCT.size :]))


FeatureData = MigrationFeature | MigDeviceStateFeature | DmaLoggingControl | DmaLoggingReport


def decode_feature(message: DeviceFeature) -> FeatureData | None:
    """The typed payload of ``message``, or None for a PROBE, empty data or an unknown id.

    Raises the peer error (EINVAL) when the data does not match the feature's layout.
    """
    if message.probe or not message.data:
        return None
    feature = message.feature
    if feature == Feature.MIGRATION:
        return MigrationFeature.unpack(message.data)
    if feature == Feature.MIG_DEVICE_STATE:
        return MigDeviceStateFeature.unpack(message.data)
    if feature in (Feature.DMA_LOGGING_START, Feature.DMA_LOGGING_STOP):
        return DmaLoggingControl.unpack(message.data)
    if feature == Feature.DMA_LOGGING_REPORT:
        return DmaLoggingReport.unpack(message.data)
    return None


@dataclass(frozen=True, slots=True)
class MigDataRead:
    """MIG_DATA_READ request: ``argsz, size`` (read up to ``size`` bytes of device state)."""

    COMMAND: ClassVar[Command] = Command.MIG_DATA_READ

    argsz: int
    size: int

    def __post_init__(self) -> None:
        check_uint(self, 32, "argsz", "size")
        require(self.argsz >= MIG_DATA_STRUCT.size, f"argsz {self.argsz} < 8")

    def pack(self) -> bytes:
        """Wire payload."""
        return MIG_DATA_STRUCT.pack(self.argsz, self.size)

    @classmethod
    def unpack(cls, payload: bytes) -> Self:
        """Parse."""
        with peer_input("MIG_DATA_READ"):
            exact_length(payload, MIG_DATA_STRUCT.size, "MIG_DATA_READ")
            return cls(*MIG_DATA_STRUCT.unpack(payload))


@dataclass(frozen=True, slots=True)
class MigDataReadReply:
    """MIG_DATA_READ reply: ``argsz, size, data``; size < requested means end of stream."""

    COMMAND: ClassVar[Command] = Command.MIG_DATA_READ

    argsz: int
    size: int
    data: bytes

    def __post_init__(self) -> None:
        check_uint(self, 32, "argsz", "size")
        check_bytes(self, "data")
        require(len(self.data) == self.size, "MIG_DATA_READ reply data length != size")
        require(self.argsz == MIG_DATA_STRUCT.size + self.size, "MIG_DATA_READ reply argsz")

    def pack(self) -> bytes:
        """Wire payload."""
        return MIG_DATA_STRUCT.pack(self.argsz, self.size) + self.data

    @classmethod
    def unpack(cls, payload: bytes) -> Self:
        """Parse."""
        with peer_input("MIG_DATA_READ reply"):
            min_length(payload, MIG_DATA_STRUCT.size, "MIG_DATA_READ reply")
            argsz, size = MIG_DATA_STRUCT.unpack_from(payload)
            return cls(argsz, size, bytes(payload[MIG_DATA_STRUCT.size :]))


@dataclass(frozen=True, slots=True)
class MigDataWrite:
    """MIG_DATA_WRITE request: ``argsz, size, data``; the reply is header only."""

    COMMAND: ClassVar[Command] = Command.MIG_DATA_WRITE

    argsz: int
    size: int
    data: bytes

    def __post_init__(self) -> None:
        check_uint(self, 32, "argsz", "size")
        check_bytes(self, "data")
        require(len(self.data) == self.size, "MIG_DATA_WRITE data length != size")
        require(self.argsz == MIG_DATA_STRUCT.size + self.size, "MIG_DATA_WRITE argsz")

    def pack(self) -> bytes:
        """Wire payload."""
        return MIG_DATA_STRUCT.pack(self.argsz, self.size) + self.data

    @classmethod
    def unpack(cls, payload: bytes) -> Self:
        """Parse."""
        with peer_input("MIG_DATA_WRITE"):
            min_length(payload, MIG_DATA_STRUCT.size, "MIG_DATA_WRITE")
            argsz, size = MIG_DATA_STRUCT.unpack_from(payload)
            return cls(argsz, size, bytes(payload[MIG_DATA_STRUCT.size :]))
