"""Byte sizes as people write them: ``96GiB``, ``512M``, ``0x4000000``."""

from __future__ import annotations

import re
from fractions import Fraction

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1 << 10,
    "kib": 1 << 10,
    "m": 1 << 20,
    "mib": 1 << 20,
    "g": 1 << 30,
    "gib": 1 << 30,
    "t": 1 << 40,
    "tib": 1 << 40,
    # Decimal units exist so that "1GB" is not silently read as GiB.
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "tb": 1000**4,
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(text: str | int) -> int:
    """Parse a size; raise ValueError with a message naming the bad input."""
    if isinstance(text, bool):
        raise ValueError(f"not a size: {text!r}")
    if isinstance(text, int):
        if text < 0:
            raise ValueError(f"size must not be negative: {text}")
        return text
    if text.strip().lower().startswith("0x"):
        try:
            return int(text, 16)
        except ValueError:
            raise ValueError(f"not a size: {text!r}") from None
    match = _SIZE.match(text)
    if match is None or match.group(2).lower() not in _UNITS:
        raise ValueError(f"not a size: {text!r} (examples: 96GiB, 512MiB, 4096)")
    number, unit = match.groups()
    # Exact, not a float: 1.001GB came out 1000999999.9999999 bytes (refused as not whole)
    # and 16.0000000000000001GiB exactly 16 GiB (accepted as if that had been written).
    scaled = Fraction(number) * _UNITS[unit.lower()]
    if scaled.denominator != 1:
        raise ValueError(f"size is not a whole number of bytes: {text!r}")
    return int(scaled)


def format_size(size: int) -> str:
    """The shortest exact binary-unit spelling: 103079215104 -> '96GiB'."""
    for suffix, unit in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size and size % unit == 0:
            return f"{size // unit}{suffix}"
    return f"{size}B"
