"""Cutting the received byte stream into messages, and pinning fds to them.

fds travel with the first byte of their message (spec vfio-user.md §1 "FD passing"): the
transport reads ``bytes_wanted`` at a time, so a read never spans two messages, and the fds
of one ``recvmsg`` are fed in with its bytes. Here fds are recorded at the stream offset of
the first byte of the chunk they came with; a message owns the fds recorded at its own first
byte. fds recorded anywhere inside a message mean the stream is out of step: fatal.
"""

from __future__ import annotations

import errno
from collections.abc import Sequence

from protocol.errors import RemoteProtocolError
from protocol.header import (
    FLAG_NO_REPLY,
    FLAG_TYPE_COMMAND,
    FLAG_TYPE_MASK,
    FLAG_TYPE_REPLY,
    HEADER_SIZE,
    HEADER_STRUCT,
)

_unpack_header = HEADER_STRUCT.unpack_from


class Frame:
    """One complete message: the header's fields, the payload and the fds that came with it.

    Internal to the connection and built once per message, so a plain slotted class rather
    than a :class:`~protocol.header.Header`: the header fields come from ``struct`` unpacking
    (so they fit their widths) and :meth:`FrameReader._check` has vetted type and size, so
    the dataclass's own checks would only repeat them.
    """

    __slots__ = ("command", "error", "fds", "flags", "msg_id", "payload", "size")

    def __init__(
        self,
        head: tuple[int, int, int, int, int],
        payload: bytes,
        fds: tuple[int, ...],
    ) -> None:
        self.msg_id, self.command, self.size, self.flags, self.error = head
        self.payload = payload
        self.fds = fds

    @property
    def no_reply(self) -> bool:
        """The NO_REPLY bit."""
        return bool(self.flags & FLAG_NO_REPLY)


