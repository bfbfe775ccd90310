"""``make demo``: start vgpud, boot a guest, show what the guest sees, clean up.

python -m tests.e2e.demo [--profile gh200] [--memory-size 8GiB] [--echo]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

from tests.e2e.assets import Assets, AssetsMissingError
from tests.e2e.expect import read_backing
from tests.e2e.harness import Harness, run_scenario
from tests.e2e.initramfs import GuestResults
from tests.e2e.plans import bar_facts, describe_script

MAGIC = 0x5647_5055_4421_0001  # "VGPUD!" + 1


def _size(n: int) -> str:
    for unit, shift in (("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift} {unit}"
    return f"{n} B"


def _render(results: GuestResults, host_value: int | None, elapsed: float) -> str:
    v = results.values
    lines = [
        f"guest sees {v.get('bdf', '?')}: vendor {v.get('vendor')} device {v.get('device')} "
        f"class {v.get('class')} subsystem {v.get('subsystem_vendor')}:{v.get('subsystem_device')}",
    ]
    for n in range(6):
        bar = bar_facts(results, n)
        if not bar["size"]:
            continue
        kind = ("64-bit " if bar["mem64"] else "32-bit ") + (
            "prefetchable" if bar["prefetch"] else "non-prefetchable"
        )
        lines.append(f"  BAR{n}: {bar['start']:#x}, {_size(bar['size'])}, {kind}")
    lines.append(f"  BAR4 write {MAGIC:#x} @ +0x1000, guest reads back {v.get('demo_readback')}")
    lines.append(f"  BAR4 tail (past device memory) reads {v.get('demo_tail')}")
    if host_value is not None:
        lines.append(f"host sees {host_value:#x} in the usemem backing file at +0x1000")
    lines.append(f"(guest boot and checks took {elapsed:.1f} s)")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.e2e.demo", description=__doc__)
    parser.add_argument("--profile", default="gh200")
    parser.add_argument("--memory-size", default="8448MiB")
    parser.add_argument("--echo", action="store_true", help="stream vgpud/QEMU/guest output")
    args = parser.parse_args(argv)
    try:
        assets = Assets.load()
    except AssetsMissingError as exc:
        print(f"demo: {exc}", file=sys.stderr)
        return 2

    async def body(h: Harness) -> tuple[GuestResults, int | None, float]:
        device = h.device(args.profile, args.memory_size)
        print(
            f"starting vgpud: profile {args.profile}, memory {args.memory_size}, "
            f"socket {device.socket_path}",
            flush=True,
        )
        await h.start_vgpud(device)
        script = describe_script()
        script.write(4, 0x1000, MAGIC, 64).read("demo_readback", 4, 0x1000, 64)
        if device.expected.usemem_bar > device.expected.usemem_len:
            script.read("demo_tail", 4, device.expected.usemem_len, 32)
        print(f"booting a q35 TCG guest (QEMU {assets.versions['qemu']}) …", flush=True)
        started = time.monotonic()
        results = await h.boot(device, script)
        elapsed = time.monotonic() - started
        usemem = device.files["usemem"]
        host = None
        if usemem.path.exists():
            host = read_backing(usemem, 0x1000, 64)
        return results, host, elapsed

    run = run_scenario(assets, body, echo=args.echo)
    if run.error is not None:
        print(f"demo failed: {run.error}", file=sys.stderr)
        for name, text in run.e2e_logs():
            print(f"----- {name} -----\n{text}", file=sys.stderr)
        return 1
    print(_render(*run.value))
    return 0


if __name__ == "__main__":
    sys.exit(main())
