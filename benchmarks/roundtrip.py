"""Trapped-access round trip: what one guest config/BAR0 access costs through a server.

Measures, in one run and against the same minimal client:
- ``floor``: a raw AF_UNIX ping-pong with the same message sizes (a Python echo process),
  the least any Python server could cost;
- ``bound``: the least a Python vfio-user server could cost: a blocking loop that reads the
  header and body, calls the same device's ``region_read`` and sends the reply, with no
  validation, no state and no event loop (only REGION_READ after VERSION);
- ``vgpud``: ``vgpud serve`` (pure-Python engine), config read and BAR0 register read, and
  the config read again with ``--no-fast-config-reads`` (all Python: no C loop, see
  vgpud/server/fast_reads.py);
- ``vgpud+libvfio-user``: the same device through ``--engine libvfio-user`` when
  $VGPUD_LIBVFIO_USER names a libvfio-user.so.0, and its bound: libvfio-user's blocking
  ``vfu_run_ctx`` loop with a config-space callback that only calls the same device's
  ``region_read`` (no trio, no watchdog, no error handling);
- ``libvfio-user``: libvfio-user's C sample server, when ``--libvfio-user-server PATH``
  (or $VGPUD_LIBVFIO_USER_SERVER) names a built ``samples/server`` binary (config read only:
  its BAR0 is different).

Client and server are pinned to one CPU (``--cpu``), as a vCPU thread and the server would
compete on a busy host; latency is wall-clock per request/reply pair (perf_counter_ns). That
measures what the server's own work costs: the server is rarely idle when a request comes.
``--server-cpu N`` (another CPU) with ``--gap-us 200`` measures the other case, the one a
guest's sparse trapped accesses make: each request comes after a pause and finds the server
asleep, so each round trip pays two cross-CPU wake-ups as well. (Without the gap a client on
another CPU sends its next request the moment a reply arrives, and a slower server finds it
already waiting: that flatters the slower server.)

    python -m benchmarks.roundtrip [--iterations 20000] [--cpu 0] [--server-cpu N]
                                   [--gap-us N] [--runs N] [--json]

With the C server measured, the last column ("x C") is each row's p50 over the C server's
p50 in the same run (the median of those, with ``--runs``): issue #4's target is 1.5.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import protocol as p
from vgpud.config import single_device
from vgpud.devices import build_device
from vgpud.libvfio_user import ffi as vfu

HEADER = struct.Struct("<HHIII")
REGION_READ = 9
CONFIG_REGION = 7
BAR0_REGION = 0
C2C_LINK_BAR0_OFFSET = 0x1498  # spec nvgrace-gpu.md §7.1


class RawClient:
    """A blocking client that negotiates with the protocol codec, then sends prebuilt bytes."""

    def __init__(self, path: str, server: Server | None = None) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        deadline = time.monotonic() + 10
        while True:
            try:
                self.sock.connect(path)
                break
            except (FileNotFoundError, ConnectionRefusedError):
                # Only servers that create their own socket (libvfio-user's sample) get here;
                # ours are handed an already-listening socket. One that has exited will never
                # listen: say why now rather than after the deadline.
                if server is not None and server.process.poll() is not None:
                    self.sock.close()
                    raise ServerExitedError(server) from None
                if time.monotonic() > deadline:
                    self.sock.close()
                    raise
                time.sleep(0.01)
        caps = p.Capabilities(max_msg_fds=16)
        conn = p.ClientConnection(caps)
        _, out = conn.send_request(p.Version(major=0, minor=0, capabilities=caps))
        self.sock.sendall(out.data)
        head = self.recv_exact(16)
        size = HEADER.unpack(head)[2]
        self.recv_exact(size - 16)
        self.msg_id = 1

    def recv_exact(self, n: int) -> bytes:
        chunks = bytearray()
        while len(chunks) < n:
            got = self.sock.recv(n - len(chunks))
            if not got:
                raise EOFError("server closed the connection")
            chunks += got
        return bytes(chunks)

    def region_read_timer(self, region: int, offset: int, count: int) -> Callable[[], int]:
        body = struct.pack("<QII", offset, region, count)
        reply_size = 16 + 16 + count
        sock = self.sock

        def one() -> int:
            self.msg_id = (self.msg_id + 1) & 0xFFFF
            msg = HEADER.pack(self.msg_id, REGION_READ, 16 + len(body), 0, 0) + body
            start = time.perf_counter_ns()
            sock.sendall(msg)
            got = 0
            while got < reply_size:
                chunk = sock.recv(reply_size - got)
                if not chunk:
                    raise EOFError
                got += len(chunk)
            return time.perf_counter_ns() - start

        return one

    def close(self) -> None:
        self.sock.close()


def _echo_server(fd: int, reply_size: int) -> None:
    """The floor: read one request, send a reply of the same size a server would."""
    listener = socket.socket(fileno=fd)
    conn, _ = listener.accept()
    reply = bytes(reply_size)
    # First exchange mimics VERSION so RawClient works unchanged.
    head = conn.recv(16)
    size = HEADER.unpack(head)[2]
    remaining = size - 16
    while remaining:
        remaining -= len(conn.recv(remaining))
    conn.sendall(HEADER.pack(0, 1, 16 + 5, 1, 0) + b"\0\0\0\0\0")
    while True:
        head = conn.recv(32)
        if not head:
            return
        conn.sendall(reply)


def _bound_server(fd: int, backing_dir: str) -> None:
    """The bound: what a Python server costs with nothing but the unavoidable work."""
    config = single_device(socket_path=None, memory_size="8GiB", backing_dir=Path(backing_dir))
    read = build_device(config).device.region_read
    listener = socket.socket(fileno=fd)
    conn, _ = listener.accept()
    head = conn.recv(16)
    size = HEADER.unpack(head)[2]
    conn.recv(size - 16)
    conn.sendall(HEADER.pack(0, 1, 16 + 5, 1, 0) + b"\0\0\0\0\0")
    access, reply = struct.Struct("<QII"), struct.Struct("<HHIIIQII")
    ancillary = socket.CMSG_SPACE(16 * 4)
    recvmsg, recv, send = conn.recvmsg, conn.recv, conn.send
    while True:
        head = recvmsg(16, ancillary, socket.MSG_CMSG_CLOEXEC)[0]
        if not head:
            return
        msg_id, command, size, _, _ = HEADER.unpack(head)
        offset, region, count = access.unpack(recv(size - 16))
        data = read(region, offset, count)
        send(reply.pack(msg_id, command, 32 + count, 1, 0, offset, region, count) + data)


def _libvfio_user_bound_server(socket_path: str, backing_dir: str) -> None:
    """The libvfio-user engine's bound: what a cffi callback into the device costs on top of
    libvfio-user's own loop. One client, config region only."""
    library = vfu.load_library(None)
    ffi, lib = library.ffi, library.lib
    config = single_device(socket_path=None, memory_size="8GiB", backing_dir=Path(backing_dir))
    device = build_device(config).device
    read = device.region_read
    size = device.region_info(CONFIG_REGION).size
    ctx = lib.vfu_create_ctx(
        lib.VFU_TRANS_SOCK, socket_path.encode(), 0, ffi.NULL, lib.VFU_DEV_TYPE_PCI
    )
    lib.vfu_pci_init(ctx, lib.VFU_PCI_TYPE_EXPRESS, vfu.PCI_HEADER_TYPE_NORMAL, 0)

    def access(_ctx: object, buf: object, count: int, offset: int, is_write: bool) -> int:
        if not is_write:
            ffi.memmove(buf, read(CONFIG_REGION, offset, count), count)
        return count

    callback = ffi.callback("vfu_region_access_cb_t", access, error=-1)
    flags = vfu.VFU_REGION_FLAG_READ | vfu.VFU_REGION_FLAG_WRITE | vfu.VFU_REGION_FLAG_ALWAYS_CB
    if lib.vfu_setup_region(ctx, CONFIG_REGION, size, callback, flags, ffi.NULL, 0, -1, 0):
        raise OSError(ffi.errno, "vfu_setup_region failed")
    if lib.vfu_realize_ctx(ctx) or lib.vfu_attach_ctx(ctx):
        raise OSError(ffi.errno, "libvfio-user set-up failed")
    while lib.vfu_run_ctx(ctx) >= 0:
        pass
    lib.vfu_destroy_ctx(ctx)