class FrameReader:
    """Accumulates bytes + fds; yields whole frames. Owns the fds until they are handed out.

    ``max_size`` bounds the ``size`` field: a larger header is fatal before any body is
    buffered, so a peer cannot make us allocate more than that.
    """

    def __init__(self, max_size: int) -> None:
        self.max_size = max_size
        self._buf = bytearray()
        self._base = 0  # stream offset of _buf[0]
        self._marks: list[tuple[int, list[int]]] = []  # (stream offset, fds), ascending
        # (msg_id, command, size, flags, error) of the message at _buf[0], once checked.
        self._head: tuple[int, int, int, int, int] | None = None
        # The same for a message read exactly (feed_header), whose body is not buffered here.
        self._exact: tuple[int, int, int, int, int] | None = None
        self.eof = False

    def feed(self, data: bytes, fds: Sequence[int]) -> None:
        """Append ``data`` (``b""`` = EOF) and record ``fds`` at its first byte."""
        if fds:
            at = self._base + len(self._buf)
            if self._marks and self._marks[-1][0] == at:
                self._marks[-1][1].extend(fds)
            else:
                self._marks.append((at, list(fds)))
        if data:
            self._buf += data
        else:
            self.eof = True

    @property
    def idle(self) -> bool:
        """At a message boundary with nothing buffered or pending: ``feed_header`` may run."""
        return not self._buf and not self._marks and self._exact is None and not self.eof

    @property
    def exact_pending(self) -> bool:
        """``feed_header`` ran and ``feed_body`` has not yet."""
        return self._exact is not None

    def feed_header(self, header: bytes, fds: Sequence[int]) -> int:
        """Exact reads: the next message's whole header and the fds read with it (``idle``
        must hold). Checked like ``next_frame`` checks a buffered header; returns the body
        length to read next."""
        if fds:
            self._marks.append((self._base, list(fds)))
        head = self._exact = self._check(_unpack_header(header))
        return head[2] - HEADER_SIZE

    def feed_body(self, body: bytes, stray_fds: Sequence[int], eof: bool) -> Frame:
        """The body ``feed_header`` announced, whole unless ``eof``; ``stray_fds`` came with
        body bytes. Both of those are fatal, as they are for buffered reads."""
        head = self._exact
        assert head is not None, "feed_body() without feed_header()"
        size = head[2]
        # In next_frame's order: fds inside the message first (whether or not the body is
        # all there: a reader stops reading a body as soon as fds come with it), then a
        # short message.
        if stray_fds:
            self._marks.append((self._base + HEADER_SIZE, list(stray_fds)))
            raise self.fatal("fds arrived after the first byte of a message")
        if eof or len(body) != size - HEADER_SIZE:
            self.eof = True
            raise self.fatal(f"EOF inside a {size}-byte message")
        fds = tuple(self._marks.pop()[1]) if self._marks else ()
        self._exact = None
        self._base += size
        return Frame(head, body, fds)

    def skip(self, size: int) -> None:
        """A whole ``size``-byte message was consumed without this reader (``idle`` held):
        keep the stream offsets that fds are placed by."""
        self._base += size

    def release_fds(self) -> tuple[int, ...]:
        """Hand back every fd still held (after a fatal error)."""
        fds = tuple(fd for _, group in self._marks for fd in group)
        self._marks.clear()
        return fds

    def fatal(self, reason: str, err: int = errno.EPROTO) -> RemoteProtocolError:
        """A fatal error carrying every fd still held."""
        return RemoteProtocolError(reason, errno=err, fatal=True, fds=self.release_fds())

    @property
    def bytes_wanted(self) -> int:
        """Bytes to read so that the read ends at or before the next message boundary."""
        if self._exact is not None:
            return self._exact[2] - HEADER_SIZE
        buffered = len(self._buf)
        head = self._head
        if head is not None and buffered < head[2]:
            # The usual case between the header read and the body read: no need to parse
            # the (already checked) header again.
            return head[2] - buffered
        pos = 0
        while buffered - pos >= HEADER_SIZE:
            size: int = _unpack_header(self._buf, pos)[2]
            if size < HEADER_SIZE:
                return HEADER_SIZE  # next_event() will report it; any read is as good
            if buffered - pos < size:
                return size - (buffered - pos)
            pos += size
        return HEADER_SIZE - (buffered - pos)

    def next_frame(self) -> Frame | None:
        """The next whole message, or None if more bytes are needed.

        Raises a fatal RemoteProtocolError for a broken stream, including EOF inside a
        message or fds with no message to belong to. At a clean EOF returns None with
        ``eof`` set and no fds held.
        """
        buf = self._buf
        if len(buf) < HEADER_SIZE:
            if self.eof and (buf or self._marks):
                what = "EOF inside a message header" if buf else "fds with no message"
                raise self.fatal(what)
            return None
        head = self._head
        if head is None:
            # Checked as soon as the header is in, before any of the body is buffered; kept
            # so the reads that complete the body do not parse it again.
            head = self._head = self._check(_unpack_header(buf))
        size = head[2]
        fds: tuple[int, ...] = ()
        marks = self._marks
        if marks:
            # Fatal as soon as they are here, not once the body is complete: a peer could
            # otherwise trickle a large body with fds on every byte and have us hold them all.
            start, end = self._base, self._base + size
            inside = [at for at, _ in marks if at < end]
            if any(at != start for at in inside):
                raise self.fatal("fds arrived after the first byte of a message")
        if len(buf) < size:
            if self.eof:
                raise self.fatal(f"EOF inside a {size}-byte message")
            return None
        if marks and marks[0][0] == self._base:
            fds = tuple(marks.pop(0)[1])
        payload = bytes(buf[HEADER_SIZE:size])
        del buf[:size]
        self._base += size
        self._head = None
        return Frame(head, payload, fds)

    def _check(self, head: tuple[int, int, int, int, int]) -> tuple[int, int, int, int, int]:
        kind = head[3] & FLAG_TYPE_MASK
        if kind not in (FLAG_TYPE_COMMAND, FLAG_TYPE_REPLY):
            # Spec §2: QEMU marks the connection broken for any other type.
            raise self.fatal(f"message type {kind} is neither command nor reply")
        size = head[2]
        if size < HEADER_SIZE:
            raise self.fatal(f"message size {size} < {HEADER_SIZE}")
        if size > self.max_size:
            raise self.fatal(f"message size {size} > limit {self.max_size}", errno.E2BIG)
        return head
