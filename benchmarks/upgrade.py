"""Live upgrade: how long a VM's trapped accesses wait while the daemon upgrades (SIGUSR2).

One ``vgpud serve`` with one device, one client that reads the config space's first 4 bytes
(vendor and device ID) every ``--gap-ms``, as a guest's occasional trapped accesses would, and
``--upgrades`` upgrades one after another, each sent once the previous one's next image has
said READY=1. Per upgrade:

- ``check_ms``: SIGUSR2 to the daemon's "new code checked" line. The new code runs once to
  check it (vgpud.upgrade, step 2) while the device is served on;
- ``check_p99_us``: the client's p99 while that check ran (what the check costs the VM);
- ``stall_ms``: the longest one read waited for its reply: a read that finds the devices
  frozen for the fork, or for the stand-in's handover to the next image (vgpud/stand_in.py);
- ``stand_in_ms``: from the daemon's "upgraded" line, how long the stand-in served, the exec
  and the next image's start-up included;
- ``handover_ms``: likewise, the freeze for the last handover to the next image serving.

Every reply must carry the bytes of the first, the daemon's pid must stay the same and every
upgrade must end "upgraded"; anything else stops the run with an error.

    python -m benchmarks.upgrade [--upgrades 5] [--gap-ms 1] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import IO, Any

import protocol as p
from benchmarks.roundtrip import CONFIG_REGION, HEADER, REGION_READ, RawClient, summarize

VGPUD = [sys.executable, "-m", "vgpud"]
LOG_JSON = ("--log-format", "json")
EVENT_TIMEOUT = 60.0  # seconds; a hang guard only


@dataclass
class Reads:
    """What the client saw: per read, when it was sent and how long its reply took (ns)."""

    sent_ns: list[int] = field(default_factory=list)
    took_ns: list[int] = field(default_factory=list)
    error: BaseException | None = None
    changed: threading.Condition = field(default_factory=threading.Condition)

    def add(self, sent_ns: int, took_ns: int) -> None:
        with self.changed:
            self.sent_ns.append(sent_ns)
            self.took_ns.append(took_ns)
            self.changed.notify_all()

    def fail(self, error: BaseException) -> None:
        with self.changed:
            self.error = error
            self.changed.notify_all()

    def wait_beyond(self, count: int) -> None:
        """Until more than ``count`` reads are answered (or the client failed)."""
        with self.changed:
            if not self.changed.wait_for(
                lambda: len(self.took_ns) > count or self.error is not None, EVENT_TIMEOUT
            ):
                raise TimeoutError(f"no read answered in {EVENT_TIMEOUT:.0f} s")
        if self.error is not None:
            raise RuntimeError(f"the client failed: {self.error!r}") from self.error

    def between(self, start_ns: int, end_ns: int) -> list[int]:
        return [
            took
            for sent, took in zip(self.sent_ns, self.took_ns, strict=False)
            if start_ns <= sent < end_ns
        ]


def _read_config(client: RawClient, stop: threading.Event, gap_s: float, reads: Reads) -> None:
    """The client: one 4-byte config read at a time until ``stop``; every reply checked."""
    body = struct.pack("<QII", 0, CONFIG_REGION, 4)
    sock = client.sock
    first: bytes | None = None
    msg_id = 1
    try:
        while not stop.is_set():
            msg_id = (msg_id + 1) & 0xFFFF
            start = time.perf_counter_ns()
            sock.sendall(HEADER.pack(msg_id, REGION_READ, 16 + len(body), 0, 0) + body)
            reply = client.recv_exact(16 + 16 + 4)
            took = time.perf_counter_ns() - start
            reply_id, _, _, flags, error = HEADER.unpack_from(reply)
            if reply_id != msg_id or flags & p.FLAG_ERROR:
                raise RuntimeError(f"read {msg_id}: reply {reply_id}, flags {flags:#x}, {error}")
            if first is None:
                first = reply[32:]
            elif reply[32:] != first:
                raise RuntimeError(f"read {msg_id} gave {reply[32:].hex()}, not {first.hex()}")
            reads.add(start, took)
            # Pacing, not synchronisation: a guest's trapped accesses come now and then.
            time.sleep(gap_s)
    except BaseException as exc:  # reported by the main thread
        reads.fail(exc)


def _log_events(stream: IO[str], events: queue.Queue[tuple[int, dict[str, Any]]]) -> None:
    """The daemon's JSON log, event by event, each with the time this process saw it."""
    for line in stream:
        try:
            event = json.loads(line)
        except ValueError:
            continue  # not a log line (a traceback's): the stderr copy shows it
        if isinstance(event, dict):
            events.put((time.perf_counter_ns(), event))


