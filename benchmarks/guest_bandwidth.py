"""What guest accesses to the GPU cost, seen from inside a guest: copy bandwidth through BAR4
and BAR2 next to guest RAM, and the latency of single trapped reads (config space, BAR0).

Boots the e2e tier's q35 TCG guest against a vgpud gh200 twice: as vgpud serves it by default
(QEMU mmaps usemem/resmem from the daemon's memory files, so guest accesses to them never reach
the daemon) and with ``--no-mmap`` (every access is a vfio-user REGION_READ/WRITE through the
daemon). In each guest ``benchmarks.guest_access`` copies a buffer into and out of guest RAM,
BAR4 and BAR2 (MiB/s), and times single 4-byte loads from each, from the config space and from
the BAR0 register file (what a guest driver's register read costs, end to end).

Under TCG every figure is an emulator's, not hardware's; KVM is not usable on the build
machine. What they show is each path against guest RAM in the same guest, and what share of a
trapped read is the daemon's.

Every figure is checked: copies read back the bytes written and the host finds them at the
start of its usemem file; loads return the device's ids and PMC_BOOT_0 value.

Peers, where a libvfio-user build is at hand (it is in no registry; see
docs/libvfio-user-engine.md): ``--libvfio-user LIB`` adds a boot of the same device served by
``--engine libvfio-user``; ``--libvfio-user-server BIN`` a boot against libvfio-user's C sample
server (``samples/server``), compared on config reads (its BAR0 is an I/O BAR that takes only
8-byte accesses, which x86 port I/O cannot make).

Needs the e2e assets (``make assets``).

    python -m benchmarks.guest_bandwidth [--size-kib 16384] [--trapped-size-kib 64]
        [--loads 2000] [--rounds 3] [--libvfio-user LIB] [--libvfio-user-server BIN] [--json]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from backends.synthetic.profiles import NVIDIA_VENDOR_ID
from benchmarks.guest_access import pattern
from benchmarks.roundtrip import exit_before_listening
from tests.e2e.assets import Assets, AssetsMissingError
from tests.e2e.expect import read_backing_bytes
from tests.e2e.harness import Harness, ScenarioRun, run_scenario
from tests.e2e.initramfs import GuestResults, GuestScript
from tests.e2e.qemu import qemu_device_args
from vgpud.config import single_device
from vgpud.devices import profile_for

TARGETS = ("ram", "bar4", "bar2")  # copied to and from; bar0 is only read
MEMORY_SIZE = "2GiB"  # usemem 1 GiB after the resmem carve-out: room for any copy size here
GUEST_TIMEOUT = 600.0  # seconds: boot, Python start-up under TCG, and the trapped copies
PEER_IDS = 0xBEEF_DEAD  # device << 16 | vendor
PEER_VENDOR = 0xDEAD  # libvfio-user's samples/server
SERVER_SOCKET_TIMEOUT = 10.0  # seconds for the sample server to create its socket


@dataclass(frozen=True)
class Settings:
    size_kib: int = 16384  # copy size with the BARs mmapped
    trapped_size_kib: int = 64  # copy size with --no-mmap (each access a message)
    loads: int = 2000  # timed single loads per target
    rounds: int = 3  # timed copies per direction and target
    libvfio_user: str | None = None  # libvfio-user.so.0: add the --engine libvfio-user boot
    libvfio_user_server: str | None = None  # samples/server: add the C server boot
    echo: bool = False  # stream vgpud/QEMU/guest output


@dataclass(frozen=True)
class GuestRun:
    """One boot: the guest's report, and what the host's usemem file held afterwards."""

    mode: str
    results: GuestResults
    usemem_head: bytes
    expected: dict[str, int]  # what the config dword and BAR0 register loads must return


def gh200_values() -> dict[str, int]:
    profile = profile_for(single_device(socket_path=None, memory_size=MEMORY_SIZE))
    return {"config": profile.device_id << 16 | NVIDIA_VENDOR_ID, "bar0": profile.boot0}


def guest_script(args: Sequence[str], vendor: int = NVIDIA_VENDOR_ID) -> GuestScript:
    return (
        GuestScript()
        .find_device(vendor)
        .host_chroot()
        .host_python("benchmarks.guest_access", "$BDF", *args)
    )


def _finish(scenario_run: ScenarioRun) -> GuestRun:
    if scenario_run.error is not None:
        for name, text in scenario_run.sections:
            print(f"----- {name}\n{text}", file=sys.stderr)
    result: GuestRun = scenario_run.get()
    return result


def vgpud_guest(assets: Assets, mode: str, settings: Settings, extra: Sequence[str]) -> GuestRun:
    """A guest on a vgpud gh200 started with ``extra``; copies of ``size_kib`` unless 0."""
    size_kib = {"trapped": settings.trapped_size_kib, "mmap": settings.size_kib}.get(mode, 0)

    async def body(h: Harness) -> GuestRun:
        device = h.device("gh200", MEMORY_SIZE)
        await h.start_vgpud(device, extra)
        script = guest_script(
            [
                *("--copy-kib", str(size_kib), "--loads", str(settings.loads)),
                *("--rounds", str(settings.rounds), "--bar0"),
            ]
        )
        results = await h.boot(device, script, within=GUEST_TIMEOUT, host_python=True)
        head = read_backing_bytes(device.files["usemem"], 0, size_kib << 10)
        return GuestRun(mode, results, head, gh200_values())

    return _finish(run_scenario(assets, body, echo=settings.echo))


def peer_guest(assets: Assets, settings: Settings, server: str) -> GuestRun:
    """A guest on libvfio-user's C sample server: config reads only."""

    async def body(h: Harness) -> GuestRun:
        sock = h.workdir / "peer.sock"
        log = (h.workdir / "peer.log").open("wb")
        process = await trio.lowlevel.open_process([server, str(sock)], stdout=log, stderr=log)
        try:
            # The sample server has no readiness signal (no sd_notify, no inherited socket):
            # the socket file it binds appearing is the only one there is.
            with trio.fail_after(SERVER_SOCKET_TIMEOUT):
                while not sock.exists():  # nothing to wait on but the file, or the exit
                    if process.poll() is not None:
                        # Say why now, not after the timeout.
                        log.flush()
                        said = (h.workdir / "peer.log").read_text(errors="replace")
                        raise RuntimeError(exit_before_listening(server, process.returncode, said))
                    await trio.sleep(0.01)
            # Machine and root port as `vgpud qemu-args` prints them, with this socket.
            qemu_args = qemu_device_args(sock, "gh200", MEMORY_SIZE, assets.arch)
            script = guest_script(["--loads", str(settings.loads)], PEER_VENDOR)
            results = await h.boot(
                None, script, within=GUEST_TIMEOUT, qemu_args=qemu_args, host_python=True
            )
        finally:
            process.terminate()
            await process.wait()
            log.close()
        return GuestRun("peer", results, b"", {"config": PEER_IDS})

    return _finish(run_scenario(assets, body, echo=settings.echo))


