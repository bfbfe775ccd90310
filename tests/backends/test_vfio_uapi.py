"""``backends.vfio.uapi``: linux/vfio.h's numbers and structs, checked against kernel layouts.

The buffers here are built by hand in the kernel's layout (not with the module's own
``struct.Struct`` objects), so a wrong format string in the module cannot hide behind a test
that shares it.
"""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from backends.vfio import uapi
from backends.vfio.uapi import RawRegionInfo, UapiError, parse_region_info

CAPS = uapi.VFIO_REGION_INFO_FLAG_CAPS
RW_MMAP = (
    uapi.VFIO_REGION_INFO_FLAG_READ
    | uapi.VFIO_REGION_INFO_FLAG_WRITE
    | uapi.VFIO_REGION_INFO_FLAG_MMAP
)
HEAD = 32  # sizeof(struct vfio_region_info)


def region_info(
    *, flags: int = 0, index: int = 0, cap_offset: int = 0, size: int = 0, offset: int = 0
) -> bytes:
    """``struct vfio_region_info``: argsz, flags, index, cap_offset, size, offset."""
    return struct.pack("<IIIIQQ", HEAD, flags, index, cap_offset, size, offset)


def cap_header(cap_id: int, following: int, version: int = 1) -> bytes:
    """``struct vfio_info_cap_header``: id, version, next (from the struct's start)."""
    return struct.pack("<HHI", cap_id, version, following)


def sparse_cap(following: int, areas: list[tuple[int, int]]) -> bytes:
    body = struct.pack("<II", len(areas), 0) + b"".join(struct.pack("<QQ", *a) for a in areas)
    return cap_header(1, following) + body


def type_cap(following: int, cap_type: int, subtype: int) -> bytes:
    return cap_header(2, following) + struct.pack("<II", cap_type, subtype)


def msix_cap(following: int) -> bytes:
    return cap_header(3, following)


def chain(head_flags: int, caps: list[tuple[str, object]]) -> bytes:
    """A region-info buffer with ``caps`` laid out in order, each ``next`` to the one after."""
    sizes = {"sparse": None, "type": 16, "msix": 8}
    offsets: list[int] = []
    at = HEAD
    for kind, arg in caps:
        offsets.append(at)
        size = sizes[kind]
        if size is None:
            assert isinstance(arg, list)
            size = 16 + 16 * len(arg)
        at += size
    body = b""
    for i, (kind, arg) in enumerate(caps):
        following = offsets[i + 1] if i + 1 < len(caps) else 0
        if kind == "sparse":
            assert isinstance(arg, list)
            body += sparse_cap(following, arg)
        elif kind == "type":
            assert isinstance(arg, tuple)
            body += type_cap(following, *arg)
        else:
            body += msix_cap(following)
    head = region_info(
        flags=head_flags | CAPS, index=4, cap_offset=HEAD, size=1 << 30, offset=4 << 40
    )
    return head + body


# -- numbers and sizes --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "value"),
    [
        # _IO(';', 100 + n) in include/uapi/linux/vfio.h
        ("VFIO_GET_API_VERSION", 0x3B64),
        ("VFIO_CHECK_EXTENSION", 0x3B65),
        ("VFIO_SET_IOMMU", 0x3B66),
        ("VFIO_GROUP_GET_STATUS", 0x3B67),
        ("VFIO_GROUP_SET_CONTAINER", 0x3B68),
        ("VFIO_GROUP_UNSET_CONTAINER", 0x3B69),
        ("VFIO_GROUP_GET_DEVICE_FD", 0x3B6A),
        ("VFIO_DEVICE_GET_INFO", 0x3B6B),
        ("VFIO_DEVICE_GET_REGION_INFO", 0x3B6C),
        ("VFIO_DEVICE_GET_IRQ_INFO", 0x3B6D),
        ("VFIO_DEVICE_SET_IRQS", 0x3B6E),
        ("VFIO_DEVICE_RESET", 0x3B6F),
        ("VFIO_IOMMU_GET_INFO", 0x3B70),
        ("VFIO_IOMMU_MAP_DMA", 0x3B71),
        ("VFIO_IOMMU_UNMAP_DMA", 0x3B72),
    ],
)
def test_ioctl_numbers_are_the_kernels(name: str, value: int) -> None:
    assert getattr(uapi, name) == value


