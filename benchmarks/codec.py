"""Per-message Python cost of a trapped access, without sockets or trio.

Feeds prebuilt REGION_READ / REGION_WRITE messages through a real ``ServerConnection`` and a
real ``Session`` over the default device, exactly as ``Session._on_header`` does: the
trapped-access fast path (``trapped_access_body``, ``receive_trapped_access``, then
``Session._serve_access``). The gap between this and ``benchmarks.roundtrip`` is syscalls
plus trio.

Stages, each timed over the whole run:
- ``frame``: the connection's two fast-path calls, until the ``TrappedAccess`` is out (header
  checks, state and direction checks, access decode);
- ``handle``: ``Session._serve_access`` (bounds check, device call, reply bytes);
- ``total``: both, in one loop (what the server pays per message in Python);
- ``general``: the same messages through the general path instead (``receive_header``,
  ``receive_body``, ``Session._dispatch``), which every other message takes.

    python -m benchmarks.codec [--iterations 50000] [--json]
"""

from __future__ import annotations

import argparse
import gc
import json
import struct
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import protocol as p
from vgpud.config import single_device
from vgpud.devices import build_device
from vgpud.server.session import Session

HEADER = struct.Struct("<HHIII")
ACCESS = struct.Struct("<QII")
CONFIG_REGION = 7
BAR0_REGION = 0
C2C_LINK_BAR0_OFFSET = 0x1498  # spec nvgrace-gpu.md §7.1


class _NullLog:
    """Session logs nothing above debug on the hot path; this keeps structlog out of it."""

    def __getattr__(self, name: str) -> Any:
        return lambda *args, **kwargs: None


def _messages(
    command: int, region: int, offset: int, data: bytes | None, n: int
) -> list[tuple[bytes, bytes]]:
    """``n`` messages as (header, body) reads, with distinct msg_ids (the pending-request
    table sees real keys)."""
    out = []
    for i in range(n):
        if data is None:
            body = ACCESS.pack(offset, region, 4)
        else:
            body = ACCESS.pack(offset, region, len(data)) + data
        out.append((HEADER.pack((i + 1) & 0xFFFF, command, 16 + len(body), 0, 0), body))
    return out


def _session(tmp: str) -> Session:
    config = single_device(
        socket_path=None, memory_size="8GiB", backing_dir=Path(tmp) / "mem", name="bench"
    )
    built = build_device(config)
    session = Session(None, built.device, p.Capabilities(max_msg_fds=16), _NullLog())  # type: ignore[arg-type]
    built.device.open()
    client = p.ClientConnection(p.Capabilities(max_msg_fds=16))
    _, out = client.version_request()
    session.conn.receive_data(out.data)
    event = session.conn.next_event()
    assert isinstance(event, p.Request)
    assert session._handle(event) is not None
    return session


def _feed(session: Session, messages: list[tuple[bytes, bytes]]) -> tuple[float, float]:
    """Frame and handle in two timed halves: (µs framing, µs handling) per message."""
    conn = session.conn
    serve = session._serve_access
    frame_ns = handle_ns = 0
    clock = time.perf_counter_ns
    gc.collect()
    for header, body in messages:
        t0 = clock()
        conn.trapped_access_body(header)
        access = conn.receive_trapped_access(header, body)
        t1 = clock()
        assert access is not None
        reply = serve(access)
        t2 = clock()
        assert reply is not None
        frame_ns += t1 - t0
        handle_ns += t2 - t1
    n = len(messages)
    return frame_ns / 1000 / n, handle_ns / 1000 / n


def _fast_step(session: Session) -> Callable[[bytes, bytes], object]:
    """One message through the fast path, as ``Session._on_header`` takes it."""
    conn = session.conn
    serve = session._serve_access
    body_size, receive = conn.trapped_access_body, conn.receive_trapped_access

    def step(header: bytes, body: bytes) -> object:
        body_size(header)
        return serve(receive(header, body))  # type: ignore[arg-type]

    return step


def _general_step(session: Session) -> Callable[[bytes, bytes], object]:
    """One message through the general path (``receive_header``, ``receive_body``,
    ``Session._dispatch``), which every other message takes."""
    conn = session.conn
    handle = session._dispatch
    receive_header, receive_body = conn.receive_header, conn.receive_body

    def step(header: bytes, body: bytes) -> object:
        receive_header(header, ())
        return handle(receive_body(body))  # type: ignore[arg-type]

    return step


def _timed(step: Callable[[bytes, bytes], object], messages: list[tuple[bytes, bytes]]) -> float:
    """``step`` over every message, timed as a whole: µs per message."""
    gc.collect()
    start = time.perf_counter_ns()
    for header, body in messages:
        step(header, body)
    return (time.perf_counter_ns() - start) / 1000 / len(messages)


CASES = {
    "config read": (p.Command.REGION_READ, CONFIG_REGION, 0, None),
    "BAR0 read": (p.Command.REGION_READ, BAR0_REGION, C2C_LINK_BAR0_OFFSET, None),
    "config write": (p.Command.REGION_WRITE, CONFIG_REGION, 0x04, b"\x06\x00\x00\x00"),
}


def run(iterations: int, repeats: int) -> dict[str, dict[str, float]]:
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="vgpud-codec-") as tmp:
        session = _session(tmp)
        for name, (command, region, offset, data) in CASES.items():
            messages = _messages(command, region, offset, data, iterations)
            fast, general = _fast_step(session), _general_step(session)
            _timed(fast, messages[: min(2000, iterations)])  # warm-up
            totals = sorted(_timed(fast, messages) for _ in range(repeats))
            frame, handle = _feed(session, messages)
            generals = sorted(_timed(general, messages) for _ in range(repeats))
            results[name] = {
                "total_us": totals[len(totals) // 2],
                "frame_us": frame,
                "handle_us": handle,
                "general_us": generals[len(generals) // 2],
            }
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--iterations", type=int, default=50000)
    parser.add_argument("--repeats", type=int, default=5, help="report the median total")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    results = run(args.iterations, args.repeats)
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    print(f"{'message':<14} {'total us':>9} {'frame us':>9} {'handle us':>10} {'general us':>11}")
    for name, r in results.items():
        print(
            f"{name:<14} {r['total_us']:9.2f} {r['frame_us']:9.2f} {r['handle_us']:10.2f} "
            f"{r['general_us']:11.2f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
