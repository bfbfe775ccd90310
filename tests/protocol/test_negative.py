"""The catalogue of bad input (after libvfio-user's test suite), as parametrised cases.

Each case is raw bytes (+ fds) sent to a server, fresh or negotiated, and the outcome:
``("reject", errno)`` -- a RejectedRequest, the stream still usable -- or ``("fatal",)``.
"""

from __future__ import annotations

import errno
import struct
from typing import Any

import pytest

from protocol import (
    Capabilities,
    ConnectionClosed,
    DmaMap,
    RejectedRequest,
    RemoteProtocolError,
    Request,
    ServerConnection,
    State,
)

from .helpers import SERVER_CAPS, drain, frame, negotiated_server, new_fds

MAX = SERVER_CAPS.max_data_xfer_size
EINVAL, ENOSYS, E2BIG = errno.EINVAL, errno.ENOSYS, errno.E2BIG


def version(json_bytes: bytes, major: int = 0, minor: int = 0) -> bytes:
    return struct.pack("<HH", major, minor) + json_bytes


GOOD_JSON = b'{"capabilities":{"max_msg_fds":16}}\0'
DMA_MAP = struct.pack("<IIQQQ", 32, 3, 0, 0, 4096)
SET_IRQS_EVENTFD_2 = struct.pack("<IIIII", 20, 0x24, 2, 0, 2)
SET_IRQS_NONE = struct.pack("<IIIII", 20, 0x21, 0, 0, 0)
READ_HEAD = struct.pack("<QII", 0, 7, 4)