def test_constants_are_the_kernels() -> None:
    assert uapi.VFIO_API_VERSION == 0
    assert uapi.VFIO_TYPE1v2_IOMMU == 3
    assert (CAPS, RW_MMAP) == (8, 7)
    assert (
        uapi.VFIO_REGION_INFO_CAP_SPARSE_MMAP,
        uapi.VFIO_REGION_INFO_CAP_TYPE,
        uapi.VFIO_REGION_INFO_CAP_MSIX_MAPPABLE,
    ) == (1, 2, 3)
    assert (
        uapi.VFIO_IRQ_SET_DATA_NONE,
        uapi.VFIO_IRQ_SET_DATA_BOOL,
        uapi.VFIO_IRQ_SET_DATA_EVENTFD,
        uapi.VFIO_IRQ_SET_ACTION_MASK,
        uapi.VFIO_IRQ_SET_ACTION_UNMASK,
        uapi.VFIO_IRQ_SET_ACTION_TRIGGER,
    ) == (1, 2, 4, 8, 16, 32)


@pytest.mark.parametrize(
    ("name", "size"),
    [
        ("REGION_INFO", 32),
        ("IRQ_SET", 20),
        ("DMA_MAP", 32),
        ("DMA_UNMAP", 24),
        ("IRQ_INFO", 16),
        ("DEVICE_INFO", 16),
        ("GROUP_STATUS", 8),
        ("CAP_HEADER", 8),
        ("SPARSE_MMAP_HEAD", 8),
        ("SPARSE_AREA", 16),
        ("CAP_TYPE", 8),
    ],
)
def test_struct_sizes_are_the_kernels(name: str, size: int) -> None:
    layout = getattr(uapi, name)
    assert isinstance(layout, struct.Struct)
    assert layout.size == size


# -- region info request ------------------------------------------------------------------


def test_region_info_request_is_a_minimal_struct() -> None:
    buf = uapi.region_info_request(5)
    assert bytes(buf) == region_info(index=5)
    assert uapi.region_info_needs(buf) == HEAD


def test_region_info_request_with_room_for_caps() -> None:
    buf = uapi.region_info_request(2, 104)
    assert len(buf) == 104
    assert bytes(buf) == struct.pack("<IIIIQQ", 104, 0, 2, 0, 0, 0) + bytes(72)
    # Never smaller than the struct, whatever the caller asks.
    assert len(uapi.region_info_request(0, 8)) == HEAD


def test_region_info_needs_reads_the_kernels_argsz() -> None:
    # The kernel says how big a buffer the capability chain needs (and cap_offset 0).
    reply = struct.pack("<IIIIQQ", 88, CAPS | RW_MMAP, 4, 0, 1 << 30, 4 << 40)
    assert uapi.region_info_needs(reply) == 88
    # Not enough room: parsing the reply yields no capabilities rather than failing.
    info = parse_region_info(reply)
    assert (info.sparse_areas, info.type_cap, info.msix_mappable) == (None, None, False)


# -- parse_region_info: well-formed ----------------------------------------------------------


def test_no_caps() -> None:
    info = parse_region_info(
        region_info(flags=RW_MMAP, index=2, size=0x1000_0000, offset=2 << 40) + bytes(32)
    )
    assert info == RawRegionInfo(2, RW_MMAP, 0x1000_0000, 2 << 40)
    assert (info.sparse_areas, info.type_cap, info.msix_mappable) == (None, None, False)


def test_cap_offset_without_the_caps_flag_is_ignored() -> None:
    # Only VFIO_REGION_INFO_FLAG_CAPS makes cap_offset meaningful.
    buf = region_info(flags=RW_MMAP, cap_offset=HEAD) + msix_cap(0)
    assert not parse_region_info(buf).msix_mappable


AREAS = [(0, 0x1000), (0x3000, 0x0FFF_D000)]
ORDERS = [
    [("sparse", AREAS), ("type", (0x10DE, 1)), ("msix", None)],
    [("msix", None), ("sparse", AREAS), ("type", (0x10DE, 1))],
    [("type", (0x10DE, 1)), ("msix", None), ("sparse", AREAS)],
    [("type", (0x10DE, 1)), ("sparse", AREAS), ("msix", None)],
]


@pytest.mark.parametrize("caps", ORDERS, ids=lambda caps: "-".join(kind for kind, _ in caps))
def test_caps_chain_in_any_order(caps: list[tuple[str, object]]) -> None:
    info = parse_region_info(chain(RW_MMAP, caps))
    assert info.index == 4
    assert info.flags == RW_MMAP | CAPS
    assert (info.size, info.offset) == (1 << 30, 4 << 40)
    assert info.sparse_areas == tuple(AREAS)
    assert info.type_cap == (0x10DE, 1)
    assert info.msix_mappable


