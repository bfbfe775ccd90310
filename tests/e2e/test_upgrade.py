"""A live upgrade under a running VM: SIGUSR2 makes ``vgpud serve`` execute itself again (the
same pid, the code on disk) and hand its listening socket, its attached QEMU and the device's
state over to the new image, and the guest must not notice.

The guest is a VFIO guest (``Harness.start_qemu(..., vfio=True)``), so that a real driver --
the guest kernel's vfio-pci -- owns the GPU's MSI-X vector and counts its interrupts. Before
the upgrade the guest writes the memory plan's words through BAR2/BAR4 (mapped: they land in
the backing files), then runs the guest half of this module (:func:`guest_main`, in
``chroot /host`` with the host's interpreter). It opens the GPU through /dev/vfio, makes it a
bus master, wires MSI-X vector 0 to an eventfd and maps a buffer for DMA (QEMU, behind the
vIOMMU, passes it on to vgpud as a DMA mapping). It writes SCRATCH (BAR0, trapped: a round
trip to the daemon), rings the doorbell once and counts the interrupt, and says it is ready.

The host reads the daemon's "status" (SIGUSR1: client, connections, DMA mappings), records
its pid and sends SIGUSR2. The ``upgraded`` line must come from the same pid, with one device
and one client handed over, by way of a stand-in (vgpud/stand_in.py), and no ``upgrade
refused``, and the status afterwards must name
the same client with the same DMA mappings. Meanwhile the guest keeps reading SCRATCH (each
read a request the daemon must answer across the exec, within QEMU's 5 s reply timeout)
while it polls a go-ahead word in BAR4 that the host writes into the usemem file only once
the upgrade is done. After it, the guest checks SCRATCH still holds what it wrote and takes a
new value, and the doorbell raises another interrupt through the eventfd QEMU handed to the
old process. The DMA buffer is unmapped; the guest releases the GPU (vfio-pci resets it,
through the new process), unbinds it and reads the memory plan back, tails included
(trapped, so answered by the new process). Once the VM has powered off the daemon logs
``client disconnected``, takes a new client on the listening socket it inherited (``vgpud
probe``) and stops on SIGTERM with exit status 0.

Python engine only: the libvfio-user engine refuses upgrades. About 17 s.
"""

from __future__ import annotations

import mmap
import os
import select
import signal
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import trio

from backends.device import (
    BAR0_REGION_INDEX,
    BAR4_REGION_INDEX,
    CONFIG_REGION_INDEX,
    MSIX_IRQ_INDEX,
    DmaRegion,
    IrqAction,
)
from backends.synthetic.bar0 import DOORBELL, SCRATCH
from backends.synthetic.config_space import PCI_COMMAND, PCI_COMMAND_MASTER
from backends.vfio.device import VfioPciDevice
from tests.e2e.daemon_log import events_since, probe, wait_event
from tests.e2e.harness import Harness
from tests.e2e.initramfs import GuestScript
from tests.e2e.plans import Plan, describe_script, memory_plan
from tests.e2e.qemu import Vgpud

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

# 2.5 GiB: a 2 GiB BAR4 holding 1.5 GiB of usemem, so the memory plan's tail checks (trapped
# accesses) run after the upgrade too.
SIZE = "2560MiB"
# SCRATCH (BAR0, trapped) before and after the upgrade.
SCRATCH_BEFORE = 0x5C0B_0001
SCRATCH_AFTER = 0x5C0A_0002
# A usemem word the host writes once the upgrade is done; the guest polls it through BAR4.
GO_OFFSET = 0x300
GO = 0x600DF00D
# The guest's DMA buffer, at an IOVA of its own choosing (as tests/e2e/guest_vfio.py).
DMA_IOVA = 0x4000_0000
DMA_SIZE = 2 << 20
# Guest-side bounds: how long an interrupt may take, how long the go-ahead.
IRQ_TIMEOUT_MS = 60_000
GO_TIMEOUT = 300.0
GO_POLL = 0.01
# The guest kernel's name for the interrupt vfio-pci requests for MSI-X vector 0.
VFIO_MSIX0 = "vfio-msix[0]"


# --------------------------------------------------------------------------------------------
# The guest half: ``python -m tests.e2e.test_upgrade BDF`` inside the VFIO guest's chroot.


def _report(key: str, value: object) -> None:
    print(f"VGTEST {key}={value}", flush=True)


def _proc_interrupts(name: str) -> int:
    """The guest kernel's count for the interrupt called ``name`` (all CPUs), -1 if none."""
    lines = Path("/proc/interrupts").read_text().splitlines()
    cpus = len(lines[0].split())
    for line in lines[1:]:
        if name in line:
            print("interrupts:", " ".join(line.split()), flush=True)  # for a failing log
            return sum(int(count) for count in line.split()[1 : 1 + cpus])
    return -1


