"""The per-guest-access fast path of a server's exact reads: REGION_READ and REGION_WRITE.

Every guest access to a trapped BAR or config register is one of these two messages (spec
vfio-user.md §3.9), so they are most of what a server receives. Through the general path a
message becomes a ``Frame``, then a ``Request`` event carrying a decoded message, is counted
as owed a reply, is dispatched, and is answered through ``send_access_reply``; each step
re-derives what the previous one knew. :class:`TrappedAccess` is what is left of all that
once the checks are done: the fields of the access and whether it wants a reply.

The contract (``ServerConnection.trapped_access_body`` / ``receive_trapped_access`` /
``answer_access`` / ``refuse_access``) is that the fast path takes a message only when the
general path would have turned it into a ``Request`` -- command accepted in this state,
type and flags valid, no fds, sizes within the negotiated limits, a well-formed access head
and, for a write, exactly ``count`` bytes of data (spec R20) -- and answers it with the same
bytes. Anything else is left untouched for the general path, which produces the rejection,
error or fatal break it always did. tests/protocol/test_trapped.py checks the equivalence.

One fast access is owed a reply at a time (the usual case: a VMM waits for each trapped
access); while it is, further messages take the general path, which counts any number.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from protocol.errors import LocalProtocolError
from protocol.header import FLAG_ERROR, FLAG_TYPE_REPLY, HEADER_SIZE, HEADER_STRUCT, Command
from protocol.region_access import access_reply_wire

_ACCESS = struct.Struct("<QII")  # offset, region, count (spec §3.9)
_pack_header = HEADER_STRUCT.pack
_unpack_access = _ACCESS.unpack_from
ACCESS_SIZE = _ACCESS.size
ADDRESS_LIMIT = 1 << 64
REGION_READ, REGION_WRITE = int(Command.REGION_READ), int(Command.REGION_WRITE)
_ERROR_FLAGS = FLAG_TYPE_REPLY | FLAG_ERROR


@dataclass(slots=True, eq=False)  # identity: each access is owed its own reply
class TrappedAccess:
    """A REGION_READ (``data`` empty) or REGION_WRITE the connection has validated: the
    header's and the access head's fields, in wire order."""

    msg_id: int
    command: int
    no_reply: bool
    offset: int
    region: int
    count: int
    data: bytes = field(repr=False)  # up to max_data_xfer_size: never in an error message

    @property
    def is_read(self) -> bool:
        return self.command == REGION_READ


def decode_access(
    msg_id: int, command: int, no_reply: bool, body: bytes, max_data: int
) -> TrappedAccess | None:
    """The access in ``body``, or None where the general path would refuse it: a read body
    that is not exactly the head, a write whose data is not exactly ``count`` bytes (R20),
    an access that overflows the 64-bit offset, or one over ``max_data``."""
    if len(body) < ACCESS_SIZE:
        return None
    offset, region, count = _unpack_access(body)
    if offset + count > ADDRESS_LIMIT or count > max_data:
        return None
    if command == REGION_READ:
        if len(body) != ACCESS_SIZE:
            return None
        data = b""
    else:
        data = bytes(body[ACCESS_SIZE:])
        if len(data) != count:
            return None
    return TrappedAccess(msg_id, command, no_reply, offset, region, count, data)


def access_reply(access: TrappedAccess, data: bytes) -> bytes:
    """The reply message: the request's head echoed, then ``data`` for a read (exactly
    ``count`` bytes, spec R10: QEMU fails the access otherwise), nothing for a write."""
    return access_reply_wire(
        access.msg_id, access.command, access.offset, access.region, access.count, data=data
    )


def access_error(access: TrappedAccess, err: int) -> bytes:
    """A header-only error reply (flags 0x21, positive errno; spec R3)."""
    if isinstance(err, bool) or not isinstance(err, int) or not 0 < err < 1 << 32:
        raise LocalProtocolError(f"errno must be a positive u32, not {err!r}")
    return _pack_header(access.msg_id, access.command, HEADER_SIZE, _ERROR_FLAGS, err)
