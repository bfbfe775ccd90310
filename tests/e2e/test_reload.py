"""A reload grows a tray under a running VM: ``vgpud serve --config`` reads its file again on
SIGHUP, and a GPU added to the file is served without a restart, so the VM can hot-plug it.

The guest boots with the two empty root ports that ``vgpud qemu-args --config --hotplug``
prints for the whole tray (gpu0, a Grace Hopper, and gpu1, a Grace Blackwell: their device
ids tell them apart in the guest), while the daemon serves gpu0 only. gpu0 is hot-added and
written; the file then gains gpu1 and the daemon is sent SIGHUP: its "reloaded" line must say
gpu1 was added and nothing else (gpu0, unchanged, is neither re-made nor dropped from its VM).
gpu1 is hot-added; what the guest writes through its BARs must land in gpu1's files, and gpu0
must still answer: its trapped SCRATCH register (a round trip to the daemon) still holds what
was written before the reload.

Then gpu0 leaves the file: the reload reports it draining, since its VM is attached. A new
client (``vgpud probe``) is refused with ENODEV while the guest goes on using gpu0, both its
mapped memory and its trapped registers; once the VM has gone the daemon releases gpu0 and
removes its socket, and gpu1 goes on serving.
"""

from __future__ import annotations

import signal
from collections.abc import Sequence
from typing import Any

import pytest

from backends.synthetic.bar0 import SCRATCH
from tests.e2e.daemon_log import events_since, probe, wait_event
from tests.e2e.engines import ENGINES
from tests.e2e.expect import BackingFile, Expected, backing_files
from tests.e2e.harness import Harness
from tests.e2e.initramfs import GuestScript
from tests.e2e.plans import Plan, assert_bars_assigned, memory_plan, persistence_plan
from tests.e2e.qemu import Vgpud, vgpud_json
from vgpud.units import parse_size

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

# Small memories keep the guest's checks and the files quick. gpu1's 3 GiB leaves a 1 GiB
# tail in its 4 GiB BAR4, so the memory plan's all-ones tail checks run on it too.
TRAY = {"gpu0": ("gh200", "2GiB"), "gpu1": ("gb200", "3GiB")}
OUTCOME_KEYS = ("added", "removed", "draining", "replaced", "kept", "failed")

# Values the guest writes to each GPU's SCRATCH (BAR0, trapped: every access is a request
# to the daemon). Different per GPU, so a request reaching the wrong device shows.
SCRATCH_GPU0 = 0x5C0A_0001
SCRATCH_GPU1 = 0x5C1A_0001
SCRATCH_GPU0_DRAINING = 0x5C0D_0002
# A gpu0 usemem word the host writes once the draining checks are done; the guest waits for
# it through gpu0's BAR4 (test_second_vmm's go-ahead).
GO_OFFSET = 0x300
GO = 0x600DF00D

# Finds one GPU of the tray by its device id (vg_find_dev takes the first NVIDIA function),
# waiting for the hot-plug to bring it in.
_FIND_BY_ID = """
vg_find_id() {  # VENDOR DEVICE: sets BDF and DEV to that function
    for d in /sys/bus/pci/devices/*; do
        if [ "$(cat "$d/vendor")" = "$1" ] && [ "$(cat "$d/device")" = "$2" ]; then
            BDF=${d##*/}; DEV=$d; return 0
        fi
    done
    return 1
}
vg_wait_id() {  # KEY VENDOR DEVICE: until it is there; VGTEST KEY=yes, or no after 120 s
    tries=0
    until vg_find_id "$2" "$3"; do
        tries=$((tries + 1)); [ $tries -gt 600 ] && { vg_kv "$1" no; exit 1; }
        sleep 0.2
    done
    vg_kv "$1" yes
}
"""