def load_figures(values: dict[str, str], target: str) -> dict[str, float]:
    return {
        "load_p50_us": int(values[f"{target}_load_p50_ns"]) / 1000,
        "load_p99_us": int(values[f"{target}_load_p99_ns"]) / 1000,
    }


def check(run: GuestRun) -> dict[str, dict[str, float]]:
    """The guest's figures per target; AssertionError if a copy did not land."""
    values = run.results.values
    if run.results.done_rc != 0:
        raise AssertionError(f"{run.mode}: the guest program failed (rc {run.results.done_rc})")
    figures: dict[str, dict[str, float]] = {}
    for target, value in run.expected.items():
        if int(values[f"{target}_value"], 16) != value:
            raise AssertionError(
                f"{run.mode}: {target} loads returned {values[f'{target}_value']}, "
                f"not {value:#x}: they did not reach the device"
            )
        figures[target] = load_figures(values, target)
    if "size_bytes" not in values:
        return figures  # loads only
    size = int(values["size_bytes"])
    expected = hashlib.sha256(pattern(size)).hexdigest()
    if values["data_sha256"] != expected:
        raise AssertionError(f"{run.mode}: guest and host disagree on the test pattern")
    for target in TARGETS:
        if values[f"{target}_sha256"] != expected:
            raise AssertionError(f"{run.mode}: {target}: the bytes read back are not those written")
        figures[target] = {
            "write_mib_s": int(values[f"{target}_write_bytes_s"]) / (1 << 20),
            "read_mib_s": int(values[f"{target}_read_bytes_s"]) / (1 << 20),
            **load_figures(values, target),
        }
    if run.usemem_head[:size] != pattern(size):
        raise AssertionError(f"{run.mode}: the host's usemem file does not hold the BAR4 writes")
    return figures