# (id, fresh server?, raw bytes, nfds, expected)
CASES: list[tuple[str, bool, bytes, int, tuple[Any, ...]]] = [
    # VERSION
    ("version-short", True, frame(0, 1, b"\0\0"), 0, ("reject", EINVAL)),
    ("version-empty", True, frame(0, 1), 0, ("reject", EINVAL)),
    ("version-too-long", True, frame(0, 1, version(b" " * (MAX + 8192) + b"{}\0")), 0, ("fatal",)),
    ("version-trailing", True, frame(0, 1, version(GOOD_JSON + b"xx")), 0, ("reject", EINVAL)),
    ("version-bad-json", True, frame(0, 1, version(b'{"capabilities":\0')), 0, ("reject", EINVAL)),
    ("version-json-list", True, frame(0, 1, version(b"[1, 2]\0")), 0, ("reject", EINVAL)),
    (
        "version-caps-list",
        True,
        frame(0, 1, version(b'{"capabilities":[]}\0')),
        0,
        ("reject", EINVAL),
    ),
    (
        "version-fds-string",
        True,
        frame(0, 1, version(b'{"capabilities":{"max_msg_fds":"8"}}\0')),
        0,
        ("reject", EINVAL),
    ),
    (
        "version-fds-bool",
        True,
        frame(0, 1, version(b'{"capabilities":{"max_msg_fds":true}}\0')),
        0,
        ("reject", EINVAL),
    ),
    (
        "version-wm-int",
        True,
        frame(0, 1, version(b'{"capabilities":{"write_multiple":1}}\0')),
        0,
        ("reject", EINVAL),
    ),
    (
        "version-migration-int",
        True,
        frame(0, 1, version(b'{"capabilities":{"migration":4096}}\0')),
        0,
        ("reject", EINVAL),
    ),
    (
        "version-pgsizes-odd",
        True,
        frame(0, 1, version(b'{"capabilities":{"pgsizes":4097}}\0')),
        0,
        ("reject", EINVAL),
    ),
    ("version-no-nul", True, frame(0, 1, version(GOOD_JSON[:-1])), 0, ("reject", EINVAL)),
    ("version-inner-nul", True, frame(0, 1, version(b'{"a":1}\0{}\0')), 0, ("reject", EINVAL)),
    ("version-not-utf8", True, frame(0, 1, version(b'{"\xff":1}\0')), 0, ("reject", EINVAL)),
    # json's decoder recurses per nesting level: 2 KB of "[" used to raise RecursionError.
    ("version-deep-list", True, frame(0, 1, version(b"[" * 2000 + b"\0")), 0, ("reject", EINVAL)),
    (
        "version-deep-object",
        True,
        frame(0, 1, version(b'{"capabilities":' * 2000 + b"\0")),
        0,
        ("reject", EINVAL),
    ),
    ("version-major-1", True, frame(0, 1, version(GOOD_JSON, major=1)), 0, ("reject", EINVAL)),
    ("version-no-reply", True, frame(0, 1, version(GOOD_JSON), flags=0x10), 0, ("reject", EINVAL)),
    ("version-with-fd", True, frame(0, 1, version(GOOD_JSON)), 1, ("reject", EINVAL)),
    ("version-twice", False, frame(9, 1, version(GOOD_JSON)), 0, ("reject", EINVAL)),
    # Order: nothing but VERSION first.
    ("dma-map-first", True, frame(0, 2, DMA_MAP), 1, ("reject", EINVAL)),
    ("get-info-first", True, frame(0, 4, struct.pack("<IIII", 16, 0, 0, 0)), 0, ("reject", EINVAL)),
    ("reset-first", True, frame(0, 13), 0, ("reject", EINVAL)),
    ("read-first", True, frame(0, 9, READ_HEAD), 0, ("reject", EINVAL)),
    # Bad argsz, per command.
    (
        "dma-map-argsz",
        False,
        frame(1, 2, struct.pack("<IIQQQ", 31, 3, 0, 0, 4096)),
        0,
        ("reject", EINVAL),
    ),
    ("dma-map-short", False, frame(1, 2, DMA_MAP[:24]), 0, ("reject", EINVAL)),
    (
        "dma-unmap-argsz",
        False,
        frame(1, 3, struct.pack("<IIQQ", 23, 0, 0, 4096)),
        0,
        ("reject", EINVAL),
    ),
    ("get-info-argsz", False, frame(1, 4, struct.pack("<IIII", 8, 0, 0, 0)), 0, ("reject", EINVAL)),
    (
        "region-info-argsz",
        False,
        frame(1, 5, struct.pack("<IIIIQQ", 16, 0, 0, 0, 0, 0)),
        0,
        ("reject", EINVAL),
    ),
    (
        "region-info-short",
        False,
        frame(1, 5, struct.pack("<IIII", 32, 0, 0, 0)),
        0,
        ("reject", EINVAL),
    ),
    ("io-fds-argsz", False, frame(1, 6, struct.pack("<IIII", 8, 0, 0, 0)), 0, ("reject", EINVAL)),
    ("irq-info-argsz", False, frame(1, 7, struct.pack("<IIII", 4, 0, 3, 0)), 0, ("reject", EINVAL)),
    (
        "set-irqs-argsz",
        False,
        frame(1, 8, struct.pack("<IIIII", 24, 0x21, 0, 0, 0)),
        0,
        ("reject", EINVAL),
    ),
    (
        "feature-argsz",
        False,
        frame(1, 16, struct.pack("<II", 4, (1 << 16) | 1)),
        0,
        ("reject", EINVAL),
    ),
    ("mig-read-argsz", False, frame(1, 17, struct.pack("<II", 4, 8)), 0, ("reject", EINVAL)),
    (
        "mig-write-argsz",
        False,
        frame(1, 18, struct.pack("<II", 8, 2) + b"ab"),
        0,
        ("reject", EINVAL),
    ),
    # Payload rules.
    (
        "dma-map-size-0",
        False,
        frame(1, 2, struct.pack("<IIQQQ", 32, 3, 0, 0, 0)),
        0,
        ("reject", EINVAL),
    ),
    (
        "dma-map-wraps",
        False,
        frame(1, 2, struct.pack("<IIQQQ", 32, 3, 0, 2**64 - 4096, 8192)),
        0,
        ("reject", EINVAL),
    ),
    (
        "dma-map-flags",
        False,
        frame(1, 2, struct.pack("<IIQQQ", 32, 8, 0, 0, 4096)),
        0,
        ("reject", EINVAL),
    ),
    (
        "unmap-all-address",
        False,
        frame(1, 3, struct.pack("<IIQQ", 24, 2, 4096, 0)),
        0,
        ("reject", EINVAL),
    ),
    (
        "set-irqs-two-types",
        False,
        frame(1, 8, struct.pack("<IIIII", 20, 0x25, 0, 0, 1)),
        0,
        ("reject", EINVAL),
    ),
    (
        "set-irqs-no-action",
        False,
        frame(1, 8, struct.pack("<IIIII", 20, 0x04, 0, 0, 1)),
        0,
        ("reject", EINVAL),
    ),
    (
        "set-irqs-count-0-eventfd",
        False,
        frame(1, 8, struct.pack("<IIIII", 20, 0x24, 0, 0, 0)),
        0,
        ("reject", EINVAL),
    ),
    (
        "set-irqs-count-0-mask",
        False,
        frame(1, 8, struct.pack("<IIIII", 20, 0x09, 0, 0, 0)),
        0,
        ("reject", EINVAL),
    ),
    (
        "set-irqs-bool-short",
        False,
        frame(1, 8, struct.pack("<IIIII", 21, 0x22, 0, 0, 2) + b"\1"),
        0,
        ("reject", EINVAL),
    ),
    (
        "set-irqs-bool-value",
        False,
        frame(1, 8, struct.pack("<IIIII", 22, 0x22, 0, 0, 2) + b"\1\2"),
        0,
        ("reject", EINVAL),
    ),
    (
        "set-irqs-none-data",
        False,
        frame(1, 8, struct.pack("<IIIII", 21, 0x21, 0, 0, 1) + b"\1"),
        0,
        ("reject", EINVAL),
    ),
    (
        "set-irqs-wraps",
        False,
        frame(1, 8, struct.pack("<IIIII", 20, 0x21, 0, 2**32 - 1, 1)),
        0,
        ("reject", EINVAL),
    ),
    (
        "write-short-data",
        False,
        frame(1, 10, struct.pack("<QII", 0, 7, 4) + b"abc"),
        0,
        ("reject", EINVAL),
    ),
    (
        "write-long-data",
        False,
        frame(1, 10, struct.pack("<QII", 0, 7, 2) + b"abc"),
        0,
        ("reject", EINVAL),
    ),
    ("read-with-data", False, frame(1, 9, READ_HEAD + b"x"), 0, ("reject", EINVAL)),
    ("read-wraps", False, frame(1, 9, struct.pack("<QII", 2**64 - 2, 7, 4)), 0, ("reject", EINVAL)),
    ("reset-with-payload", False, frame(1, 13, b"\0" * 4), 0, ("reject", EINVAL)),
    (
        "write-multi-count",
        False,
        frame(1, 15, struct.pack("<Q", 2) + bytes(24)),
        0,
        ("reject", EINVAL),
    ),
    (
        "write-multi-entry-9",
        False,
        frame(1, 15, struct.pack("<QQII", 1, 0, 0, 9) + bytes(8)),
        0,
        ("reject", EINVAL),
    ),
    (
        "request-error-flag",
        False,
        frame(1, 4, struct.pack("<IIII", 16, 0, 0, 0), flags=0x20),
        0,
        ("reject", EINVAL),
    ),
    (
        "request-unknown-flag",
        False,
        frame(1, 4, struct.pack("<IIII", 16, 0, 0, 0), flags=0x40),
        0,
        ("reject", EINVAL),
    ),
    # Oversize counts (spec §1: bounded by the receiver's max_data_xfer_size).
    ("read-oversize", False, frame(1, 9, struct.pack("<QII", 0, 7, MAX + 1)), 0, ("reject", E2BIG)),
    (
        "write-oversize",
        False,
        frame(1, 10, struct.pack("<QII", 0, 0, MAX + 1) + bytes(MAX + 1)),
        0,
        ("reject", E2BIG),
    ),
    (
        "mig-read-oversize",
        False,
        frame(1, 17, struct.pack("<II", 8, MAX + 1)),
        0,
        ("reject", E2BIG),
    ),
    # fd counts.
    ("dma-map-2-fds", False, frame(1, 2, DMA_MAP), 2, ("reject", EINVAL)),
    ("set-irqs-count-2-1-fd", False, frame(1, 8, SET_IRQS_EVENTFD_2), 1, ("reject", EINVAL)),
    ("set-irqs-none-with-fd", False, frame(1, 8, SET_IRQS_NONE), 1, ("reject", EINVAL)),
    ("read-with-fd", False, frame(1, 9, READ_HEAD), 1, ("reject", EINVAL)),
    ("reset-with-fd", False, frame(1, 13), 1, ("reject", EINVAL)),
    (
        "fds-over-max",
        False,
        frame(1, 8, struct.pack("<IIIII", 20, 0x24, 2, 0, 9)),
        9,
        ("reject", EINVAL),
    ),
    # Unknown commands and wrong direction.
    ("command-0", False, frame(1, 0), 0, ("reject", ENOSYS)),
    ("command-14-obsolete", False, frame(1, 14, bytes(8)), 0, ("reject", ENOSYS)),
    ("command-19", False, frame(1, 19), 0, ("reject", ENOSYS)),
    ("command-65535", False, frame(1, 0xFFFF, bytes(100)), 0, ("reject", ENOSYS)),
    ("dma-read-to-server", False, frame(1, 11, struct.pack("<QQ", 0, 4)), 0, ("reject", EINVAL)),
    # Replies nobody asked for (a client sending replies as commands).
    ("reply-unexpected", False, frame(1, 2, flags=1), 0, ("fatal",)),
    ("reply-unexpected-fresh", True, frame(0, 1, version(GOOD_JSON), flags=1), 0, ("fatal",)),
    ("error-reply-unexpected", False, frame(1, 4, flags=0x21, error=5), 1, ("fatal",)),
    # Framing.
    *[(f"header-type-{t}", False, frame(1, 4, flags=t), 0, ("fatal",)) for t in (2, 3, 0xF, 0x12)],
    ("size-0", False, frame(1, 4, size=0), 0, ("fatal",)),
    ("size-15", False, frame(1, 4, size=15), 0, ("fatal",)),
    ("size-over-limit", False, frame(1, 10, size=MAX + 4096 + 17), 0, ("fatal",)),
    ("size-4g", True, frame(0, 1, size=2**32 - 1), 0, ("fatal",)),
]