def test_caps_chain_laid_out_backwards() -> None:
    # next may point backwards: the chain is followed, not the layout.
    buf = (
        region_info(flags=CAPS, cap_offset=HEAD + 8)
        + msix_cap(0)  # at 32, the last of the chain
        + type_cap(HEAD, 3, 9)  # at 40, the first
    )
    info = parse_region_info(buf)
    assert info.type_cap == (3, 9)
    assert info.msix_mappable
    assert info.sparse_areas is None


def test_caps_not_at_the_start_of_the_tail() -> None:
    buf = region_info(flags=CAPS, cap_offset=HEAD + 24) + bytes(24) + msix_cap(0)
    assert parse_region_info(buf).msix_mappable


def test_a_single_cap() -> None:
    info = parse_region_info(chain(0, [("type", (1, 2))]))
    assert (info.sparse_areas, info.type_cap, info.msix_mappable) == (None, (1, 2), False)


def test_sparse_cap_with_zero_areas() -> None:
    # "Nothing may be mmapped": distinct from no capability (None).
    info = parse_region_info(chain(RW_MMAP, [("sparse", [])]))
    assert info.sparse_areas == ()
    assert info.type_cap is None


def test_unknown_caps_are_skipped() -> None:
    buf = (
        region_info(flags=CAPS, cap_offset=HEAD)
        + cap_header(0x7777, HEAD + 16, version=9)
        + bytes(8)
        + msix_cap(0)
    )
    info = parse_region_info(buf)
    assert info.msix_mappable
    assert (info.sparse_areas, info.type_cap) == (None, None)


# -- parse_region_info: malformed chains ------------------------------------------------------


class CountingBuffer(bytearray):
    """Fails the test, instead of hanging it, if the parser keeps walking a chain."""

    limit = 10_000

    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.calls = 0

    def __len__(self) -> int:
        self.calls += 1
        assert self.calls < self.limit, "parse_region_info is walking the chain forever"
        return super().__len__()


@pytest.mark.parametrize(
    ("buf", "message"),
    [
        # next points into the 32-byte struct itself
        (region_info(flags=CAPS, cap_offset=HEAD) + msix_cap(8), "bad capability pointer 0x8"),
        (region_info(flags=CAPS, cap_offset=HEAD) + msix_cap(31), "pointer 0x1f"),
        # cap_offset itself inside the struct
        (region_info(flags=CAPS, cap_offset=16) + bytes(16), "pointer 0x10"),
        # past the buffer, and a header that would straddle its end
        (region_info(flags=CAPS, cap_offset=HEAD) + msix_cap(0x1000), "pointer 0x1000"),
        (region_info(flags=CAPS, cap_offset=HEAD + 4) + bytes(8), "pointer 0x24"),
        (region_info(flags=CAPS, cap_offset=HEAD), "pointer 0x20"),
        (region_info(flags=CAPS, cap_offset=0xFFFF_FFFF) + bytes(8), "pointer 0xffffffff"),
        # a loop onto itself, and back to an earlier cap
        (region_info(flags=CAPS, cap_offset=HEAD) + msix_cap(HEAD), "pointer 0x20"),
        (
            region_info(flags=CAPS, cap_offset=HEAD) + msix_cap(HEAD + 8) + type_cap(HEAD, 1, 1),
            "pointer 0x20",
        ),
        (
            region_info(flags=CAPS, cap_offset=HEAD)
            + msix_cap(HEAD + 8)
            + type_cap(HEAD + 24, 1, 1)
            + sparse_cap(HEAD + 8, [(0, 0x1000)]),
            "pointer 0x28",
        ),
        # a sparse cap whose nr_areas runs past the buffer
        (
            region_info(flags=CAPS, cap_offset=HEAD)
            + cap_header(1, 0)
            + struct.pack("<II", 3, 0)
            + struct.pack("<QQ", 0, 0x1000) * 2,
            "lists 3 areas",
        ),
        (
            region_info(flags=CAPS, cap_offset=HEAD)
            + cap_header(1, 0)
            + struct.pack("<II", 0xFFFF_FFFF, 0),
            "lists 4294967295 areas",
        ),
        # a sparse cap too short for its nr_areas field
        (region_info(flags=CAPS, cap_offset=HEAD) + cap_header(1, 0) + bytes(4), "sparse-mmap"),
        # a truncated type cap
        (region_info(flags=CAPS, cap_offset=HEAD) + cap_header(2, 0) + bytes(4), "type"),
        (region_info(flags=CAPS, cap_offset=HEAD) + cap_header(2, 0), "type"),
    ],
)
def test_malformed_chain_is_a_uapi_error(buf: bytes, message: str) -> None:
    counting = CountingBuffer(buf)
    with pytest.raises(UapiError, match=message):
        parse_region_info(counting)