def measure(assets: Assets, settings: Settings) -> dict[str, Any]:
    mapped = check(vgpud_guest(assets, "mmap", settings, []))
    trapped = check(vgpud_guest(assets, "trapped", settings, ["--no-mmap"]))
    size_kib, trapped_size_kib = settings.size_kib, settings.trapped_size_kib
    rows: list[tuple[str, int | None, dict[str, float]]] = [
        ("guest RAM", size_kib, mapped["ram"]),
        ("BAR4 usemem, mmapped (default)", size_kib, mapped["bar4"]),
        ("BAR2 resmem, mmapped (default)", size_kib, mapped["bar2"]),
        ("BAR4 usemem, trapped (--no-mmap)", trapped_size_kib, trapped["bar4"]),
        ("BAR2 resmem, trapped (--no-mmap)", trapped_size_kib, trapped["bar2"]),
        ("config dword, vgpud", None, mapped["config"]),
        ("BAR0 register, vgpud", None, mapped["bar0"]),
    ]
    if settings.libvfio_user:
        extra = ["--engine", "libvfio-user", "--libvfio-user", settings.libvfio_user]
        engine = check(vgpud_guest(assets, "libvfio-user", settings, extra))
        rows.append(("config dword, --engine libvfio-user", None, engine["config"]))
        rows.append(("BAR0 register, --engine libvfio-user", None, engine["bar0"]))
    if settings.libvfio_user_server:
        peer = check(peer_guest(assets, settings, settings.libvfio_user_server))
        rows.append(("config dword, libvfio-user C sample", None, peer["config"]))
    return {
        "qemu": assets.versions["qemu"],
        "rounds": settings.rounds,
        "loads": settings.loads,
        "rows": [{"path": path, "size_kib": kib, **figures} for path, kib, figures in rows],
    }


def _cell(row: dict[str, Any], key: str, width: int) -> str:
    return f"{row[key]:>{width}.3g}" if key in row else f"{'-':>{width}}"


def render(result: dict[str, Any]) -> str:
    lines = [
        f"q35 TCG guest, QEMU {result['qemu']}: copies best of {result['rounds']} rounds, "
        f"loads {result['loads']} samples",
        f"{'path':<38} {'KiB':>6} {'write MiB/s':>12} {'read MiB/s':>11} "
        f"{'load p50 us':>12} {'load p99 us':>12}",
    ]
    for row in result["rows"]:
        kib = f"{row['size_kib']:>6}" if row["size_kib"] is not None else f"{'-':>6}"
        lines.append(
            f"{row['path']:<38} {kib} {_cell(row, 'write_mib_s', 12)} "
            f"{_cell(row, 'read_mib_s', 11)} {_cell(row, 'load_p50_us', 12)} "
            f"{_cell(row, 'load_p99_us', 12)}"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.guest_bandwidth",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    defaults = Settings()
    parser.add_argument("--size-kib", type=int, default=defaults.size_kib)
    parser.add_argument("--trapped-size-kib", type=int, default=defaults.trapped_size_kib)
    parser.add_argument("--loads", type=int, default=defaults.loads)
    parser.add_argument("--rounds", type=int, default=defaults.rounds)
    parser.add_argument(
        "--libvfio-user",
        default=os.environ.get("VGPUD_LIBVFIO_USER"),
        help="libvfio-user.so.0 for the --engine libvfio-user row (default $VGPUD_LIBVFIO_USER)",
    )
    parser.add_argument(
        "--libvfio-user-server",
        default=os.environ.get("VGPUD_LIBVFIO_USER_SERVER"),
        help="libvfio-user's samples/server for the C row (default $VGPUD_LIBVFIO_USER_SERVER)",
    )
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--echo", action="store_true", help="stream vgpud/QEMU/guest output")
    args = parser.parse_args(argv)
    for path in (args.libvfio_user, args.libvfio_user_server):
        if path and not Path(path).exists():
            parser.error(f"{path} does not exist")
    try:
        assets = Assets.load()
    except AssetsMissingError as exc:
        print(f"guest_bandwidth: {exc}", file=sys.stderr)
        return 2
    settings = Settings(
        args.size_kib,
        args.trapped_size_kib,
        args.loads,
        args.rounds,
        args.libvfio_user,
        args.libvfio_user_server,
        args.echo,
    )
    result = measure(assets, settings)
    print(json.dumps(result, indent=2) if args.json else render(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