class Gpu:
    """One GPU of the tray: its config entry, what the guest must see, where its bytes are."""

    def __init__(self, harness: Harness, name: str) -> None:
        self.name = name
        self.profile, self.memory_size = TRAY[name]
        self.socket_path = harness.workdir / f"{name}.sock"
        self.backing_dir = harness.workdir / f"{name}-mem"
        self.expected = Expected.for_profile(self.profile, parse_size(self.memory_size))
        layout = vgpud_json(
            "layout", "--profile", self.profile, "--memory-size", self.memory_size,
            "--backing-dir", str(self.backing_dir),
        )  # fmt: skip
        self.files: dict[str, BackingFile] = backing_files(layout, self.backing_dir)

    def entry(self) -> str:
        return (
            "[[device]]\n"
            f'name = "{self.name}"\n'
            f'socket_path = "{self.socket_path}"\n'
            f'profile = "{self.profile}"\n'
            f'memory_size = "{self.memory_size}"\n'
            f'backing_dir = "{self.backing_dir}"\n'
        )


def _config(*gpus: Gpu) -> str:
    return "\n".join(gpu.entry() for gpu in gpus)


async def _reload(daemon: Vgpud) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """SIGHUP the daemon and wait for its "reloaded" line; that line and every event logged
    from the signal up to it."""
    start = len(daemon.log.lines)
    assert daemon.process is not None and daemon.running
    daemon.process.send_signal(signal.SIGHUP)
    _, reloaded = await wait_event(daemon, "reloaded", start)
    return reloaded, events_since(daemon, start)


def _outcome(reloaded: dict[str, Any]) -> dict[str, Any]:
    return {key: reloaded[key] for key in OUTCOME_KEYS if key in reloaded}


def _guest_script(gpu0: Gpu, gpu1: Gpu, keep0: Plan, plan1: Plan) -> GuestScript:
    """gpu0 hot-added and written; gpu1 hot-added, checked, written; gpu0 checked again; then,
    after the host's go-ahead (gpu0 draining), gpu0 used once more."""
    nvidia = "0x10de"
    script = GuestScript().raw(_FIND_BY_ID).kv("booted", "yes")
    script.raw(f"vg_wait_id gpu0_found {nvidia} {gpu0.expected.device_id:#06x}\nGPU0=$DEV")
    script.enable().bar_base(0).bar_base(2).bar_base(4)
    keep0.script(script, reads=False)
    script.raw(f"vg_write $((BAR0 + {SCRATCH:#x})) 32 {SCRATCH_GPU0:#x}")
    script.kv("gpu0_written", "yes")
    # The host reloads the daemon with gpu1 in the file, then hot-adds it.
    script.raw(f"vg_wait_id gpu1_found {nvidia} {gpu1.expected.device_id:#06x}")
    script.describe().enable().bar_base(0).bar_base(2).bar_base(4)
    plan1.script(script)
    script.raw(f"vg_write $((BAR0 + {SCRATCH:#x})) 32 {SCRATCH_GPU1:#x}")
    script.raw(f"vg_read gpu1_scratch $((BAR0 + {SCRATCH:#x})) 32")
    script.raw('vg_kv gpus "$(cat /sys/bus/pci/devices/*/vendor | grep -c 0x10de)"')
    # Back to gpu0: still served, with what was written before the reload.
    script.raw('DEV=$GPU0\nvg_kv gpu0_device "$(cat "$DEV/device")"')
    script.bar_base(0).bar_base(2).bar_base(4)
    script.raw(f"vg_read gpu0_scratch $((BAR0 + {SCRATCH:#x})) 32")
    script.kv("added_checked", "yes")
    # The host removes gpu0 from the file and reloads; the go-ahead comes through gpu0's
    # own memory once it has checked that gpu0 is draining.
    script.raw(
        f'until [ "$(devmem "$(hex $((BAR4 + {GO_OFFSET:#x})))" 32)" = 0x{GO:08X} ]; do\n'
        "  usleep 10000\n"
        "done\n"
        "vg_kv resumed yes"
    )
    script.raw(f"vg_write $((BAR0 + {SCRATCH:#x})) 32 {SCRATCH_GPU0_DRAINING:#x}")
    script.raw(f"vg_read gpu0_scratch_draining $((BAR0 + {SCRATCH:#x})) 32")
    keep0.script(script, writes=False)
    return script


