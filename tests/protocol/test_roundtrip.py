"""Every message dataclass survives pack -> unpack unchanged; decoders never raise anything
but the peer error on arbitrary bytes."""

from __future__ import annotations

import errno
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import protocol
from protocol import (
    Capabilities,
    Header,
    LocalProtocolError,
    RegionInfo,
    RemoteProtocolError,
    TypeCap,
)
from protocol.region_info import (
    CAP_HEADER_STRUCT,
    REGION_INFO_STRUCT,
    TYPE_CAP_STRUCT,
)

from .strategies import FEATURE_DATA, MESSAGES, capabilities, u16, u32

ALL_TYPES = {**MESSAGES, **FEATURE_DATA}


@pytest.mark.parametrize("name", sorted(ALL_TYPES))
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_round_trip(name: str, data: st.DataObject) -> None:
    message: Any = data.draw(ALL_TYPES[name])
    cls = getattr(protocol, name)
    assert type(message) is cls
    assert cls.unpack(message.pack()) == message


@pytest.mark.parametrize("name", sorted(ALL_TYPES))
@settings(max_examples=60, deadline=None)
@given(payload=st.binary(max_size=120))
def test_unpack_raises_only_the_peer_error(name: str, payload: bytes) -> None:
    cls = getattr(protocol, name)
    try:
        message = cls.unpack(payload)
    except RemoteProtocolError as exc:
        assert not exc.fatal
        assert exc.errno in (errno.EINVAL, errno.E2BIG)
        return
    assert cls.unpack(message.pack()) == message


@settings(max_examples=100, deadline=None)
@given(caps=capabilities)
def test_capabilities_json_round_trip(caps: Capabilities) -> None:
    assert Capabilities.from_json(caps.to_json()) == caps


@given(u16, u16, u32, u32, u32)
def test_header_round_trip(msg_id: int, command: int, size: int, flags: int, error: int) -> None:
    header = Header(msg_id, command, size, flags, error)
    assert len(header.pack()) == protocol.HEADER_SIZE
    assert Header.unpack(header.pack()) == header


@pytest.mark.parametrize(
    "build",
    [
        lambda: protocol.DmaMap(4, 0, 0, 4096),  # unknown flag
        lambda: protocol.DmaMap(3, 0, 0, 0),  # size 0
        lambda: protocol.DmaMap(3, 0, (1 << 64) - 4096, 8192),  # wraps
        lambda: protocol.DmaUnmap(2, 4096, 0),  # ALL with an address
        lambda: protocol.RegionWriteRequest(0, 7, 4, b"abc"),
        lambda: protocol.RegionReadRequest(-1, 0, 4),
        lambda: protocol.RegionReadRequest(0, 1 << 32, 4),
        lambda: protocol.SetIrqs.build(0x24 | 0x1, 0, 0, 1),  # two data types
        lambda: protocol.SetIrqs.build(0x4, 0, 0, 1),  # no action
        lambda: protocol.SetIrqs.build(0x24, 0, 0, 0),  # count 0 needs NONE|TRIGGER
        lambda: protocol.SetIrqs.build(0x22, 0, 0, 2, b"\x01\x02"),  # bool not 0/1
        lambda: protocol.Capabilities(max_msg_fds=True),
        lambda: protocol.Capabilities(pgsizes=4097),
        lambda: protocol.Version(0, 0, {"max_msg_fds": 1}),  # type: ignore[arg-type]
        lambda: protocol.RegionInfo(16, 0, 0, 0, 0, 0),
        lambda: protocol.RegionInfo(40, 8, 0, 32, 0, 0, (protocol.TypeCap(1, 2),)),
        lambda: protocol.Header(1 << 16, 0, 16, 0),
        lambda: protocol.DeviceFeature(8, 1),  # neither GET, SET nor PROBE
        lambda: protocol.DeviceFeature(8, (1 << 16) | (1 << 17) | 1),
        lambda: protocol.WriteMultiEntry(0, 0, 9, bytes(9)),
    ],
)
def test_invalid_messages_are_our_bug(build: Any) -> None:
    with pytest.raises(LocalProtocolError):
        build()


def test_region_info_small_argsz_rule() -> None:
    # Spec R5/R6 and the captures: QEMU asks with argsz 32, then again with what we said.
    cap = protocol.SparseMmapCap(((0, 7 << 30),))
    flags = 0x7
    short = protocol.build_region_info_reply(32, 4, flags, 8 << 30, 0, (cap,))
    assert short == RegionInfo(64, flags, 4, 0, 8 << 30, 0)
    assert len(short.pack()) == 32
    full = protocol.build_region_info_reply(short.argsz, 4, flags, 8 << 30, 0, (cap,))
    assert full.argsz == 64 and full.cap_offset == 32 and full.flags == flags | 8
    assert full.caps == (cap,) and full.sparse_areas == ((0, 7 << 30),)
    assert len(full.pack()) == 64
    plain = protocol.build_region_info_reply(32, 7, 3, 4096, 0)
    assert plain.argsz == 32 and plain.caps == ()


def test_region_info_with_caps_after_a_gap_roundtrips() -> None:
    info = RegionInfo(40 + 16, 0x8 | 0x1, 9, 40, 4096, 0, (TypeCap(1, 2),))  # cap_offset 40
    assert RegionInfo.unpack(info.pack()) == info


def test_region_cap_longer_than_its_contents_is_refused() -> None:
    head = REGION_INFO_STRUCT.pack(32 + 24, 0x8, 9, 32, 4096, 0)
    cap = CAP_HEADER_STRUCT.pack(2, 1, 0) + TYPE_CAP_STRUCT.pack(1, 2) + bytes(8)  # 8 extra
    with pytest.raises(RemoteProtocolError):
        RegionInfo.unpack(head + cap)