def _u32(data: bytes) -> int:
    return int.from_bytes(data, "little")


def _scratch(device: VfioPciDevice) -> int:
    return _u32(device.region_read(BAR0_REGION_INDEX, SCRATCH, 4))


def _ring(device: VfioPciDevice, efd: int, key: str) -> None:
    """Ring the doorbell for vector 0; report how many interrupts the eventfd counted (0: none
    within the limit) and the kernel's count of the vector afterwards."""
    device.region_write(BAR0_REGION_INDEX, DOORBELL, (0).to_bytes(4, "little"))
    poller = select.poll()
    poller.register(efd, select.POLLIN)
    _report(f"{key}_eventfd", os.eventfd_read(efd) if poller.poll(IRQ_TIMEOUT_MS) else 0)
    _report(f"{key}_count", _proc_interrupts(VFIO_MSIX0))


def guest_main(bdf: str) -> int:
    """Everything the guest does with the GPU held through /dev/vfio (module docstring)."""
    device = VfioPciDevice(bdf)  # opening it resets the function (vfio-pci), SCRATCH too
    efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    buffer = mmap.mmap(-1, DMA_SIZE)
    view = memoryview(buffer)
    try:
        _report("vfio_open", "yes")
        command = device.region_read(CONFIG_REGION_INDEX, PCI_COMMAND, 2)
        master = _u32(command) | PCI_COMMAND_MASTER  # MSI-X messages are bus-master writes
        device.region_write(CONFIG_REGION_INDEX, PCI_COMMAND, master.to_bytes(2, "little"))
        # The device owns what it is given: it gets its own copy of the eventfd.
        device.set_irqs(MSIX_IRQ_INDEX, IrqAction.TRIGGER, 0, 1, eventfds=[os.dup(efd)])
        device.dma_map(DmaRegion(DMA_IOVA, DMA_SIZE, readable=True, writable=True, memory=view))
        _report("dma_map", "ok")
        device.region_write(BAR0_REGION_INDEX, SCRATCH, SCRATCH_BEFORE.to_bytes(4, "little"))
        _report("scratch_before", hex(_scratch(device)))
        _ring(device, efd, "irq_before")
        _report("upgrade_ready", "yes")

        # Until the host's go-ahead (through mapped BAR4, not the daemon), SCRATCH is read
        # over and over: some of these requests are in flight while the daemon re-executes.
        reads = wrong = 0
        slowest = 0.0  # the read that waited for the new process, if one did
        deadline = time.monotonic() + GO_TIMEOUT
        while _u32(device.region_read(BAR4_REGION_INDEX, GO_OFFSET, 4)) != GO:
            if time.monotonic() > deadline:
                _report("resumed", "no")
                return 1
            sent = time.monotonic()
            value = _scratch(device)
            slowest = max(slowest, time.monotonic() - sent)
            reads += 1
            if value != SCRATCH_BEFORE:
                wrong += 1
                print(f"SCRATCH read {value:#x} while waiting (read {reads})", flush=True)
            time.sleep(GO_POLL)
        _report("resumed", "yes")
        _report("waiting_reads", reads)
        _report("waiting_wrong", wrong)
        _report("waiting_slowest_ms", round(slowest * 1000))

        _report("scratch_kept", hex(_scratch(device)))
        device.region_write(BAR0_REGION_INDEX, SCRATCH, SCRATCH_AFTER.to_bytes(4, "little"))
        _report("scratch_after", hex(_scratch(device)))
        _ring(device, efd, "irq_after")
        device.dma_unmap(DMA_IOVA, DMA_SIZE)
        _report("dma_unmap", "ok")
    finally:
        device.shutdown()  # interrupts off, DMA unmapped, the device closed (and reset)
        view.release()
        buffer.close()
        os.close(efd)
    _report("released", "yes")
    return 0


def _guest_script(plan: Plan) -> GuestScript:
    """The memory plan's writes, the GPU held through VFIO across the upgrade, then the
    memory plan's reads once the guest has let it go."""
    script = describe_script()
    plan.script(script, reads=False)
    script.kv("written", "yes")
    script.vfio_bind().host_chroot().host_python("tests.e2e.test_upgrade", "$BDF")
    # Closed, the device stays in vfio-pci's idle D3hot, where its BARs do not decode (reads
    # give 0): unbound, it is back in D0.
    script.raw('echo "$BDF" > "$DEV/driver/unbind"')
    plan.script(script, writes=False)
    return script


# --------------------------------------------------------------------------------------------
# The host half