@pytest.mark.parametrize("engine", ENGINES)
async def test_a_reload_adds_a_gpu_the_running_vm_hot_plugs(
    harness: Harness, engine: Sequence[str]
) -> None:
    gpu0, gpu1 = Gpu(harness, "gpu0"), Gpu(harness, "gpu1")
    config = harness.workdir / "tray.toml"
    config.write_text(_config(gpu0))
    # What the VM is started for: the whole tray, each GPU an empty root port with room for
    # its BARs, and a device_add each.
    whole = harness.workdir / "whole-tray.toml"
    whole.write_text(_config(gpu0, gpu1))
    printed = vgpud_json("qemu-args", "--config", str(whole), "--hotplug")
    add = {command["arguments"]["id"]: command for command in printed["qmp"]}
    assert sorted(add) == ["gpu0", "gpu1"], printed["qmp"]

    keep0 = persistence_plan(gpu0.expected, tag=0x70)
    plan1 = memory_plan(gpu1.expected, tag=0x71)
    daemon = await harness.start_vgpud_config(config, engine)
    qemu = await harness.start_qemu(
        None, _guest_script(gpu0, gpu1, keep0, plan1), qemu_args=printed["args"]
    )
    assert qemu.qmp is not None
    await qemu.wait_line(r"^VGTEST booted=yes", 240)
    await qemu.qmp.execute(add["gpu0"]["execute"], **add["gpu0"]["arguments"])
    await qemu.wait_line(r"^VGTEST gpu0_written=yes", 120)

    # The reload adds gpu1; gpu0, attached and unchanged, is left alone.
    assert not gpu1.socket_path.exists(), "gpu1 is served before the reload"
    config.write_text(_config(gpu0, gpu1))
    reloaded, events = await _reload(daemon)
    assert _outcome(reloaded) == {"added": ["gpu1"]}, reloaded
    assert reloaded["devices"] == 2, reloaded
    serving = [e.get("device") for e in events if e.get("event") == "serving"]
    assert serving == ["gpu1"], events  # gpu0 was not made again
    assert gpu1.socket_path.exists()

    await qemu.qmp.execute(add["gpu1"]["execute"], **add["gpu1"]["arguments"])
    await qemu.wait_line(r"^VGTEST added_checked=yes", 240)

    # gpu0 leaves the file while its VM is attached: it drains, refusing any new client.
    config.write_text(_config(gpu1))
    reloaded, _ = await _reload(daemon)
    assert _outcome(reloaded) == {"draining": ["gpu0"]}, reloaded
    status, stderr = await probe(gpu0.socket_path)
    assert status == 1, stderr
    assert len(stderr.splitlines()) == 1 and "No such device" in stderr, stderr

    gpu0.files["usemem"].write(GO_OFFSET, GO.to_bytes(4, "little"))
    results = await qemu.run_guest(240)
    values = results.values

    assert values.get("gpu1_found") == "yes", values
    assert values.get("gpus") == "2", values
    assert int(values["device"], 16) == gpu1.expected.device_id  # describe ran on gpu1
    bars = {2: gpu1.expected.bar1_size, 4: gpu1.expected.usemem_bar}
    assert_bars_assigned(results, bars, "gpu1's ")
    bad = plan1.mismatches(results) + plan1.host_mismatches(gpu1.files)
    assert not bad, "\n".join(bad)
    assert int(values["gpu1_scratch"], 16) == SCRATCH_GPU1

    assert int(values["gpu0_device"], 16) == gpu0.expected.device_id
    assert int(values["gpu0_scratch"], 16) == SCRATCH_GPU0, "gpu0 lost its register"
    assert values.get("resumed") == "yes", values
    assert int(values["gpu0_scratch_draining"], 16) == SCRATCH_GPU0_DRAINING
    bad = keep0.mismatches(results) + keep0.host_mismatches(gpu0.files)
    assert not bad, "\n".join(bad)
    assert results.done_rc == 0

    # The VM has gone: gpu0 is released and its socket removed; gpu1 takes a new client.
    _, released = await wait_event(daemon, "device released", 0)
    assert released.get("device") == "gpu0", released
    assert not gpu0.socket_path.exists(), "gpu0's socket outlived its release"
    # Once the daemon has seen the VM leave gpu1 too (until then a new client is "second").
    await wait_event(daemon, "client disconnected", 0, device="gpu1")
    status, stderr = await probe(gpu1.socket_path)
    assert status == 0, stderr
    assert daemon.running
