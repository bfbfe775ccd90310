"""Connection state tables (the h11 model: every transition lives here, as data).

Theory of operation
===================

A vfio-user connection is one byte stream per direction, carrying requests and replies of
both roles interleaved (spec vfio-user.md §1: without twin sockets, DMA_READ/WRITE from the
server share the socket with the client's traffic). A connection object tracks:

1. **Negotiation state** (``State``), the same machine for both roles, driven by the VERSION
   exchange only:

   ================  =================================  ==================
   from              trigger                            to
   ================  =================================  ==================
   AWAITING_VERSION  server receives a valid VERSION    VERSION_PENDING
   VERSION_PENDING   server sends the VERSION reply     READY
   VERSION_PENDING   server sends a VERSION error       AWAITING_VERSION
   AWAITING_VERSION  client sends VERSION               VERSION_PENDING
   VERSION_PENDING   client receives the VERSION reply  READY
   VERSION_PENDING   client receives an error/bad reply AWAITING_VERSION
   any               EOF at a message boundary          CLOSED
   any               stream error (fatal)               BROKEN
   ================  =================================  ==================

   VERSION must come first (spec §3.1, R19: every new connection starts with it). A request
   that arrives out of order is *rejected* (``RejectedRequest``, EINVAL), not fatal: it was
   well framed, so the stream is intact and the peer learns what it did wrong. One VERSION
   only: a second one is rejected the same way.

2. **Which commands a role may receive as requests** in each state
   (``RECEIVABLE``) and may send (``SENDABLE``). The server receives 1-10, 13, 15-18 and
   sends only 11/12 (DMA_READ/WRITE); the client the reverse (spec §1 "Direction"). An
   unknown command number is rejected with ENOSYS, a known one in the wrong direction or
   state with EINVAL (spec R18).

3. **Pending requests**, both ways. Replies are matched by ``(msg_id, command)`` against the
   requests we sent (FIFO per key: ids are 16-bit and wrap, spec §1); a reply nobody asked
   for is fatal, because its body could be anything. Requests we received stay pending until
   answered once; NO_REPLY requests are never pending and never answered (R4).

Fatal (the connection is BROKEN, every later call raises ``RemoteProtocolError``): bad header
type, ``size`` < 16 or over the size limit, fds arriving anywhere but with a message's first
byte, MSG_CTRUNC reported by the transport, EOF inside a message, an unexpected reply.
Everything else the peer gets wrong in one message is a ``RejectedRequest`` (or an
``ErrorReply`` with EPROTO for a bad reply) and the stream carries on.
"""

from __future__ import annotations

import enum
import errno

from protocol.header import FLAG_NO_REPLY, FLAG_TYPE_MASK, Command


class Role(enum.Enum):
    """Which end of the socket we are."""

    CLIENT = "client"
    SERVER = "server"


class State(enum.Enum):
    """Negotiation state of a connection."""

    AWAITING_VERSION = "awaiting-version"
    VERSION_PENDING = "version-pending"
    READY = "ready"
    CLOSED = "closed"
    BROKEN = "broken"


class Trigger(enum.Enum):
    """The VERSION-exchange events that move the state machine."""

    SEND_VERSION_REQUEST = "send-version-request"
    RECEIVE_VERSION_REQUEST = "receive-version-request"
    SEND_VERSION_REPLY = "send-version-reply"
    SEND_VERSION_ERROR = "send-version-error"
    RECEIVE_VERSION_REPLY = "receive-version-reply"
    RECEIVE_VERSION_ERROR = "receive-version-error"


