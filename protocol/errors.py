"""The two error directions of the protocol (STYLE.md, h11 section).

* :class:`RemoteProtocolError`: the *peer* broke the protocol. Raised by message decoders
  (``unpack``) with ``fatal=False`` -- the connection turns those into
  :class:`~protocol.events.RejectedRequest` events -- and by ``next_event()`` with
  ``fatal=True`` when the byte stream can no longer be trusted. It carries every fd the
  connection swallowed so the caller can close them (fd conservation).
* :class:`LocalProtocolError`: *we* misused the API (a bug in the caller), e.g. replying twice
  or building a message with out-of-range fields.
"""

from __future__ import annotations

import errno as _errno
from collections.abc import Sequence


class ProtocolError(Exception):
    """Base class of every error this package raises on purpose.

    ``errno`` is the positive errno that best describes the problem; for a rejected request it
    is what the error reply should carry.
    """

    def __init__(self, message: str, *, errno: int = _errno.EINVAL) -> None:
        super().__init__(message)
        self.message = message
        self.errno = errno


class RemoteProtocolError(ProtocolError):
    """The peer broke the protocol.

    ``fatal`` says whether the stream is lost (the connection is BROKEN and every further call
    raises again) or only one well-framed message was bad. ``fds`` are the descriptors the
    connection received and gives back with this error; the caller must close them.
    """

    def __init__(
        self,
        message: str,
        *,
        errno: int = _errno.EINVAL,
        fatal: bool = False,
        fds: Sequence[int] = (),
    ) -> None:
        super().__init__(message, errno=errno)
        self.fatal = fatal
        self.fds: tuple[int, ...] = tuple(fds)


class LocalProtocolError(ProtocolError):
    """We misused the API: a bug in the caller, never the peer's fault."""
