"""VERSION (1): ``major u16, minor u16, NUL-terminated JSON`` (spec vfio-user.md §3.1)."""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field, replace
from typing import ClassVar, Self

from protocol._fields import check_uint, min_length, peer_input, require
from protocol.capabilities import Capabilities
from protocol.errors import LocalProtocolError
from protocol.header import HEADER_SIZE, Command

VERSION_STRUCT = struct.Struct("<HH")
#: The only version QEMU speaks; it rejects a reply with major != 0 or minor > 0 (§3.1).
PROTOCOL_MAJOR = 0
PROTOCOL_MINOR = 0
EMPTY_CAPABILITIES_JSON = b'{"capabilities":{}}\0'


@dataclass(frozen=True, slots=True)
class Version:
    """Request and reply of VERSION. ``capabilities`` None = no JSON at all (spec defaults).

    ``empty_json`` packs ``Capabilities()`` as ``{"capabilities":{}}`` (every value the spec
    default, like no JSON) rather than with the keys :meth:`Capabilities.to_json` always
    writes: the shortest reply a client that requires the key accepts. ``explicit_json``
    writes every key, defaults too, as QEMU's request does: a server's reply may be no
    longer than the request (spec R2), so a short request would cost the client the
    server's own limits (its ``max_dma_maps`` share, for one). Neither is compared.
    """

    COMMAND: ClassVar[Command] = Command.VERSION

    major: int
    minor: int
    capabilities: Capabilities | None = None
    empty_json: bool = field(default=False, compare=False)
    explicit_json: bool = field(default=False, compare=False)

    def __post_init__(self) -> None:
        check_uint(self, 16, "major", "minor")
        require(
            self.capabilities is None or isinstance(self.capabilities, Capabilities),
            "capabilities must be Capabilities or None",
        )
        require(
            not self.empty_json or self.capabilities == Capabilities(),
            "empty_json stands for Capabilities() only",
        )

    def pack(self) -> bytes:
        """Wire payload; the JSON is compact and NUL-terminated (spec R2)."""
        head = VERSION_STRUCT.pack(self.major, self.minor)
        if self.capabilities is None:
            return head
        if self.empty_json:
            return head + EMPTY_CAPABILITIES_JSON
        caps = self.capabilities.to_json(explicit=self.explicit_json)
        text = json.dumps({"capabilities": caps}, separators=(",", ":"))
        return head + text.encode() + b"\0"

    @classmethod
    def unpack(cls, payload: bytes) -> Self:
        """Parse a VERSION payload; the JSON, if any, must be a NUL-terminated object."""
        with peer_input("VERSION"):
            min_length(payload, VERSION_STRUCT.size, "VERSION")
            major, minor = VERSION_STRUCT.unpack_from(payload)
            rest = payload[VERSION_STRUCT.size :]
            if not rest:
                return cls(major, minor, None)
            require(rest.endswith(b"\0"), "VERSION JSON is not NUL-terminated")
            text = rest[:-1]
            require(b"\0" not in text, "VERSION JSON contains a NUL byte")
            try:
                obj = json.loads(text.decode("utf-8"))
            except RecursionError:
                # json's decoder recurses once per nesting level: a peer's "[[[[..." of a few
                # KB (well inside max_data_xfer_size) reaches the interpreter's limit. Bad JSON
                # like any other, not a bug of ours (the capabilities object nests 3 deep).
                raise LocalProtocolError("VERSION JSON nested too deeply") from None
            require(isinstance(obj, dict), "VERSION JSON is not an object")
            caps = Capabilities.from_json(obj.get("capabilities", {}))
            return cls(major, minor, caps)


def negotiate_reply(request: Version, ours: Capabilities, max_size: int) -> Version:
    """The server's VERSION reply to ``request``.

    Major 0, minor 0; reply capabilities are a subset of what the client proposed (spec §3.1:
    migration, write_multiple and twin_socket only if offered). The whole reply message is
    never longer than ``max_size`` -- the request's size, because QEMU receives the reply into
    a buffer of that size and a longer reply breaks realize (spec R2, captures fact 4).
    Optional keys are dropped, least important first, until it fits.
    """
    proposed = request.capabilities or Capabilities()
    caps = Capabilities(
        max_msg_fds=ours.max_msg_fds,
        max_data_xfer_size=ours.max_data_xfer_size,
        pgsizes=ours.pgsizes,
        max_dma_maps=ours.max_dma_maps,
        migration=ours.migration if proposed.migration is not None else None,
        write_multiple=ours.write_multiple and proposed.write_multiple,
        twin_socket=None,  # never offered by QEMU; we have no second socket to give
    )
    default = Capabilities()
    # A key left out of the JSON means the spec default, so dropping = resetting to default.
    lean = replace(caps, migration=None, write_multiple=False)
    candidates = [
        caps,
        replace(caps, migration=None),
        lean,
        replace(lean, max_dma_maps=default.max_dma_maps),
        replace(lean, max_dma_maps=default.max_dma_maps, pgsizes=default.pgsizes),
    ]
    replies = [Version(PROTOCOL_MAJOR, PROTOCOL_MINOR, candidate) for candidate in candidates]
    # Not even the two mandatory keys fit: spec defaults (spec §3.1). First as an empty
    # capabilities object, because rust-vmm's vfio-user client parses the reply's JSON as
    # bytes [0, len - 1) and requires a "capabilities" key; then as a bare 0.0.
    replies.append(Version(PROTOCOL_MAJOR, PROTOCOL_MINOR, Capabilities(), empty_json=True))
    for reply in replies:
        if HEADER_SIZE + len(reply.pack()) <= max_size:
            return reply
    return Version(PROTOCOL_MAJOR, PROTOCOL_MINOR, None)


def reply_problem(request: Version, reply: object, request_size: int) -> str | None:
    """Why ``reply`` cannot answer ``request`` (a ``request_size``-byte message), or None."""
    if not isinstance(reply, Version):
        return "a VERSION reply is a Version"
    if reply.major != PROTOCOL_MAJOR or reply.minor > request.minor:
        return "VERSION reply must be major 0, minor <= the proposal"
    if HEADER_SIZE + len(reply.pack()) > request_size:
        # QEMU reads the reply into a buffer of the request's size (spec R2).
        return "VERSION reply longer than the request"
    return None
