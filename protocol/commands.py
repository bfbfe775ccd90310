"""Per-command rules: which payload type decodes a request or a reply, which messages may
carry fds, and which fields are bounded by ``max_data_xfer_size``.

One table per concern, keyed by command or by the request's payload type, used for both
directions: what we send is checked with the same rules we apply to what we receive
(a violation on send is our bug, :class:`LocalProtocolError`; on receive the peer's,
:class:`RemoteProtocolError`).
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from typing import Any

from protocol._fields import peer_input, require
from protocol.device import DeviceInfo, DeviceReset, IrqInfo, SetIrqs, SetIrqsFlags
from protocol.dma import (
    DmaLayout,
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
from protocol.events import ReplyMessage, RequestMessage
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

_Decoder = Callable[[bytes], RequestMessage]

#: Request payload decoders. DMA_READ/DMA_WRITE depend on the layout (spec §3.12).
REQUEST_DECODERS: dict[Command, _Decoder] = {
    Command.VERSION: Version.unpack,
    Command.DMA_MAP: DmaMap.unpack,
    Command.DMA_UNMAP: DmaUnmap.unpack,
    Command.DEVICE_GET_INFO: DeviceInfo.unpack,
    Command.DEVICE_GET_REGION_INFO: RegionInfoRequest.unpack,
    Command.DEVICE_GET_REGION_IO_FDS: RegionIoFdsRequest.unpack,
    Command.DEVICE_GET_IRQ_INFO: IrqInfo.unpack,
    Command.DEVICE_SET_IRQS: SetIrqs.unpack,
    Command.REGION_READ: RegionReadRequest.unpack,
    Command.REGION_WRITE: RegionWriteRequest.unpack,
    Command.DEVICE_RESET: DeviceReset.unpack,
    Command.REGION_WRITE_MULTI: RegionWriteMulti.unpack,
    Command.DEVICE_FEATURE: DeviceFeature.unpack,
    Command.MIG_DATA_READ: MigDataRead.unpack,
    Command.MIG_DATA_WRITE: MigDataWrite.unpack,
}
DMA_REQUEST_DECODERS: dict[DmaLayout, dict[Command, _Decoder]] = {
    DmaLayout.SPEC: {
        Command.DMA_READ: DmaReadRequest.unpack,
        Command.DMA_WRITE: DmaWriteRequest.unpack,
    },
    DmaLayout.QEMU: {
        Command.DMA_READ: QemuDmaReadRequest.unpack,
        Command.DMA_WRITE: QemuDmaWriteRequest.unpack,
    },
}


def decode_request(command: Command, payload: bytes, layout: DmaLayout) -> RequestMessage:
    """Decode a request payload; raises the peer error (non-fatal) when invalid."""
    decoder = REQUEST_DECODERS.get(command) or DMA_REQUEST_DECODERS[layout][command]
    return decoder(payload)


def _empty_or(
    decoder: Callable[[bytes], ReplyMessage],
) -> Callable[[Any, bytes], ReplyMessage]:
    # Header-only is the normal reply; libvfio-user echoes the request struct instead
    # (captures README "s2c"), which QEMU accepts within its size caps (spec §1).
    def decode(_request: Any, payload: bytes) -> ReplyMessage:
        return None if not payload else decoder(payload)

    return decode


def _empty(_request: Any, payload: bytes) -> ReplyMessage:
    with peer_input("header-only reply"):
        require(not payload, f"expected a header-only reply, got {len(payload)} bytes")
    return None


def _within(limit: int, payload: bytes, what: str) -> None:
    with peer_input(what):
        require(len(payload) <= limit, f"{what} of {len(payload)} bytes exceeds argsz {limit}")


def _region_info(request: RegionInfoRequest, payload: bytes) -> ReplyMessage:
    # QEMU sizes its buffer to 16 + argsz: a longer reply desyncs it (spec R5).
    _within(request.argsz, payload, "region info reply")
    return RegionInfo.unpack(payload)


def _io_fds(request: RegionIoFdsRequest, payload: bytes) -> ReplyMessage:
    _within(request.argsz, payload, "region io fds reply")
    return RegionIoFdsReply.unpack(payload)


def _region_read(request: RegionReadRequest, payload: bytes) -> ReplyMessage:
    reply = RegionReadReply.unpack(payload)
    with peer_input("REGION_READ reply"):
        # Exactly count bytes (spec R10); QEMU reports anything else as a failed access.
        require(reply.count == request.count, f"read {reply.count} bytes of {request.count}")
    return reply


def _dma_read(request: DmaReadRequest, payload: bytes) -> ReplyMessage:
    reply = DmaReadReply.unpack(payload)
    with peer_input("DMA_READ reply"):
        require(reply.count == request.count, f"read {reply.count} bytes of {request.count}")
    return reply


def _qemu_dma_read(request: QemuDmaReadRequest, payload: bytes) -> ReplyMessage:
    reply = QemuDmaReadReply.unpack(payload)
    with peer_input("DMA_READ reply"):
        require(reply.count == request.count, f"read {reply.count} bytes of {request.count}")
    return reply


def _feature(request: DeviceFeature, payload: bytes) -> ReplyMessage:
    _within(request.argsz, payload, "DEVICE_FEATURE reply")
    return DeviceFeature.unpack(payload)


def _mig_read(request: MigDataRead, payload: bytes) -> ReplyMessage:
    reply = MigDataReadReply.unpack(payload)
    with peer_input("MIG_DATA_READ reply"):
        require(reply.size <= request.size, f"got {reply.size} bytes, asked {request.size}")
    return reply


#: Reply decoders, keyed by the type of the request being answered.
REPLY_DECODERS: dict[type, Callable[[Any, bytes], ReplyMessage]] = {
    Version: lambda _request, payload: Version.unpack(payload),
    DmaMap: _empty_or(DmaMap.unpack),
    DmaUnmap: _empty_or(DmaUnmap.unpack),
    DeviceInfo: lambda _request, payload: DeviceInfo.unpack(payload),
    RegionInfoRequest: _region_info,
    RegionIoFdsRequest: _io_fds,
    IrqInfo: lambda _request, payload: IrqInfo.unpack(payload),
    SetIrqs: _empty_or(SetIrqs.unpack),
    RegionReadRequest: _region_read,
    RegionWriteRequest: _empty_or(RegionWriteReply.unpack),
    DmaReadRequest: _dma_read,
    DmaWriteRequest: _empty_or(DmaWriteReply.unpack),
    QemuDmaReadRequest: _qemu_dma_read,
    QemuDmaWriteRequest: _empty,  # QEMU's DMA_WRITE reply is header only (spec §3.12)
    DeviceReset: _empty,  # QEMU wants exactly 16 bytes (spec §1, §3.10)
    RegionWriteMulti: _empty_or(RegionWriteMultiReply.unpack),
    DeviceFeature: _feature,
    MigDataRead: _mig_read,
    MigDataWrite: _empty,
}


def decode_reply(request: RequestMessage, payload: bytes) -> ReplyMessage:
    """Decode the payload of a successful reply to ``request``."""
    return REPLY_DECODERS[type(request)](request, payload)


def request_fd_error(message: RequestMessage, nfds: int) -> str | None:
    """Why ``nfds`` fds cannot come with this request, or None (spec §1, §3.2, §3.8, R9)."""
    if isinstance(message, DmaMap):
        return None if nfds <= 1 else f"DMA_MAP with {nfds} fds (0 or 1 allowed)"
    if isinstance(message, SetIrqs) and message.data_type == SetIrqsFlags.DATA_EVENTFD:
        # count fds assign vectors start..start+count-1; 0 fds de-assign them (QEMU: ERR
        # de-assign with count 1, MSI-X enable with count 1; captures README).
        if nfds in (0, message.count):
            return None
        return f"SET_IRQS DATA_EVENTFD count {message.count} with {nfds} fds"
    return None if nfds == 0 else f"{message.COMMAND.name} cannot carry fds ({nfds} sent)"


def reply_fd_error(message: ReplyMessage, nfds: int) -> str | None:
    """Why ``nfds`` fds cannot come with this reply, or None (spec R7)."""
    if isinstance(message, RegionInfo):
        return None if nfds <= 1 else f"region info reply with {nfds} fds (at most 1)"
    if isinstance(message, RegionIoFdsReply):
        if any(entry.fd_index >= nfds for entry in message.entries):
            return f"region io fds entry points past the {nfds} fds sent"
        return None
    if isinstance(message, Version) and message.capabilities is not None:
        twin = message.capabilities.twin_socket
        if twin is not None and twin.fd_index is not None:
            return None if twin.fd_index < nfds <= 1 else "twin_socket fd_index without its fd"
    return None if nfds == 0 else "this reply cannot carry fds"


_DATA_SIZE: dict[type, Callable[[Any], int]] = {
    RegionReadRequest: lambda m: m.count,
    RegionWriteRequest: lambda m: m.count,
    DmaReadRequest: lambda m: m.count,
    DmaWriteRequest: lambda m: m.count,
    QemuDmaReadRequest: lambda m: m.count,
    QemuDmaWriteRequest: lambda m: m.count,
    MigDataRead: lambda m: m.size,
    MigDataWrite: lambda m: m.size,
    DmaUnmap: lambda m: 0 if m.bitmap is None else m.bitmap.size,
    DeviceFeature: lambda m: m.argsz,
}


def data_size(message: RequestMessage) -> int:
    """The data transfer a request implies (written or to be read back), bounded by the
    receiver's ``max_data_xfer_size`` (spec §1 "Sizes")."""
    size = _DATA_SIZE.get(type(message))
    return 0 if size is None else size(message)


#: errno for a request whose data transfer is over the limit.
TOO_BIG = errno.E2BIG
