"""Config bytes 0x18-0x27 through the variant, byte by byte (spec nvgrace-gpu.md §4.3-§4.5)."""

from __future__ import annotations

from backends.device import CONFIG_REGION_INDEX
from tests.backends.helpers import cfg_read, cfg_write
from vgpud.variant import NvgraceVariant
from vgpud.variant.config_overlay import intersect

CFG = CONFIG_REGION_INDEX


def test_intersect_helper() -> None:
    assert intersect(0x14, 8, 0x18, 8) is not None
    hit = intersect(0x14, 8, 0x18, 8)
    assert hit is not None and (hit.buf_offset, hit.reg_offset, hit.count) == (4, 0, 4)
    hit = intersect(0x1E, 4, 0x18, 8)
    assert hit is not None and (hit.buf_offset, hit.reg_offset, hit.count) == (0, 6, 2)
    assert intersect(0x10, 8, 0x18, 8) is None
    assert intersect(0x28, 4, 0x20, 8) is None


def test_initial_values(hopper: NvgraceVariant) -> None:
    assert [cfg_read(hopper, off, 4) for off in (0x18, 0x1C, 0x20, 0x24)] == [0xC, 0, 0xC, 0]
    assert cfg_read(hopper, 0x18, 1) == 0x0C


def test_sizing(hopper: NvgraceVariant) -> None:
    for off in (0x18, 0x1C, 0x20, 0x24):
        cfg_write(hopper, off, 4, 0xFFFFFFFF)
    assert cfg_read(hopper, 0x18, 4) == 0x8000000C  # 2 GiB resmem
    assert cfg_read(hopper, 0x1C, 4) == 0xFFFFFFFF
    assert cfg_read(hopper, 0x20, 4) == 0x0000000C  # >= 4 GiB
    assert cfg_read(hopper, 0x24, 4) == 0xFFFFFFE0  # ~((128 GiB - 1) >> 32)


def test_single_byte_writes_are_verbatim(hopper: NvgraceVariant) -> None:
    cfg_write(hopper, 0x1B, 1, 0xC0)  # bar_val byte 3
    assert hopper.overlay.resmem is not None
    assert hopper.overlay.resmem.bar_val == 0xC000_0000
    assert cfg_read(hopper, 0x18, 4) == 0x8000000C  # truncated to 2 GiB alignment
    cfg_write(hopper, 0x20, 1, 0x37)  # low nibble and more: kept verbatim, masked on read
    assert hopper.overlay.usemem.bar_val == 0x37
    assert cfg_read(hopper, 0x20, 4) == 0xC
    cfg_write(hopper, 0x25, 1, 0x12)
    assert cfg_read(hopper, 0x24, 4) == 0x1200
    assert cfg_read(hopper, 0x25, 1) == 0x12


def test_writes_never_reach_the_backend(hopper: NvgraceVariant) -> None:
    cfg_write(hopper, 0x20, 4, 0xFFFFFFFF)
    # The raw device has no BAR4: its bytes stay zero whatever the guest wrote.
    assert hopper.backend.region_read(CFG, 0x20, 8) == bytes(8)


def test_read_straddling_into_bar2(hopper: NvgraceVariant) -> None:
    cfg_write(hopper, 0x10, 4, 0xFD000000)  # BAR0 (the backend's)
    cfg_write(hopper, 0x18, 4, 0x80000000)
    data = hopper.region_read(CFG, 0x14, 8)
    assert data[:4] == bytes(4)  # BAR0 upper dword from the backend
    assert data[4:] == (0x8000000C).to_bytes(4, "little")
    data = hopper.region_read(CFG, 0x10, 12)
    assert int.from_bytes(data[:4], "little") == 0xFD000004


def test_if_else_chain_patches_only_bar2(hopper: NvgraceVariant) -> None:
    # A request touching both registers only emulates the first one (§4.3 step 3); the
    # BAR4 bytes come from the backend, where BAR4 does not exist.
    data = hopper.region_read(CFG, 0x18, 16)
    assert data[:8] == (0xC).to_bytes(8, "little")
    assert data[8:] == bytes(8)
    data = hopper.region_read(CFG, 0x1E, 4)
    assert data == bytes(4)  # bar_val bytes 6-7 (0) then backend 0x20-0x21 (0)
    whole = hopper.region_read(CFG, 0, 4096)
    assert whole[0x18] == 0x0C and whole[0x20] == 0
    assert hopper.region_read(CFG, 0x20, 8) == (0xC).to_bytes(8, "little")


def test_straddling_write_applies_only_the_register_part(hopper: NvgraceVariant) -> None:
    before = hopper.backend.region_read(CFG, 0x14, 4)
    hopper.region_write(CFG, 0x14, b"\xaa\xbb\xcc\xdd" + (0xC0000000).to_bytes(4, "little"))
    assert hopper.overlay.resmem is not None and hopper.overlay.resmem.bar_val == 0xC0000000
    assert hopper.backend.region_read(CFG, 0x14, 4) == before  # dropped, like the kernel
    hopper.region_write(CFG, 0x1C, b"\x01\x02\x03\x04\x05\x06\x07\x08")
    assert hopper.overlay.resmem.bar_val == 0x04030201_C0000000
    assert hopper.overlay.usemem.bar_val == 0


def test_reset_and_open_clear_close_keeps(hopper: NvgraceVariant) -> None:
    cfg_write(hopper, 0x24, 4, 0x100)
    hopper.close()
    assert cfg_read(hopper, 0x24, 4) == 0x100
    hopper.open()
    assert cfg_read(hopper, 0x24, 4) == 0
    cfg_write(hopper, 0x1C, 4, 0x100)
    hopper.reset()
    assert cfg_read(hopper, 0x1C, 4) == 0


def test_rest_of_config_is_the_backend(hopper: NvgraceVariant) -> None:
    assert cfg_read(hopper, 0, 4) == 0x2342_10DE
    cfg_write(hopper, 0x3C, 1, 0x0A)
    assert cfg_read(hopper.backend, 0x3C, 1) == 0x0A


def test_blackwell_bar2_is_the_backend(blackwell: NvgraceVariant) -> None:
    assert blackwell.overlay.resmem is None
    assert cfg_read(blackwell, 0x18, 4) == 0xC  # the real BAR1: 64-bit prefetchable
    cfg_write(blackwell, 0x18, 4, 0xFFFFFFFF)
    assert cfg_read(blackwell, 0x18, 4) == 0xFC00000C  # 64 MiB real BAR1 sizing
    assert cfg_read(blackwell.backend, 0x18, 4) == 0xFC00000C
    cfg_write(blackwell, 0x20, 4, 0xFFFFFFFF)
    cfg_write(blackwell, 0x24, 4, 0xFFFFFFFF)
    assert cfg_read(blackwell, 0x20, 4) == 0xC
    assert cfg_read(blackwell, 0x24, 4) == 0xFFFFFFC0  # 256 GiB usemem
    # The if/else chain picks the (absent) resmem: nothing emulated for this request.
    assert blackwell.region_read(CONFIG_REGION_INDEX, 0x18, 16)[8:] == bytes(8)