def _server(fresh: bool) -> ServerConnection:
    return ServerConnection(SERVER_CAPS) if fresh else negotiated_server()


@pytest.mark.parametrize(
    ("fresh", "data", "nfds", "expected"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
def test_bad_input(fresh: bool, data: bytes, nfds: int, expected: tuple[Any, ...]) -> None:
    server = _server(fresh)
    fds = new_fds(nfds)
    if expected[0] == "fatal":
        server.receive_data(data, fds)
        with pytest.raises(RemoteProtocolError) as info:
            drain(server)
        assert info.value.fatal and set(info.value.fds) == set(fds)
        # BROKEN: everything raises from now on, and fds fed in come straight back.
        assert server.state is State.BROKEN and server.bytes_wanted == 0
        with pytest.raises(RemoteProtocolError):
            server.next_event()
        with pytest.raises(RemoteProtocolError) as again:
            server.receive_data(b"more", [4242])
        assert again.value.fds == (4242,)
        return
    server.receive_data(data, fds)
    (event,) = drain(server)
    assert isinstance(event, RejectedRequest), event
    assert event.errno == expected[1], event.reason
    assert event.fds == fds and event.reason
    reply = server.send_error(event, event.errno)
    assert (reply is None) == event.no_reply
    if reply is not None:
        assert len(reply.data) == 16
    # The stream is intact: the next message is understood.
    follow = frame(7, 4, struct.pack("<IIII", 16, 0, 0, 0))
    server.receive_data(follow)
    (after,) = drain(server)
    if server.state is State.READY:
        assert isinstance(after, Request)
    else:
        assert isinstance(after, RejectedRequest) and after.errno == EINVAL


# QEMU quirks that must be accepted (spec §3, captures README).
ACCEPTED: list[tuple[str, bytes, int]] = [
    ("unmap-all", frame(1, 3, struct.pack("<IIQQ", 24, 2, 0, 0)), 0),
    # argsz bounds the reply payload (docs/interop/vfio-user.rst DMA_UNMAP; the sheet's §3.3
    # gives only QEMU's 24): more room than the 24-byte echo is fine.
    ("unmap-argsz-larger", frame(1, 3, struct.pack("<IIQQ", 4096, 0, 0, 4096)), 0),
    ("err-deassign", frame(1, 8, struct.pack("<IIIII", 20, 0x24, 3, 0, 1)), 0),
    ("msix-enable-no-fd", frame(1, 8, struct.pack("<IIIII", 20, 0x24, 2, 0, 1)), 0),
    ("eventfd-count-2", frame(1, 8, SET_IRQS_EVENTFD_2), 2),
    ("intx-disable", frame(1, 8, SET_IRQS_NONE), 0),
    ("dma-map-no-fd", frame(1, 2, DMA_MAP), 0),
    ("posted-write", frame(1, 10, struct.pack("<QII", 0, 4, 4) + b"abcd", flags=0x10), 0),
    ("read-count-0", frame(1, 9, struct.pack("<QII", 0, 7, 0)), 0),
    (
        "write-multi",
        frame(1, 15, struct.pack("<QQII8s", 1, 0x10, 0, 4, b"abcd"), flags=0x10),
        0,
    ),
    ("read-at-max", frame(1, 9, struct.pack("<QII", 0, 7, MAX)), 0),
    ("request-error-field", frame(1, 13, error=99), 0),
]


@pytest.mark.parametrize(("data", "nfds"), [c[1:] for c in ACCEPTED], ids=[c[0] for c in ACCEPTED])
def test_quirks_accepted(data: bytes, nfds: int) -> None:
    server = negotiated_server()
    fds = new_fds(nfds)
    server.receive_data(data, fds)
    (event,) = drain(server)
    assert isinstance(event, Request), event
    assert event.fds == fds


def test_qemu_version_with_extra_keys_accepted() -> None:
    server = ServerConnection(SERVER_CAPS)
    extra = b'{"capabilities":{"max_msg_fds":16,"migration":{"pgsize":4096},"write_multiple":true,'
    extra += b'"future":{"x":[1]}},"other":null}\0'
    server.receive_data(frame(0, 1, version(extra)))
    (event,) = drain(server)
    assert isinstance(event, Request)


@pytest.mark.parametrize("cut", [1, 8, 15, 16, 20, 47])
def test_eof_mid_message_is_fatal(cut: int) -> None:
    server = negotiated_server()
    fds = new_fds(1)
    server.receive_data(frame(1, 2, DMA_MAP)[:cut], fds)
    assert drain(server) == []
    server.receive_data(b"")
    with pytest.raises(RemoteProtocolError) as info:
        server.next_event()
    assert info.value.fatal and info.value.fds == fds


def test_eof_at_boundary_closes() -> None:
    server = negotiated_server()
    server.receive_data(frame(1, 13) + frame(2, 13))
    server.receive_data(b"")
    events = drain(server)
    assert [type(e) for e in events] == [Request, Request, ConnectionClosed]
    assert server.next_event() == ConnectionClosed()
    assert server.bytes_wanted == 0


def test_fds_after_first_byte_are_fatal() -> None:
    server = negotiated_server()
    data = frame(1, 2, DMA_MAP)
    first, second = new_fds(1), new_fds(1)
    server.receive_data(data[:16], first)
    server.receive_data(data[16:], second)
    with pytest.raises(RemoteProtocolError) as info:
        server.next_event()
    assert set(info.value.fds) == {*first, *second}


def test_fds_without_bytes_are_fatal() -> None:
    server = negotiated_server()
    fds = new_fds(2)
    server.receive_data(b"", fds)
    with pytest.raises(RemoteProtocolError) as info:
        server.next_event()
    assert info.value.fds == fds


def test_ctrunc_is_fatal() -> None:
    server = negotiated_server()
    fds = new_fds(1)
    server.receive_data(frame(1, 2, DMA_MAP)[:16], fds, truncated=True)
    with pytest.raises(RemoteProtocolError) as info:
        server.next_event()
    assert info.value.fatal and info.value.fds == fds


def test_rejected_version_leaves_server_waiting() -> None:
    server = ServerConnection(Capabilities())
    server.receive_data(frame(0, 1, version(b"nope\0")))
    (event,) = drain(server)
    assert isinstance(event, RejectedRequest)
    states = [server.state]
    server.receive_data(frame(1, 1, version(GOOD_JSON)))
    (good,) = drain(server)
    assert isinstance(good, Request)
    states.append(server.state)
    assert states == [State.AWAITING_VERSION, State.VERSION_PENDING]
    # Pipelined before the VERSION reply: refused.
    server.receive_data(frame(2, 2, DMA_MAP))
    (early,) = drain(server)
    assert isinstance(early, RejectedRequest) and early.errno == EINVAL
    assert isinstance(DmaMap.unpack(DMA_MAP), DmaMap)
