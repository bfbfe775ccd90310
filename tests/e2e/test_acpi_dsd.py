"""The SSDT test_kernel_driver.py gives its guest, checked byte by byte without a guest."""

from __future__ import annotations

import struct

import pytest

from tests.e2e.acpi_dsd import BASE_PROPERTY, SIZE_PROPERTY, gpu_memory_dsd, pkg_length

PATH = ("_SB_", "PCI0", "S08_", "S00_")


def decode_pkg_length(data: bytes) -> tuple[int, int]:
    """(PkgLength value, bytes it takes), as ACPI 6.5 §20.2.4 reads it."""
    extra = data[0] >> 6
    if extra == 0:
        return data[0] & 0x3F, 1
    value = data[0] & 0xF
    for index in range(extra):
        value |= data[1 + index] << (4 + 8 * index)
    return value, 1 + extra


@pytest.mark.parametrize("body", [0, 1, 62, 63, 64, 0xFFD, 0xFFE, 0xFFFFD, 0xFFFFE, 0xFFFFFFB])
def test_pkg_length_counts_itself_in_the_shortest_form(body: int) -> None:
    encoded = pkg_length(body)
    value, used = decode_pkg_length(encoded)
    assert used == len(encoded)
    assert value == body + used
    # The shortest form that holds it: one byte up to 63, then 2^12, 2^20, 2^28.
    limits = [0x40, 1 << 12, 1 << 20, 1 << 28]
    assert all(body + n + 1 >= limits[n] for n in range(used - 1))


def test_pkg_length_of_a_package_too_long() -> None:
    with pytest.raises(ValueError):
        pkg_length(1 << 28)


def test_the_dsd_names_the_device_and_both_properties() -> None:
    aml = gpu_memory_dsd(PATH, 0x1000_0000, 0x6800_0000)
    assert aml[0] == 0x10  # ScopeOp
    length, used = decode_pkg_length(aml[1:])
    assert length == len(aml) - 1  # the scope holds everything after its opcode
    name = aml[1 + used :]
    assert name.startswith(b"\\\x2f\x04_SB_PCI0S08_S00_")
    dsd = name[3 + 16 :]
    assert dsd.startswith(b"\x08_DSD\x12")  # Name(_DSD, Package
    # ToUUID("daffd814-6eba-4d8c-8a91-bc9bbf4aa301"), in its mixed-endian byte order.
    assert bytes.fromhex("14d8ffdaba6e8c4d8a91bc9bbf4aa301") in dsd
    for key, value in ((BASE_PROPERTY, 0x1000_0000), (SIZE_PROPERTY, 0x6800_0000)):
        pair = b"\x0d" + key.encode() + b"\x00\x0e" + struct.pack("<Q", value)
        assert pair in dsd


@pytest.mark.parametrize(("base", "size"), [(1 << 32, 1 << 30), (0, 1 << 32), (-1, 1)])
def test_values_q35_cannot_hold_are_refused(base: int, size: int) -> None:
    with pytest.raises(ValueError):
        gpu_memory_dsd(PATH, base, size)


def test_a_name_segment_is_four_characters() -> None:
    with pytest.raises(ValueError):
        gpu_memory_dsd(("_SB", "PCI0"), 0, 1)
