"""bytes_wanted, chunked input and fd placement."""

from __future__ import annotations

import errno
import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import HEADER_SIZE, HEADER_STRUCT, DeviceReset, DmaMap, RemoteProtocolError, Request
from protocol.framing import FrameReader

from .helpers import drain, frame, negotiated_pair, negotiated_server, new_fds


def test_bytes_wanted_walks_header_then_body() -> None:
    server = negotiated_server()
    data = frame(1, 2, DmaMap(3, 0, 0, 4096).pack())
    assert server.bytes_wanted == HEADER_SIZE
    server.receive_data(data[:10], new_fds(1))
    assert server.bytes_wanted == 6
    server.receive_data(data[10:16])
    assert server.bytes_wanted == 32
    server.receive_data(data[16:40])
    assert server.bytes_wanted == 8
    server.receive_data(data[40:])
    (event,) = drain(server)
    assert isinstance(event, Request) and len(event.fds) == 1
    assert server.bytes_wanted == HEADER_SIZE


def test_bytes_wanted_skips_buffered_messages() -> None:
    server = negotiated_server()
    server.receive_data(frame(1, 13) + frame(2, 2, DmaMap(3, 0, 0, 4096).pack())[:20])
    assert server.bytes_wanted == 48 - 20


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(1, 60), min_size=1, max_size=30))
def test_any_chunking_gives_the_same_events(sizes: list[int]) -> None:
    client, server = negotiated_pair()
    messages = [DmaMap(3, i << 12, i << 12, 4096) for i in range(4)] + [DeviceReset()] * 3
    stream = b""
    fd_at: dict[int, tuple[int, ...]] = {}
    for message in messages:
        fds = new_fds(1) if isinstance(message, DmaMap) else ()
        _, out = client.send_request(message, fds)
        fd_at[len(stream)] = out.fds
        stream += out.data
    pos, events = 0, []
    reads = itertools.cycle(sizes)
    while pos < len(stream):
        # A read never crosses a message boundary, so fds land on the right message.
        n = min(next(reads), server.bytes_wanted)
        server.receive_data(stream[pos : pos + n], fd_at.get(pos, ()))
        pos += n
        events += drain(server)
    requests = [e for e in events if isinstance(e, Request)]
    assert len(requests) == len(events)
    assert [e.message for e in requests] == messages
    assert [e.fds for e in requests] == list(fd_at.values())


def test_size_limit_is_inclusive_and_oversize_is_fatal_e2big() -> None:
    reader = FrameReader(64)
    reader.feed(HEADER_STRUCT.pack(1, 4, 64, 0, 0) + bytes(48), ())
    assert reader.next_frame() is not None  # exactly the limit
    reader.feed(HEADER_STRUCT.pack(2, 4, 65, 0, 0), ())
    with pytest.raises(RemoteProtocolError) as info:
        reader.next_frame()
    assert info.value.fatal and info.value.errno == errno.E2BIG


def test_fds_inside_a_message_are_fatal_before_its_body_is_complete() -> None:
    """A peer must not make us hold fds for a message that is already broken while it takes
    its time sending the rest: fds inside a body are fatal the moment they are fed, on the
    buffered path and the exact one alike."""
    data = frame(1, 10, bytes(16 + 4096))
    own = new_fds(1)
    stray = new_fds(16)
    server = negotiated_server()
    server.receive_data(data[:16], own)
    server.receive_data(data[16:17], stray)
    with pytest.raises(RemoteProtocolError) as buffered:
        server.next_event()  # 4095 bytes of the body still to come
    exact = negotiated_server()
    assert exact.receive_header(data[:16], own) == 16 + 4096
    with pytest.raises(RemoteProtocolError) as exact_info:
        exact.receive_body(data[16:17], stray)  # read so far: the rest is not read
    for info in (buffered, exact_info):
        assert info.value.fatal and info.value.message.startswith("fds arrived after")
        assert sorted(info.value.fds) == sorted(own + stray)
