"""What a connection hands out (events) and what it produces (``Outgoing``).

Every event that consumed a message carries the fds that arrived with it; from then on they
belong to the caller, who closes them (the protocol never closes anything).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Final, TypeAlias

from protocol._fields import slot_setters
from protocol.device import DeviceInfo, DeviceReset, IrqInfo, SetIrqs
from protocol.dma import (
    DmaMap,
    DmaReadReply,
    DmaReadRequest,
    DmaUnmap,
    DmaWriteReply,
    DmaWriteRequest,
    QemuDmaReadReply,
    QemuDmaReadRequest,
    QemuDmaWriteRequest,
)
from protocol.feature import DeviceFeature, MigDataRead, MigDataReadReply, MigDataWrite
from protocol.header import Command
from protocol.region_access import (
    RegionReadReply,
    RegionReadRequest,
    RegionWriteMulti,
    RegionWriteMultiReply,
    RegionWriteReply,
    RegionWriteRequest,
)
from protocol.region_info import RegionInfo, RegionInfoRequest, RegionIoFdsReply, RegionIoFdsRequest
from protocol.version import Version

#: Every request payload type.
RequestMessage: TypeAlias = (
    Version
    | DmaMap
    | DmaUnmap
    | DeviceInfo
    | RegionInfoRequest
    | RegionIoFdsRequest
    | IrqInfo
    | SetIrqs
    | RegionReadRequest
    | RegionWriteRequest
    | DmaReadRequest
    | DmaWriteRequest
    | QemuDmaReadRequest
    | QemuDmaWriteRequest
    | DeviceReset
    | RegionWriteMulti
    | DeviceFeature
    | MigDataRead
    | MigDataWrite
)

#: Every reply payload type; ``None`` stands for a header-only reply.
ReplyMessage: TypeAlias = (
    Version
    | DmaMap
    | DmaUnmap
    | DeviceInfo
    | RegionInfo
    | RegionIoFdsReply
    | IrqInfo
    | SetIrqs
    | RegionReadReply
    | RegionWriteReply
    | DmaReadReply
    | DmaWriteReply
    | QemuDmaReadReply
    | RegionWriteMultiReply
    | DeviceFeature
    | MigDataReadReply
    | None
)


@dataclass(frozen=True, slots=True)
class Outgoing:
    """Bytes to send, with ``fds`` on the first ``sendmsg`` (spec vfio-user.md §1).

    The fds are the caller's: SCM_RIGHTS sends copies and the caller keeps its own.
    """

    data: bytes
    fds: tuple[int, ...] = ()


class _NeedData(enum.Enum):
    NEED_DATA = "NEED_DATA"

    def __repr__(self) -> str:
        return "NEED_DATA"


#: ``next_event()`` needs more bytes (read ``bytes_wanted`` of them).
NEED_DATA: Final = _NeedData.NEED_DATA
NeedDataType: TypeAlias = _NeedData


@dataclass(frozen=True, slots=True)
class Request:
    """A valid request from the peer. Answer with ``send_reply``/``send_error`` unless
    ``no_reply``."""

    msg_id: int
    command: Command
    no_reply: bool
    message: RequestMessage
    fds: tuple[int, ...] = ()


_new = object.__new__
_out_data, _out_fds = slot_setters(Outgoing, "data", "fds")
_req_msg_id, _req_command, _req_no_reply, _req_message, _req_fds = slot_setters(
    Request, "msg_id", "command", "no_reply", "message", "fds"
)


def new_outgoing(data: bytes, fds: tuple[int, ...]) -> Outgoing:
    """``Outgoing(data, fds)`` for the connection's hot path (see ``slot_setters``)."""
    outgoing: Outgoing = _new(Outgoing)
    _out_data(outgoing, data)
    _out_fds(outgoing, fds)
    return outgoing


def new_request(
    msg_id: int, command: Command, no_reply: bool, message: RequestMessage, fds: tuple[int, ...]
) -> Request:
    """``Request(...)`` for the connection's hot path (see ``slot_setters``)."""
    request: Request = _new(Request)
    _req_msg_id(request, msg_id)
    _req_command(request, command)
    _req_no_reply(request, no_reply)
    _req_message(request, message)
    _req_fds(request, fds)
    return request


@dataclass(frozen=True, slots=True)
class Reply:
    """A successful reply to one of our requests; ``message`` is decoded knowing the request
    (``None`` = header-only reply). ``request`` is the message we sent."""

    msg_id: int
    command: Command
    message: ReplyMessage
    fds: tuple[int, ...] = ()
    request: RequestMessage | None = None


@dataclass(frozen=True, slots=True)
class ErrorReply:
    """One of our requests failed.

    Either the peer said so (ERROR flag, ``errno`` from the header, ``reason`` empty), or its
    reply could not be decoded (``errno`` EPROTO, ``reason`` says why; the stream is still in
    sync because the reply was well framed).
    """

    msg_id: int
    command: Command
    errno: int
    fds: tuple[int, ...] = ()
    reason: str = ""
    request: RequestMessage | None = None


@dataclass(frozen=True, slots=True)
class RejectedRequest:
    """A well-framed request that is invalid (bad payload, unknown command, wrong fd count,
    over a size limit, out of order).

    The body has been consumed and the stream is still good: close ``fds`` and answer with
    ``send_error(event, event.errno)`` -- it returns None when ``no_reply``.
    """

    msg_id: int
    command: int
    no_reply: bool
    errno: int
    reason: str
    fds: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class ConnectionClosed:
    """The peer closed the stream at a message boundary. Repeats on every later call.

    ``fds`` is always empty; it is there so every event can be handled alike.
    """

    fds: tuple[int, ...] = ()


Event: TypeAlias = Request | Reply | ErrorReply | RejectedRequest | ConnectionClosed