TRANSITIONS: dict[tuple[Role, State, Trigger], State] = {
    (Role.SERVER, State.AWAITING_VERSION, Trigger.RECEIVE_VERSION_REQUEST): State.VERSION_PENDING,
    (Role.SERVER, State.VERSION_PENDING, Trigger.SEND_VERSION_REPLY): State.READY,
    (Role.SERVER, State.VERSION_PENDING, Trigger.SEND_VERSION_ERROR): State.AWAITING_VERSION,
    (Role.CLIENT, State.AWAITING_VERSION, Trigger.SEND_VERSION_REQUEST): State.VERSION_PENDING,
    (Role.CLIENT, State.VERSION_PENDING, Trigger.RECEIVE_VERSION_REPLY): State.READY,
    (Role.CLIENT, State.VERSION_PENDING, Trigger.RECEIVE_VERSION_ERROR): State.AWAITING_VERSION,
}

#: Commands the client sends as requests (and the server receives).
CLIENT_COMMANDS = frozenset(Command) - {Command.DMA_READ, Command.DMA_WRITE}
#: Commands the server sends as requests (and the client receives).
SERVER_COMMANDS = frozenset({Command.DMA_READ, Command.DMA_WRITE})

_NONE: frozenset[Command] = frozenset()

#: Requests a role accepts from its peer, per state.
RECEIVABLE: dict[tuple[Role, State], frozenset[Command]] = {
    (Role.SERVER, State.AWAITING_VERSION): frozenset({Command.VERSION}),
    (Role.SERVER, State.VERSION_PENDING): _NONE,
    (Role.SERVER, State.READY): CLIENT_COMMANDS - {Command.VERSION},
    (Role.CLIENT, State.AWAITING_VERSION): _NONE,
    (Role.CLIENT, State.VERSION_PENDING): _NONE,
    (Role.CLIENT, State.READY): SERVER_COMMANDS,
}

#: Requests a role may send, per state (anything else is our bug).
SENDABLE: dict[tuple[Role, State], frozenset[Command]] = {
    (Role.CLIENT, State.AWAITING_VERSION): frozenset({Command.VERSION}),
    (Role.CLIENT, State.VERSION_PENDING): _NONE,
    (Role.CLIENT, State.READY): CLIENT_COMMANDS - {Command.VERSION},
    (Role.SERVER, State.AWAITING_VERSION): _NONE,
    (Role.SERVER, State.VERSION_PENDING): _NONE,
    (Role.SERVER, State.READY): SERVER_COMMANDS,
}

#: Commands each role receives as requests at all (wrong direction otherwise).
RECEIVES: dict[Role, frozenset[Command]] = {
    Role.SERVER: CLIENT_COMMANDS,
    Role.CLIENT: SERVER_COMMANDS,
}


#: RECEIVABLE keyed by command number, for the per-message check: one dict lookup answers
#: "known, right direction, right state" without constructing a Command or hashing Role/State
#: members (plain Enums hash in Python).
ACCEPTED: dict[tuple[Role, State], dict[int, Command]] = {
    key: {int(command): command for command in commands} for key, commands in RECEIVABLE.items()
}


def transition(role: Role, state: State, trigger: Trigger) -> State:
    """The next state; a trigger with no entry leaves the state as it is."""
    return TRANSITIONS.get((role, state, trigger), state)


def refusal(role: Role, state: State, number: int, flags: int) -> tuple[int, str]:
    """errno and reason for rejecting request ``number`` that ``ACCEPTED`` does not let
    through, or that has bad ``flags``.

    The checks the lookup folds into one, plus the flags, in the order that picks the errno
    (spec R18): unknown command ENOSYS; wrong direction, bad flags, wrong state EINVAL.
    """
    try:
        command = Command(number)
    except ValueError:
        return errno.ENOSYS, f"unknown command {number}"
    if command not in RECEIVES[role]:
        return errno.EINVAL, f"{command.name} is not a {role.value}'s request"
    if flags & ~(FLAG_TYPE_MASK | FLAG_NO_REPLY):
        return errno.EINVAL, f"request flags {flags:#x}"
    assert command not in RECEIVABLE[role, state]
    return errno.EINVAL, f"{command.name} not allowed in state {state.value}"