async def _status(daemon: Vgpud) -> dict[str, Any]:
    """SIGUSR1: the daemon's "status" line for its one device."""
    assert daemon.process is not None and daemon.running
    start = len(daemon.log.lines)
    daemon.process.send_signal(signal.SIGUSR1)
    _, status = await wait_event(daemon, "status", start)
    return status


async def test_sigusr2_upgrades_the_daemon_under_a_running_vm(harness: Harness) -> None:
    device = harness.device("gh200", SIZE)
    plan = memory_plan(device.expected, tag=0x5B)
    daemon = await harness.start_vgpud(device)
    qemu = await harness.start_qemu(device, _guest_script(plan), vfio=True)
    await qemu.wait_line(r"^VGTEST upgrade_ready=yes", 240)
    bad = plan.host_mismatches(device.files)
    assert not bad, "before the upgrade:\n" + "\n".join(bad)
    before = await _status(daemon)
    assert before["client"] is not None, before
    assert before["dma_maps"] >= 1, before  # the guest's DMA buffer, at least

    # The upgrade: same process, everything handed over.
    assert daemon.process is not None
    pid = daemon.process.pid
    start = len(daemon.log.lines)
    daemon.process.send_signal(signal.SIGUSR2)
    signalled = trio.current_time()
    at, outcome = await wait_event(daemon, ("upgraded", "upgrade refused"), start)
    harness.notes.append(
        f"{outcome['event']} {trio.current_time() - signalled:.2f} s after SIGUSR2"
    )
    assert outcome["event"] == "upgraded", f"upgrade refused: {outcome.get('reason')!r}"
    assert daemon.running and daemon.process.pid == pid, "the daemon is not the same process"
    assert outcome["pid"] == pid, outcome
    assert outcome["devices"] == 1, outcome
    assert outcome["clients"] == 1, outcome
    names = [event.get("event") for event in events_since(daemon, start)]
    assert "upgrading" in names[: names.index("upgraded")], names
    # A fork of the daemon served the VM while the new code started (vgpud/stand_in.py).
    assert "stand-in serving while the new code starts" in names, names
    assert outcome["stand_in_ms"] > 0, outcome
    harness.notes.append(
        f"stand-in served {outcome['stand_in_ms']} ms, handover {outcome['handover_ms']} ms"
    )
    after = await _status(daemon)
    for key in ("client", "connections", "dma_maps"):
        assert after[key] == before[key], f"{key}: {before[key]!r} before, {after} after"

    device.files["usemem"].write(GO_OFFSET, GO.to_bytes(4, "little"))
    results = await qemu.run_guest(240)
    values = results.values
    assert values.get("resumed") == "yes", values
    assert results.done_rc == 0, values

    # The trapped register: its value kept across the exec, answered during it, and new
    # writes taken afterwards.
    assert results.as_int("scratch_before") == SCRATCH_BEFORE
    assert int(values["waiting_reads"]) >= 1
    assert values["waiting_wrong"] == "0", "SCRATCH read wrong while the daemon upgraded"
    assert results.as_int("scratch_kept") == SCRATCH_BEFORE, "SCRATCH lost in the upgrade"
    assert results.as_int("scratch_after") == SCRATCH_AFTER
    # The interrupt: the doorbell rings through the eventfd QEMU gave the old process.
    assert int(values["irq_before_eventfd"]) >= 1, "no MSI-X interrupt before the upgrade"
    assert int(values["irq_after_eventfd"]) >= 1, "no MSI-X interrupt after the upgrade"
    assert 1 <= int(values["irq_before_count"]) < int(values["irq_after_count"]), values
    assert values.get("dma_map") == "ok" and values.get("dma_unmap") == "ok", values
    assert values.get("released") == "yes", values
    # Device memory, mapped and trapped (the tails), read after the upgrade.
    bad = plan.mismatches(results) + plan.host_mismatches(device.files)
    assert not bad, "\n".join(bad)
    # QEMU saw no request time out and no error reply (or a failed DMA unmap).
    complaints = [
        line
        for line in qemu.stderr.lines
        if any(word in line for word in ("timed out", "error", "dma_unmap"))
    ]
    assert not complaints, "\n".join(complaints)

    # After the upgrade the daemon goes on as usual: the VM leaving, a new client on the
    # inherited listening socket, a clean stop.
    await wait_event(daemon, "client disconnected", at + 1)
    status, stderr = await probe(device.socket_path)
    assert status == 0, stderr
    events = events_since(daemon)
    assert not [e for e in events if e.get("event") == "upgrade refused"], events
    failures = [e for e in events if e.get("level") in ("error", "critical")]
    assert not failures, failures
    assert await daemon.stop() == 0


if __name__ == "__main__":
    sys.exit(guest_main(sys.argv[1]))
