"""Exact reads (``receive_header`` + ``receive_body``, what the daemon's session uses) give
the same events, errors and fds as the buffered path (``receive_data`` + ``next_event``) fed
the same reads -- for well-formed and malformed streams alike."""

from __future__ import annotations

import itertools
from collections import Counter
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocol import (
    HEADER_SIZE,
    HEADER_STRUCT,
    NEED_DATA,
    Capabilities,
    ConnectionClosed,
    LocalProtocolError,
    RejectedRequest,
    RemoteProtocolError,
    Request,
    ServerConnection,
)

from .helpers import negotiated_pair
from .test_fuzz import SETTINGS, frames, valid_frames

_fd_counter = itertools.count(50_000)
CAPS = Capabilities(max_msg_fds=4, max_data_xfer_size=4096)


@st.composite
def reads(draw: st.DrawFn) -> list[tuple[bytes, list[int], bytes, list[int]]]:
    """(header, fds, body, stray fds) as an exact reader reads them, maybe cut short by EOF."""
    stream = b"".join(draw(st.lists(st.one_of(valid_frames(), valid_frames(), frames()))))
    if draw(st.booleans()):
        stream = stream[: draw(st.integers(0, len(stream)))]  # the peer closes mid-stream
    out = []
    pos = 0
    while pos < len(stream):
        header = stream[pos : pos + HEADER_SIZE]
        size = HEADER_STRUCT.unpack(header)[2] if len(header) == HEADER_SIZE else HEADER_SIZE
        body = stream[pos + HEADER_SIZE : pos + max(size, HEADER_SIZE)]
        fds = [next(_fd_counter) for _ in range(draw(st.sampled_from([0, 0, 0, 1, 2, 5])))]
        stray = [next(_fd_counter) for _ in range(draw(st.sampled_from([0, 0, 0, 0, 0, 1])))]
        out.append((header, fds, body, stray if body else []))
        pos += max(size, HEADER_SIZE)
    return out


def _summary(event: Any) -> tuple[Any, ...]:
    return (
        type(event).__name__,
        getattr(event, "msg_id", None),
        getattr(event, "command", None),
        getattr(event, "errno", None),
        getattr(event, "message", None),
        tuple(getattr(event, "fds", ())),
    )


def _answer(conn: ServerConnection, event: Any) -> None:
    if isinstance(event, Request | RejectedRequest) and not event.no_reply:
        conn.send_error(event, 5)


def _buffered(conn: ServerConnection, script: list[Any], fed: Counter[int]) -> list[Any]:
    out: list[tuple[Any, ...]] = []

    def drain() -> bool:
        while True:
            try:
                event = conn.next_event()
            except RemoteProtocolError as exc:
                out.append(("fatal", exc.message, tuple(sorted(exc.fds))))
                return False
            if event is NEED_DATA:
                return True
            out.append(_summary(event))
            if isinstance(event, ConnectionClosed):
                return False
            _answer(conn, event)

    for header, fds, body, stray in script:
        fed.update(fds)
        conn.receive_data(header, fds)
        if not drain():
            return out
        if len(header) < HEADER_SIZE:
            break
        if body or stray:
            fed.update(stray)
            conn.receive_data(body, stray)
            if not drain():
                return out
    conn.receive_data(b"")
    drain()
    return out


def _exact(conn: ServerConnection, script: list[Any], fed: Counter[int]) -> list[Any]:
    """What Session._read_message does, over the same reads."""
    out: list[tuple[Any, ...]] = []
    try:
        for header, fds, body, stray in script:
            assert conn.at_message_boundary
            fed.update(fds)
            if len(header) < HEADER_SIZE:
                conn.receive_data(header, fds)
                break
            remaining = conn.receive_header(header, fds)
            fed.update(stray)
            event = conn.receive_body(body, stray, eof=len(body) < remaining)
            out.append(_summary(event))
            _answer(conn, event)
        conn.receive_data(b"")
        while (closing := conn.next_event()) is not NEED_DATA:
            out.append(_summary(closing))
            if isinstance(closing, ConnectionClosed):
                break
    except RemoteProtocolError as exc:
        out.append(("fatal", exc.message, tuple(sorted(exc.fds))))
    return out


def _returned(summaries: list[tuple[Any, ...]]) -> Counter[int]:
    return Counter(fd for s in summaries for fd in s[-1])


@SETTINGS
@given(reads())
def test_same_outcome_as_buffered_reads(script: list[Any]) -> None:
    _, buffered_conn = negotiated_pair(server_caps=CAPS)
    _, exact_conn = negotiated_pair(server_caps=CAPS)
    fed_buffered: Counter[int] = Counter()
    fed_exact: Counter[int] = Counter()
    buffered = _buffered(buffered_conn, script, fed_buffered)
    exact = _exact(exact_conn, script, fed_exact)
    assert exact == buffered
    # Every fd handed over comes back exactly once, in an event or in the fatal error.
    assert fed_exact == fed_buffered
    assert _returned(exact) == fed_exact


def test_header_only_message_and_boundary() -> None:
    _, conn = negotiated_pair(server_caps=CAPS)
    header = HEADER_STRUCT.pack(7, 2, HEADER_SIZE, 0, 0)  # DEVICE_GET_INFO, no argsz: refused
    assert conn.at_message_boundary
    assert conn.receive_header(header) == 0
    assert not conn.at_message_boundary
    event = conn.receive_body(b"")
    assert isinstance(event, RejectedRequest | Request)
    assert conn.at_message_boundary


def test_misuse_is_a_local_error() -> None:
    _, conn = negotiated_pair(server_caps=CAPS)
    with pytest.raises(LocalProtocolError):
        conn.receive_body(b"")  # no header first
    with pytest.raises(LocalProtocolError):
        conn.receive_header(b"short")
    conn.receive_header(HEADER_STRUCT.pack(1, 9, 32, 0, 0))
    with pytest.raises(LocalProtocolError):
        conn.receive_data(b"x")  # mixing the two ways mid-message
    with pytest.raises(LocalProtocolError):
        conn.next_event()
    event = conn.receive_body(bytes(16))
    assert isinstance(event, Request)


def test_release_fds_hands_back_a_half_read_message() -> None:
    _, conn = negotiated_pair(server_caps=CAPS)
    conn.receive_header(HEADER_STRUCT.pack(1, 2, 32, 0, 0), [901, 902])
    assert conn.release_fds() == (901, 902)
    assert conn.release_fds() == ()