def _next_event(
    events: queue.Queue[tuple[int, dict[str, Any]]], wanted: set[str]
) -> tuple[int, dict[str, Any]]:
    deadline = time.monotonic() + EVENT_TIMEOUT
    while True:
        seen, event = events.get(timeout=max(0.0, deadline - time.monotonic()))
        name = event.get("event", "")
        if name in wanted:
            return seen, event
        if name in ("upgrade refused", "upgrade failed; serving on"):
            raise RuntimeError(f"{name}: {event.get('reason', event)}")


def _wait_ready(notify: socket.socket) -> None:
    while b"READY=1" not in notify.recv(4096).split(b"\n"):
        pass  # RELOADING=1 and the like


def run(upgrades: int, gap_ms: float) -> list[dict[str, float]]:
    """One daemon, ``upgrades`` upgrades under a client reading every ``gap_ms``."""
    with tempfile.TemporaryDirectory(prefix="vgpud-upgrade-") as tmp:
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify.bind(f"{tmp}/notify")
        notify.settimeout(EVENT_TIMEOUT)
        path = f"{tmp}/gpu0.sock"
        proc = subprocess.Popen(
            [*VGPUD, "serve", "--socket-path", path, "--backing-dir", f"{tmp}/mem", *LOG_JSON],
            env=dict(os.environ, NOTIFY_SOCKET=f"{tmp}/notify"),
            stderr=subprocess.PIPE,
            text=True,
        )
        assert proc.stderr is not None
        events: queue.Queue[tuple[int, dict[str, Any]]] = queue.Queue()
        log_reader = threading.Thread(target=_log_events, args=(proc.stderr, events))
        log_reader.start()
        stop, reads = threading.Event(), Reads()
        reader: threading.Thread | None = None
        client: RawClient | None = None
        try:
            _wait_ready(notify)
            client = RawClient(path)
            reader = threading.Thread(target=_read_config, args=(client, stop, gap_ms / 1e3, reads))
            reader.start()
            rows = [_one_upgrade(proc, notify, events, reads) for _ in range(upgrades)]
        finally:
            stop.set()
            if reader is not None:
                reader.join(EVENT_TIMEOUT)
            if client is not None:
                client.close()
            proc.send_signal(signal.SIGTERM)
            proc.wait(EVENT_TIMEOUT)
            log_reader.join(EVENT_TIMEOUT)  # the daemon's end closed the pipe
            proc.stderr.close()
            notify.close()
        if reads.error is not None:
            raise RuntimeError(f"the client failed: {reads.error!r}") from reads.error
        return rows


def _one_upgrade(
    proc: subprocess.Popen[str],
    notify: socket.socket,
    events: queue.Queue[tuple[int, dict[str, Any]]],
    reads: Reads,
) -> dict[str, float]:
    reads.wait_beyond(0)  # the client has been served before the signal
    sent = time.perf_counter_ns()
    proc.send_signal(signal.SIGUSR2)
    checked, _ = _next_event(events, {"new code checked; bringing the clients to rest"})
    _, upgraded = _next_event(events, {"upgraded"})
    _wait_ready(notify)
    done = time.perf_counter_ns()
    if upgraded.get("pid") != proc.pid:
        raise RuntimeError(f"the daemon's pid changed: {upgraded.get('pid')} != {proc.pid}")
    # The read that waited through the exec is answered by now, or is the next to be.
    reads.wait_beyond(len(reads.took_ns))
    during = reads.between(sent, time.perf_counter_ns())
    during_check = reads.between(sent, checked)
    return {
        "check_ms": (checked - sent) / 1e6,
        "check_p99_us": summarize(during_check)["p99_us"] if during_check else 0.0,
        "stall_ms": max(during, default=0) / 1e6,
        "stand_in_ms": float(upgraded.get("stand_in_ms", 0.0)),
        "handover_ms": float(upgraded["handover_ms"]),
        "reads": float(len(during)),
        "upgrade_ms": (done - sent) / 1e6,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--upgrades", type=int, default=5)
    parser.add_argument("--gap-ms", type=float, default=1.0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    rows = run(args.upgrades, args.gap_ms)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    columns = ("check_ms", "check_p99_us", "stall_ms", "stand_in_ms", "handover_ms", "upgrade_ms")
    print(f"{'upgrade':>7} " + " ".join(f"{name:>13}" for name in columns))
    for number, row in enumerate(rows, 1):
        print(f"{number:>7} " + " ".join(f"{row[name]:>13.1f}" for name in columns))
    print(
        f"{'median':>7} "
        + " ".join(f"{statistics.median(r[name] for r in rows):>13.1f}" for name in columns)
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
