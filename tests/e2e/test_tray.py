"""A tray in one guest: one ``vgpud serve --config`` serving a Grace Hopper and a Grace
Blackwell, attached with what ``vgpud qemu-args --config`` prints (a root port each, one 64-bit
window for every BAR). The guest must find both GPUs with their own ids and BAR sizes, and
what it writes through each BAR4 must land in that device's memory file and no other."""

from __future__ import annotations

import pytest

from tests.e2e.expect import Expected, backing_files, read_backing
from tests.e2e.harness import Harness
from tests.e2e.initramfs import GuestScript
from tests.e2e.qemu import vgpud_json, vgpud_output

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

GPUS = {"gpu0": ("gh200", "8448MiB"), "gpu1": ("gb200", "8448MiB")}
MAGIC = 0x5647_5055_4454_0000  # "VGPUDT" + the guest's index of the GPU
SIZES = {"8448MiB": 8448 << 20}

# For every NVIDIA function the guest finds (in bus order): its ids and BAR4, then a 64-bit
# write of MAGIC + index at BAR4 + 0x1000 and the read back.
_EVERY_GPU = """
i=0
for d in /sys/bus/pci/devices/*; do
    [ "$(cat "$d/vendor")" = 0x10de ] || continue
    DEV=$d
    echo 1 > "$d/enable"
    vg_kv "gpu${i}_device" "$(cat "$d/device")"
    vg_bar 4
    vg_kv "gpu${i}_bar4" "$(hex $BAR_SIZE)"
    vg_write $((BAR_START + 0x1000)) 64 "$(hex $((MAGIC + i)))"
    vg_read "gpu${i}_readback" $((BAR_START + 0x1000)) 64
    i=$((i + 1))
done
vg_kv gpus "$i"
"""


def _config(harness: Harness) -> str:
    devices = []
    for name, (profile, size) in GPUS.items():
        devices.append(
            "[[device]]\n"
            f'name = "{name}"\n'
            f'socket_path = "{harness.workdir / name}.sock"\n'
            f'profile = "{profile}"\n'
            f'memory_size = "{size}"\n'
            f'backing_dir = "{harness.workdir / name}-mem"\n'
        )
    return "\n".join(devices)


# Hot-plug: the guest boots without the GPUs and waits (up to 60 s) for both to appear.
_WAIT_FOR_THE_TRAY = f"""
vg_kv booted yes
tries=0
until [ "$(cat /sys/bus/pci/devices/*/vendor | grep -c 0x10de)" = {len(GPUS)} ]; do
    tries=$((tries + 1)); [ $tries -gt 300 ] && break
    sleep 0.2
done
"""


@pytest.mark.parametrize("attach", ["cold", "hot-plugged", "libvirt"])
async def test_a_guest_with_a_two_gpu_tray(harness: Harness, attach: str) -> None:
    """Hot-plugged: ``qemu-args --config --hotplug`` leaves both GPUs out, each root port
    reserving room for its GPU's BARs, and the two QMP device_adds it prints bring them in.
    libvirt: the domain of ``qemu-args --config --libvirt`` (two functions of one root-port
    slot), booted by a real libvirt (tests/e2e/libvirt.py)."""
    config = harness.workdir / "tray.toml"
    config.write_text(_config(harness))
    await harness.start_vgpud_config(config)
    script = GuestScript().raw(f"MAGIC={MAGIC:#x}" + _EVERY_GPU)
    if attach == "cold":
        qemu_args = vgpud_json("qemu-args", "--config", str(config))
        results = await harness.boot(None, script, qemu_args=qemu_args)
    elif attach == "libvirt":
        domain = vgpud_output("qemu-args", "--config", str(config), "--libvirt")
        results = await harness.boot_libvirt(await harness.start_libvirt(), domain, script)
    else:
        printed = vgpud_json("qemu-args", "--config", str(config), "--hotplug")
        script = GuestScript().raw(_WAIT_FOR_THE_TRAY).raw(f"MAGIC={MAGIC:#x}" + _EVERY_GPU)
        qemu = await harness.start_qemu(None, script, qemu_args=printed["args"])
        await qemu.wait_line(r"^VGTEST booted=yes", 240)
        assert qemu.qmp is not None
        for command in printed["qmp"]:
            await qemu.qmp.execute(command["execute"], **command["arguments"])
        results = await qemu.run_guest(240)

    values = results.values
    assert values.get("gpus") == str(len(GPUS)), values
    seen = {int(values[f"gpu{i}_device"], 16): i for i in range(len(GPUS))}
    for name, (profile, size) in GPUS.items():
        expected = Expected.for_profile(profile, SIZES[size])
        index = seen[expected.device_id]  # each profile's device is there, once
        assert int(values[f"gpu{index}_bar4"], 16) == expected.usemem_bar
        assert int(values[f"gpu{index}_readback"], 16) == MAGIC + index
        layout = vgpud_json(
            "layout", "--profile", profile, "--memory-size", size,
            "--backing-dir", str(harness.workdir / f"{name}-mem"),
        )  # fmt: skip
        usemem = backing_files(layout, harness.workdir / f"{name}-mem")["usemem"]
        # In its own file: the other GPU wrote a different value at the same offset of its own.
        assert read_backing(usemem, 0x1000, 64) == MAGIC + index
