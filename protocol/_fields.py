"""Field checks shared by every message dataclass.

Messages validate themselves in ``__post_init__`` and raise :class:`LocalProtocolError` (we
built a bad message). Decoders run the same constructors inside :func:`peer_input`, which turns
that into :class:`RemoteProtocolError` (the peer sent a bad message), so one set of rules
serves both directions.
"""

from __future__ import annotations

import errno
import struct
from collections.abc import Callable
from dataclasses import fields
from types import TracebackType
from typing import Any

from protocol.errors import LocalProtocolError, RemoteProtocolError


def require(condition: bool, reason: str, err: int = errno.EINVAL) -> None:
    """Raise LocalProtocolError(reason) unless ``condition``."""
    if not condition:
        raise LocalProtocolError(reason, errno=err)


def check_uint(obj: object, bits: int, *names: str) -> None:
    """Each named attribute of ``obj`` is an int (not bool) that fits in ``bits`` unsigned bits."""
    limit = 1 << bits
    for name in names:
        value = getattr(obj, name)
        # Fast path first: this runs for every field of every message on the hot path.
        if type(value) is int and 0 <= value < limit:
            continue
        if isinstance(value, bool) or not isinstance(value, int):
            raise LocalProtocolError(f"{name} must be an int, not {type(value).__name__}")
        if not 0 <= value < limit:
            raise LocalProtocolError(f"{name}={value} does not fit in u{bits}")


def check_bytes(obj: object, *names: str) -> None:
    """Each named attribute of ``obj`` is ``bytes`` (so messages stay hashable and immutable)."""
    for name in names:
        if type(getattr(obj, name)) is not bytes:
            raise LocalProtocolError(f"{name} must be bytes")


def no_overflow(base: int, length: int, bits: int = 64) -> bool:
    """``base + length`` does not wrap a ``bits``-wide address (the kernel's check_add_overflow)."""
    return base + length <= 1 << bits


class peer_input:  # noqa: N801 (used like the function-style context managers it replaced)
    """Decode a peer's payload: any validation failure becomes a non-fatal RemoteProtocolError.

    A plain class rather than ``@contextmanager``: it wraps every decode on the hot path.
    """

    __slots__ = ("what",)

    def __init__(self, what: str) -> None:
        self.what = what

    def __enter__(self) -> None:
        return None

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is None:
            return
        if isinstance(exc, LocalProtocolError):
            raise RemoteProtocolError(f"{self.what}: {exc.message}", errno=exc.errno) from None
        if isinstance(exc, struct.error | ValueError | TypeError):
            raise RemoteProtocolError(f"{self.what}: {exc}") from None


def exact_length(payload: bytes, size: int, what: str) -> None:
    """The payload is exactly ``size`` bytes."""
    require(len(payload) == size, f"{what} payload is {len(payload)} bytes, expected {size}")


def min_length(payload: bytes, size: int, what: str) -> None:
    """The payload holds at least ``size`` bytes."""
    require(len(payload) >= size, f"{what} payload is {len(payload)} bytes, needs >= {size}")


def slot_setters(cls: type, *names: str) -> tuple[Callable[[object, Any], None], ...]:
    """The slot setters of a frozen, slotted dataclass, for a trusted constructor.

    A frozen dataclass's ``__init__`` stores each field through ``object.__setattr__`` and then
    runs ``__post_init__``: about 0.7 µs for five fields, several times per trapped access.
    The few constructors on that path (decoders whose values already passed every check
    ``__post_init__`` would make, and events with no checks at all) store through the slot
    descriptors instead, which frozen does not intercept. ``names`` must be every field, in
    order, so no slot of a trusted object is ever left unset.
    """
    if names != tuple(field.name for field in fields(cls)):
        raise TypeError(f"{cls.__name__} fields are not {names}")
    return tuple(cls.__dict__[name].__set__ for name in names)
