"""Daemon start-up: time from exec to READY=1, RSS, and disk used, for 1..N large devices.

The daemon is started as systemd would (NOTIFY_SOCKET set to a datagram socket of ours), so
the time is the real "process started -> every socket listening" interval, Python start-up
included. After READY, one probe per device (which makes the daemon open the memory files)
shows the sparse files cost no disk.

    python -m benchmarks.startup [--memory-size 144GiB] [--devices 1 4]
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def measure(devices: int, memory_size: str, profile: str) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="vgpud-startup-") as tmp:
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify.bind(f"{tmp}/notify")
        config = Path(tmp) / "vgpud.toml"
        config.write_text(
            "".join(
                f'[[device]]\nname = "gpu{i}"\nsocket_path = "{tmp}/gpu{i}.sock"\n'
                f'profile = "{profile}"\nmemory_size = "{memory_size}"\n'
                f'backing_dir = "{tmp}/mem{i}"\n'
                for i in range(devices)
            )
            + '[daemon]\nlog_level = "warning"\n'
        )
        env = dict(os.environ, NOTIFY_SOCKET=f"{tmp}/notify")
        start = time.perf_counter()
        proc = subprocess.Popen(
            [sys.executable, "-m", "vgpud", "serve", "--config", str(config)], env=env
        )
        try:
            notify.settimeout(30)
            assert notify.recv(64) == b"READY=1"
            ready_ms = (time.perf_counter() - start) * 1000
            for i in range(devices):
                subprocess.run(
                    [sys.executable, "-m", "vgpud", "probe", f"{tmp}/gpu{i}.sock"],
                    check=True,
                    capture_output=True,
                )
            status = Path(f"/proc/{proc.pid}/status").read_text()
            rss_kib = int(status.split("VmRSS:")[1].split()[0])
        finally:
            proc.terminate()
            proc.wait(10)
        disk_kib = (
            sum(f.stat().st_blocks * 512 for f in Path(tmp).glob("mem*/*") if f.is_file()) / 1024
        )
        apparent = sum(f.stat().st_size for f in Path(tmp).glob("mem*/*") if f.is_file())
    return {
        "ready_ms": ready_ms,
        "rss_mib": rss_kib / 1024,
        "disk_kib": disk_kib,
        "apparent_gib": apparent / (1 << 30),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--memory-size", default="144GiB")
    parser.add_argument("--profile", default="gh200")
    parser.add_argument("--devices", type=int, nargs="+", default=[1, 4])
    args = parser.parse_args()
    print(f"{'devices':>7} {'READY ms':>9} {'RSS MiB':>8} {'files GiB':>10} {'on disk KiB':>12}")
    for count in args.devices:
        r = measure(count, args.memory_size, args.profile)
        print(
            f"{count:>7} {r['ready_ms']:>9.0f} {r['rss_mib']:>8.1f} "
            f"{r['apparent_gib']:>10.1f} {r['disk_kib']:>12.0f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
