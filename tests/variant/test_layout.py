"""compute_layout against spec nvgrace-gpu.md §3.2, table-driven and by property."""

from __future__ import annotations

import errno

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vgpud.variant.layout import (
    GIB,
    MEMBLK_SIZE,
    MIB,
    LayoutError,
    compute_layout,
    masked_bar,
)

P = 0x4000_0000_0000

# L -> (usemem.memlength, usemem.bar_size, resmem.memlength, resmem.bar_size), Hopper.
HOPPER = [
    (96 * GIB, 95 * GIB, 128 * GIB, GIB, GIB),
    (95 * GIB + 768 * MIB, 94 * GIB + 512 * MIB, 128 * GIB, GIB + 256 * MIB, 2 * GIB),  # §3.2
    (144 * GIB, 143 * GIB, 256 * GIB, GIB, GIB),
    (GIB + 512 * MIB, 512 * MIB, 512 * MIB, GIB, GIB),  # smallest legal size
    (2 * GIB, GIB, GIB, GIB, GIB),
    (2 * GIB + 256 * MIB, GIB, 2 * GIB, GIB + 256 * MIB, 2 * GIB),
    (129 * GIB, 128 * GIB, 128 * GIB, GIB, GIB),  # L - 1 GiB exactly a power of two
    # Just above: bar_size from the value before the round-down is one power larger.
    (129 * GIB + 1, 128 * GIB, 256 * GIB, GIB + 1, 2 * GIB),
    (129 * GIB + 512 * MIB, 128 * GIB + 512 * MIB, 256 * GIB, GIB, GIB),
    (129 * GIB - 1, 127 * GIB + 512 * MIB, 128 * GIB, GIB + 512 * MIB - 1, 2 * GIB),
    (8 * GIB, 7 * GIB, 8 * GIB, GIB, GIB),  # the captures' positive control
]

# L -> usemem.bar_size, Blackwell.
BLACKWELL = [
    (186 * GIB, 256 * GIB),
    (279 * GIB, 512 * GIB),
    (256 * GIB, 256 * GIB),
    (256 * GIB + 1, 512 * GIB),
    (256 * GIB - 1, 256 * GIB),
    (1, 1),
    (4096, 4096),
    (1 << 63, 1 << 63),
]


@pytest.mark.parametrize(("length", "use_len", "use_bar", "res_len", "res_bar"), HOPPER)
def test_hopper_table(length: int, use_len: int, use_bar: int, res_len: int, res_bar: int) -> None:
    layout = compute_layout(P, length, True)
    assert layout.resmem is not None
    assert (layout.usemem.memphys, layout.usemem.memlength, layout.usemem.bar_size) == (
        P,
        use_len,
        use_bar,
    )
    assert (layout.resmem.memphys, layout.resmem.memlength, layout.resmem.bar_size) == (
        P + use_len,
        res_len,
        res_bar,
    )


@pytest.mark.parametrize(("length", "bar"), BLACKWELL)
def test_blackwell_table(length: int, bar: int) -> None:
    layout = compute_layout(P, length, False)
    assert layout.resmem is None
    assert (layout.usemem.memphys, layout.usemem.memlength, layout.usemem.bar_size) == (
        P,
        length,
        bar,
    )


@pytest.mark.parametrize(
    ("memphys", "length", "bug", "err"),
    [
        (P, 0, True, errno.ENOMEM),
        (P, 0, False, errno.ENOMEM),
        (P, GIB - 1, True, errno.EOVERFLOW),  # underflow of L - 1 GiB
        (P, 1, True, errno.EOVERFLOW),
        (P, GIB, True, errno.EINVAL),  # no usemem at all
        (P, GIB + 512 * MIB - 1, True, errno.EINVAL),  # rounds down to 0
        (P, GIB + 1, True, errno.EINVAL),
        ((1 << 64) - GIB, 2 * GIB, True, errno.EOVERFLOW),  # resmem.memphys overflows
        (1 << 64, GIB, False, errno.EOVERFLOW),  # memphys beyond phys_addr_t
        (P, 1 << 64, False, errno.EOVERFLOW),  # memlength beyond size_t
        (P, (1 << 63) + 1, False, errno.EOVERFLOW),  # bar_size beyond 64 bits
    ],
)
def test_refused(memphys: int, length: int, bug: bool, err: int) -> None:
    with pytest.raises(LayoutError) as exc:
        compute_layout(memphys, length, bug)
    assert exc.value.errno == err


def _pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


@given(
    memphys=st.integers(0, 1 << 52).map(lambda x: x & ~0xFFF),
    length=st.integers(GIB + 512 * MIB, 1 << 50),
)
def test_hopper_properties(memphys: int, length: int) -> None:
    layout = compute_layout(memphys, length, True)
    use, res = layout.usemem, layout.resmem
    assert res is not None
    assert use.memphys == memphys
    assert use.memlength % MEMBLK_SIZE == 0 and use.memlength > 0
    assert res.memphys == memphys + use.memlength  # resmem right after usemem...
    assert res.memphys + res.memlength == memphys + length  # ...at the tail
    assert GIB <= res.memlength < GIB + MEMBLK_SIZE
    for region in (use, res):
        assert _pow2(region.bar_size) and region.bar_size >= region.memlength
        assert region.bar_size < 2 * max(region.memlength, length - GIB)
    assert res.bar_size in (GIB, 2 * GIB)
    assert use.bar_size == 1 << (length - GIB - 1).bit_length()


@given(length=st.integers(1, 1 << 62))
def test_blackwell_properties(length: int) -> None:
    layout = compute_layout(P, length, False)
    assert layout.resmem is None and layout.usemem.memlength == length
    assert _pow2(layout.usemem.bar_size)
    assert length <= layout.usemem.bar_size < 2 * length


@pytest.mark.parametrize(
    ("bar_val", "bar_size", "expected"),
    [
        (0, GIB, 0xC),
        ((1 << 64) - 1, 128 * GIB, 0xFFFF_FFE0_0000_000C),  # sizing, §4.5
        ((1 << 64) - 1, GIB, 0xFFFF_FFFF_C000_000C),
        ((1 << 64) - 1, 2 * GIB, 0xFFFF_FFFF_8000_000C),
        (0x12_3456_789A, 2 * GIB, 0x12_0000_000C),  # address truncated to alignment
    ],
)
def test_masked_bar(bar_val: int, bar_size: int, expected: int) -> None:
    assert masked_bar(bar_val, bar_size) == expected
