"""An SSDT that gives a guest's GPU the firmware properties of a Grace host.

The kernel's nvgrace-gpu driver learns where device memory is from two ACPI ``_DSD``
properties of the GPU's companion device, ``nvidia,gpu-mem-base-pa`` and
``nvidia,gpu-mem-size`` (spec nvgrace-gpu.md §2.1). A q35 guest's firmware has no such
thing, so tests/e2e/test_kernel_driver.py hands QEMU this table (``-acpitable``): it adds a
``_DSD`` to the ACPI device QEMU's DSDT already has for the GPU's slot, pointing at guest RAM
that the guest kernel was told to leave alone (``memmap=``).

The AML is built here byte by byte: a ``Scope`` naming the device, holding one ``Name(_DSD,
Package{ToUUID(device properties), Package{Package{key, value}...}})``. ACPI 6.5 §20 is the
encoding (PkgLength §20.2.4, the opcodes §20.2.5); the UUID is the one the device-properties
_DSD spec defines. Integers are QWordConst, but note that the *DSDT's* revision sets the
integer width of every table: q35's is 1, i.e. 32-bit, so a value above 4 GiB would be cut
(seen with QEMU 11.1.3 and Linux 6.12: the base came out as 0). Keep addresses below 4 GiB.
"""

from __future__ import annotations

import struct
import uuid
from collections.abc import Sequence

DEVICE_PROPERTIES_UUID = uuid.UUID("daffd814-6eba-4d8c-8a91-bc9bbf4aa301")
BASE_PROPERTY = "nvidia,gpu-mem-base-pa"
SIZE_PROPERTY = "nvidia,gpu-mem-size"
# AML opcodes (ACPI 6.5 §20.2).
SCOPE_OP = b"\x10"
NAME_OP = b"\x08"
BUFFER_OP = b"\x11"
PACKAGE_OP = b"\x12"
BYTE_PREFIX = b"\x0a"
STRING_PREFIX = b"\x0d"
QWORD_PREFIX = b"\x0e"
ROOT_CHAR = b"\\"
MULTI_NAME_PREFIX = b"\x2f"


def pkg_length(body: int) -> bytes:
    """The PkgLength of a package whose contents after it are ``body`` bytes long: it counts
    its own 1-4 bytes too. One byte holds up to 63; longer forms put the byte count in bits
    6-7 of the first byte, the low nibble there and the rest in the following bytes."""
    if body + 1 < 0x40:
        return bytes([body + 1])
    for extra in (1, 2, 3):
        total = body + 1 + extra
        if total < 1 << (4 + 8 * extra):
            return bytes([extra << 6 | total & 0xF]) + (total >> 4).to_bytes(extra, "little")
    raise ValueError(f"an AML package of {body} bytes is too long")


def _package_of(op: bytes, body: bytes) -> bytes:
    return op + pkg_length(len(body)) + body


def _string(text: str) -> bytes:
    return STRING_PREFIX + text.encode("ascii") + b"\0"


def _qword(value: int) -> bytes:
    return QWORD_PREFIX + struct.pack("<Q", value)


def _package(*elements: bytes) -> bytes:
    return _package_of(PACKAGE_OP, bytes([len(elements)]) + b"".join(elements))


def _buffer(data: bytes) -> bytes:
    return _package_of(BUFFER_OP, BYTE_PREFIX + bytes([len(data)]) + data)


def _name_seg(segment: str) -> bytes:
    if len(segment) != 4 or not segment.isascii():
        raise ValueError(f"an ACPI name segment is 4 characters, not {segment!r}")
    return segment.encode("ascii")


def gpu_memory_dsd(path: Sequence[str], base: int, size: int) -> bytes:
    """The SSDT body (AML, no table header: QEMU's ``-acpitable data=`` adds one) that gives
    the device at absolute ``path`` (e.g. ``("_SB_", "PCI0", "S08_", "S00_")``) the two
    memory properties."""
    for value in (base, size):
        if not 0 <= value < 1 << 32:
            raise ValueError(f"{value:#x} does not fit the 32-bit integers of q35's ACPI")
    properties = _package(
        _package(_string(BASE_PROPERTY), _qword(base)),
        _package(_string(SIZE_PROPERTY), _qword(size)),
    )
    dsd = NAME_OP + b"_DSD" + _package(_buffer(DEVICE_PROPERTIES_UUID.bytes_le), properties)
    name = ROOT_CHAR + MULTI_NAME_PREFIX + bytes([len(path)])
    name += b"".join(_name_seg(segment) for segment in path)
    return _package_of(SCOPE_OP, name + dsd)