def measure(timer: Callable[[], int], iterations: int, warmup: int = 1000) -> dict[str, float]:
    for _ in range(warmup):
        timer()
    return summarize([timer() for _ in range(iterations)])


def summarize(samples_ns: list[int]) -> dict[str, float]:
    """p50/p99/max/mean (µs) and round trips per second of back-to-back samples (ns)."""
    samples = sorted(samples_ns)
    return {
        "p50_us": samples[len(samples) // 2] / 1000,
        "p99_us": samples[int(len(samples) * 0.99)] / 1000,
        "max_us": samples[-1] / 1000,
        "mean_us": statistics.fmean(samples) / 1000,
        "msgs_per_s": len(samples) / (sum(samples) / 1e9),
    }


# The row #4's target is measured against: p50 within 1.5x of libvfio-user's C server.
PEER = "libvfio-user config read"
STATS = ("p50_us", "p99_us", "mean_us", "msgs_per_s")


def combine(runs: list[dict[str, dict[str, float]]]) -> dict[str, dict[str, float]]:
    """Each row's median over ``runs`` (a row missing from a run is left out of that run's
    share), and ``x_peer``: the median over the runs of the row's p50 over the C server's p50
    in the same run (servers measured in one run share the host's mood, so the ratio is
    steadier than a ratio of medians)."""
    combined: dict[str, dict[str, float]] = {}
    names = list(dict.fromkeys(name for run in runs for name in run))
    for name in names:
        rows = [run[name] for run in runs if name in run]
        row = {stat: statistics.median(r[stat] for r in rows) for stat in STATS}
        ratios = [
            run[name]["p50_us"] / run[PEER]["p50_us"] for run in runs if name in run and PEER in run
        ]
        if ratios:
            row["x_peer"] = statistics.median(ratios)
        combined[name] = row
    return combined


def _listener(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    sock.listen(1)
    return sock


class Server:
    """A server process of the benchmark, its stderr kept in a file to explain an early exit."""

    def __init__(self, cmd: list[str], process: subprocess.Popen[bytes], stderr: Path) -> None:
        self.cmd = cmd
        self.process = process
        self.stderr = stderr


class ServerExitedError(RuntimeError):
    """A server exited before it listened."""

    def __init__(self, server: Server) -> None:
        said = server.stderr.read_text(errors="replace")
        super().__init__(exit_before_listening(server.cmd[0], server.process.returncode, said))


def exit_before_listening(program: str, status: int | None, said: str) -> str:
    """What to tell the user of a server that exited before it listened: its last lines,
    and the fix when it is the known reason (:data:`SAMPLE_BAR1_HINT`)."""
    lines = said.strip().splitlines()[-5:]
    message = f"{program} exited with status {status} before it listened"
    if lines:
        message += ":\n  " + "\n  ".join(lines)
    if any("must be a power of 2" in line for line in lines):
        message += "\n" + SAMPLE_BAR1_HINT
    return message


# What to do about the one known reason libvfio-user's sample server does not start.
SAMPLE_BAR1_HINT = (
    "libvfio-user from 850ded8 (June 2026) on refuses BAR sizes that are not a power of two, "
    "and its own samples/server asks for a 0x3000-byte BAR1: set bar1_size to 0x4000 in "
    "samples/server.c and rebuild it (docs/libvfio-user-engine.md)"
)


@contextmanager
def _server(cmd: list[str], cpu: int, listener: socket.socket | None = None) -> Iterator[Server]:
    pass_fds = (listener.fileno(),) if listener is not None else ()
    with tempfile.NamedTemporaryFile(prefix="vgpud-bench-stderr-") as stderr:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=stderr, pass_fds=pass_fds)
        if listener is not None:
            listener.close()
        try:
            try:
                os.sched_setaffinity(proc.pid, {cpu})
            except ProcessLookupError:
                pass  # exited already: the client says why
            yield Server(cmd, proc, Path(stderr.name))
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def with_gap(timer: Callable[[], int], gap_us: int) -> Callable[[], int]:
    """``timer`` preceded by ``gap_us`` of busy waiting (untimed), so that each request comes
    after a pause, as a guest's do. Busy, not sleeping: the client's own wake-up stays out."""
    if not gap_us:
        return timer
    gap_ns, clock = gap_us * 1000, time.perf_counter_ns

    def one() -> int:
        end = clock() + gap_ns
        while clock() < end:
            pass
        return timer()

    return one


def run(
    iterations: int,
    cpu: int,
    libvfio_user_server: str | None,
    *,
    server_cpu: int | None = None,
    gap_us: int = 0,
) -> dict[str, dict[str, float]]:
    """``cpu`` for the client (this process); ``server_cpu`` for the servers (default: the
    same CPU); ``gap_us`` of pause before each request."""
    os.sched_setaffinity(0, {cpu})
    on = cpu if server_cpu is None else server_cpu

    def sample(client: RawClient, region: int, offset: int) -> dict[str, float]:
        return measure(with_gap(client.region_read_timer(region, offset, 4), gap_us), iterations)

    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="vgpud-bench-") as tmp:
        floor_sock = f"{tmp}/floor.sock"
        listener = _listener(floor_sock)
        code = (
            "import sys; from benchmarks.roundtrip import _echo_server; "
            "_echo_server(int(sys.argv[1]), 36)"
        )
        with _server([sys.executable, "-c", code, str(listener.fileno())], on, listener):
            client = RawClient(floor_sock)
            results["floor (python echo)"] = sample(client, CONFIG_REGION, 0)
            client.close()

        bound_sock = f"{tmp}/bound.sock"
        listener = _listener(bound_sock)
        code = (
            "import sys; from benchmarks.roundtrip import _bound_server; "
            "_bound_server(int(sys.argv[1]), sys.argv[2])"
        )
        cmd = [sys.executable, "-c", code, str(listener.fileno()), f"{tmp}/bound-mem"]
        with _server(cmd, on, listener):
            client = RawClient(bound_sock)
            results["bound (python, no checks)"] = sample(client, CONFIG_REGION, 0)
            client.close()

        vgpud_sock = f"{tmp}/vgpud.sock"
        listener = _listener(vgpud_sock)
        cmd = [
            sys.executable,
            "-m",
            "vgpud",
            "serve",
            "--fd",
            str(listener.fileno()),
            "--memory-size",
            "8GiB",
            "--backing-dir",
            f"{tmp}/mem",
            "--log-level",
            "warning",
        ]
        with _server(cmd, on, listener):
            client = RawClient(vgpud_sock)
            results["vgpud config read"] = sample(client, CONFIG_REGION, 0)
            results["vgpud BAR0 read"] = sample(client, BAR0_REGION, C2C_LINK_BAR0_OFFSET)
            client.close()

        # The same config read with the C loop switched off: what the Python path costs.
        python_sock = f"{tmp}/vgpud-python.sock"
        listener = _listener(python_sock)
        cmd[cmd.index("--fd") + 1] = str(listener.fileno())
        cmd[cmd.index("--backing-dir") + 1] = f"{tmp}/mem-python"
        with _server([*cmd, "--no-fast-config-reads"], on, listener):
            client = RawClient(python_sock)
            results["vgpud config read, Python path"] = sample(client, CONFIG_REGION, 0)
            client.close()

        if os.environ.get("VGPUD_LIBVFIO_USER"):
            # The same device through the optional libvfio-user engine (cffi callbacks).
            engine_sock = f"{tmp}/engine.sock"
            cmd = [
                sys.executable, "-m", "vgpud", "serve", "--engine", "libvfio-user",
                "--socket-path", engine_sock, "--memory-size", "8GiB",
                "--backing-dir", f"{tmp}/mem2", "--log-level", "warning",
            ]  # fmt: skip
            with _server(cmd, on) as server:
                client = RawClient(engine_sock, server)
                results["vgpud+libvfio-user config read"] = sample(client, CONFIG_REGION, 0)
                client.close()
            lvu_bound_sock = f"{tmp}/lvu-bound.sock"
            code = (
                "import sys; from benchmarks.roundtrip import _libvfio_user_bound_server; "
                "_libvfio_user_bound_server(sys.argv[1], sys.argv[2])"
            )
            bound_cmd = [sys.executable, "-c", code, lvu_bound_sock, f"{tmp}/mem3"]
            with _server(bound_cmd, on) as server:
                client = RawClient(lvu_bound_sock, server)
                results["bound (libvfio-user + cb)"] = sample(client, CONFIG_REGION, 0)
                client.close()

        if libvfio_user_server:
            lvu_sock = f"{tmp}/lvu.sock"
            with _server([libvfio_user_server, lvu_sock], on) as server:
                client = RawClient(lvu_sock, server)
                results[PEER] = sample(client, CONFIG_REGION, 0)
                client.close()
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--iterations", type=int, default=20000)
    parser.add_argument("--cpu", type=int, default=0, help="the client's CPU")
    parser.add_argument("--server-cpu", type=int, help="the servers' CPU (default: --cpu)")
    parser.add_argument("--gap-us", type=int, default=0, help="pause before each request")
    parser.add_argument(
        "--libvfio-user-server", default=os.environ.get("VGPUD_LIBVFIO_USER_SERVER")
    )
    parser.add_argument(
        "--runs", type=int, default=1, help="repeat the whole run; print each row's median"
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    if args.libvfio_user_server and not Path(args.libvfio_user_server).exists():
        parser.error(f"{args.libvfio_user_server} does not exist")
    runs = []
    try:
        for _ in range(args.runs):
            runs.append(
                run(
                    args.iterations,
                    args.cpu,
                    args.libvfio_user_server,
                    server_cpu=args.server_cpu,
                    gap_us=args.gap_us,
                )
            )
    except ServerExitedError as exc:
        print(f"benchmarks.roundtrip: {exc}", file=sys.stderr)
        return 2
    results = combine(runs)
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    if args.runs > 1:
        print(f"median of {args.runs} runs")
    print(f"{'server':<32} {'p50 us':>8} {'p99 us':>8} {'mean us':>8} {'msgs/s':>9} {'x C':>6}")
    for name, r in results.items():
        ratio = f"{r['x_peer']:6.2f}" if "x_peer" in r else f"{'':6}"
        print(
            f"{name:<32} {r['p50_us']:8.1f} {r['p99_us']:8.1f} {r['mean_us']:8.1f} "
            f"{r['msgs_per_s']:9.0f} {ratio}"
        )
    if PEER not in results:
        print("(libvfio-user: not measured; pass --libvfio-user-server PATH to its samples/server)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
