"""A device's trapped-access latency while its neighbour in the same daemon is busy.

One ``vgpud serve`` with a two-device tray; gpu1's client measures 4-byte config reads (as
:mod:`benchmarks.roundtrip` does) while gpu0's client is, in turn:

- ``idle``: connected, sending nothing;
- ``flood``: sending posted config writes (NO_REPLY) back to back from a thread of its own,
  as fast as the socket takes them;
- ``stalled``: stopped in the middle of a message (a REGION_WRITE header, no body). The
  libvfio-user engine blocks on that device until its watchdog cuts the client off (5 s),
  so the measurement is kept well under that.

For each engine: the Python one, and ``--engine libvfio-user`` when $VGPUD_LIBVFIO_USER
names a build. What it shows is isolation, not speed: under the libvfio-user engine, where
each device has a thread of its own (vgpud/libvfio_user/thread.py), a stalled neighbour
should cost nothing and a flooding one only the CPU and GIL it takes. The daemon and both
clients are pinned to one CPU (``--cpu``), as in :mod:`benchmarks.roundtrip`: unpinned, this
2-core VM's cross-CPU wake-ups made the idle figure anything from 10 to 90 µs.

    python -m benchmarks.neighbour [--iterations 2000] [--cpu 0] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from benchmarks.roundtrip import CONFIG_REGION, HEADER, RawClient, summarize

SCENARIOS = ("idle", "flood", "stalled")
REGION_WRITE = 10
NO_REPLY = 0x10
# A posted write of the interrupt line register: harmless, and the device model runs it.
_POSTED = (
    HEADER.pack(0, REGION_WRITE, 16 + 16 + 4, NO_REPLY, 0)
    + struct.pack("<QII", 0x3C, CONFIG_REGION, 4)
    + b"\x0b\x00\x00\x00"
)


def engines() -> list[str]:
    return ["python", "libvfio-user"] if os.environ.get("VGPUD_LIBVFIO_USER") else ["python"]


@contextmanager
def _tray(engine: str, tmp: Path) -> Iterator[tuple[Path, Path]]:
    """A daemon serving gpu0 and gpu1; their socket paths. It inherits the caller's CPU
    affinity (run() pins it), and so do all its threads."""
    config = tmp / f"{engine}.toml"
    config.write_text(
        f'[daemon]\nengine = "{engine}"\nlog_level = "warning"\n'
        + "".join(
            f'[[device]]\nname = "gpu{i}"\nsocket_path = "{tmp}/{engine}-gpu{i}.sock"\n'
            f'memory_size = "4GiB"\nbacking_dir = "{tmp}/{engine}-mem{i}"\n'
            for i in range(2)
        )
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "vgpud", "serve", "--config", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        yield tmp / f"{engine}-gpu0.sock", tmp / f"{engine}-gpu1.sock"
    finally:
        proc.terminate()
        try:
            proc.wait(30)  # a stalled client is cut off at stop
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextmanager
def _neighbour(path: Path, scenario: str) -> Iterator[None]:
    """gpu0's client, doing ``scenario`` for as long as the block runs."""
    client = RawClient(str(path))  # connects (retrying until the daemon listens), negotiates
    stop = threading.Event()
    flooder: threading.Thread | None = None
    if scenario == "flood":
        chunk = _POSTED * 256

        def flood() -> None:
            try:
                while not stop.is_set():
                    client.sock.sendall(chunk)
            except OSError:
                pass  # the daemon stopped

        flooder = threading.Thread(target=flood, daemon=True)
        flooder.start()
    elif scenario == "stalled":
        client.sock.sendall(HEADER.pack(1, REGION_WRITE, 16 + 16 + 64, 0, 0))
    try:
        yield
    finally:
        stop.set()
        client.sock.shutdown(socket.SHUT_RDWR)
        if flooder is not None:
            flooder.join()
        client.close()


def run(
    iterations: int, cpu: int, engine_names: list[str] | None = None
) -> dict[str, dict[str, float]]:
    """``{"<engine> <scenario>": measure(...)}`` for gpu1's config reads. Pins the calling
    process (and so gpu0's flooding thread) to ``cpu`` too."""
    os.sched_setaffinity(0, {cpu})
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="vgpud-neighbour-") as tmp:
        for engine in engine_names or engines():
            for scenario in SCENARIOS:
                # A fresh daemon per scenario: a stall leaves gpu0 busy until its cut.
                with _tray(engine, Path(tmp)) as (gpu0, gpu1):
                    probe = RawClient(str(gpu1))
                    timer = probe.region_read_timer(CONFIG_REGION, 0, 4)
                    for _ in range(min(200, iterations)):  # warm up before gpu0 starts:
                        timer()  # a hold-up at gpu0's first move must be in the samples
                    with _neighbour(gpu0, scenario):
                        samples = [timer() for _ in range(iterations)]
                    probe.close()
                results[f"{engine} {scenario}"] = summarize(samples)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--iterations", type=int, default=2000)
    parser.add_argument("--cpu", type=int, default=0, help="the CPU for daemon and clients")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    started = time.monotonic()
    results = run(args.iterations, args.cpu)
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    print(f"{'gpu1 config read, gpu0 is':<30} {'p50 us':>8} {'p99 us':>8} {'max us':>10}")
    for name, row in results.items():
        print(f"{name:<30} {row['p50_us']:8.1f} {row['p99_us']:8.1f} {row['max_us']:10.0f}")
    print(f"({time.monotonic() - started:.1f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