def test_the_error_names_the_region() -> None:
    buf = region_info(flags=CAPS, index=9, cap_offset=HEAD) + msix_cap(HEAD)
    with pytest.raises(UapiError, match=r"^region 9: "):
        parse_region_info(buf)


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=HEAD, max_size=256))
def test_arbitrary_bytes_parse_or_raise_uapi_error(data: bytes) -> None:
    try:
        parse_region_info(CountingBuffer(data))
    except UapiError:
        pass


@st.composite
def chains(draw: st.DrawFn) -> bytes:
    """Region infos with the CAPS flag and a few caps whose pointers mostly lead to each other
    (loops, back-pointers, overlaps), sometimes nowhere (0) or anywhere."""
    length = draw(st.integers(0, 160))
    tail = bytearray(draw(st.binary(max_size=length)).ljust(length, b"\0"))
    total = HEAD + length
    position = st.one_of(st.integers(HEAD, max(HEAD, total - 8)), st.integers(0, total + 8))
    positions = draw(st.lists(position, min_size=1, max_size=6))
    # one_of picks a branch uniformly: listing the caps' positions twice makes chains that
    # reach caps (and loop between them) common, which is what kills a missing bounds check.
    pointers = st.one_of(
        st.sampled_from(positions),
        st.just(0),
        st.sampled_from(positions),
        st.integers(0, total + 8),
        st.integers(0, 0xFFFF_FFFF),
    )
    buf = bytearray(region_info(flags=CAPS, cap_offset=draw(pointers)) + tail)
    for at in positions:
        cap_id = draw(st.sampled_from([1, 2, 3, 0x99]))
        header = struct.pack("<HHI", cap_id, 1, draw(pointers))
        # nr_areas for a sparse cap: small, so the areas sometimes fit and sometimes not.
        header += struct.pack("<II", draw(st.integers(0, 12)), 0)
        end = min(at + len(header), len(buf))
        if at >= HEAD and end > at:
            buf[at:end] = header[: end - at]  # a cap may be cut short by the buffer's end
    return bytes(buf)


@settings(max_examples=1000, deadline=None)
@given(chains())
def test_arbitrary_chains_parse_or_raise_uapi_error(data: bytes) -> None:
    try:
        info = parse_region_info(CountingBuffer(data))
    except UapiError:
        return
    # Whatever parsed lies inside the buffer.
    if info.sparse_areas is not None:
        assert HEAD + 16 + 16 * len(info.sparse_areas) <= len(data)


# -- irq_set -------------------------------------------------------------------------------


def test_irq_set_eventfds() -> None:
    flags = uapi.VFIO_IRQ_SET_DATA_EVENTFD | uapi.VFIO_IRQ_SET_ACTION_TRIGGER
    buf = uapi.irq_set(2, flags, 1, 3, eventfds=[7, -1, 12])
    # argsz counts the data: a 20-byte header, then one s32 per vector.
    assert bytes(buf) == struct.pack("<IIIII", 32, flags, 2, 1, 3) + struct.pack("<iii", 7, -1, 12)


def test_irq_set_bools() -> None:
    flags = uapi.VFIO_IRQ_SET_DATA_BOOL | uapi.VFIO_IRQ_SET_ACTION_MASK
    buf = uapi.irq_set(0, flags, 0, 3, data_bool=[True, False, True])
    assert bytes(buf) == struct.pack("<IIIII", 23, flags, 0, 0, 3) + b"\x01\x00\x01"


@pytest.mark.parametrize("count", [0, 1])
def test_irq_set_none(count: int) -> None:
    flags = uapi.VFIO_IRQ_SET_DATA_NONE | uapi.VFIO_IRQ_SET_ACTION_TRIGGER
    # Data passed with DATA_NONE is not sent.
    buf = uapi.irq_set(1, flags, 0, count, eventfds=[5], data_bool=[True])
    assert bytes(buf) == struct.pack("<IIIII", 20, flags, 1, 0, count)


def test_irq_set_eventfds_empty() -> None:
    flags = uapi.VFIO_IRQ_SET_DATA_EVENTFD | uapi.VFIO_IRQ_SET_ACTION_UNMASK
    assert bytes(uapi.irq_set(0, flags, 0, 0)) == struct.pack("<IIIII", 20, flags, 0, 0, 0)


def test_irq_set_is_a_mutable_buffer() -> None:
    # fcntl.ioctl needs a mutable buffer to return the ioctl's result (see device._ioctl).
    assert isinstance(uapi.irq_set(0, uapi.VFIO_IRQ_SET_DATA_NONE, 0, 0), bytearray)
    assert isinstance(uapi.region_info_request(0), bytearray)
