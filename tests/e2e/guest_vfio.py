"""Runs INSIDE a test guest: vgpud's /dev/vfio backend over the guest kernel's vfio-pci.

The guest's GPU is the host vgpud's vfio-user device, bound to vfio-pci behind QEMU's
emulated IOMMU (tests/e2e/test_vfio_backend.py). This program starts a second vgpud in the
guest with ``--vfio-device`` on it and drives that daemon with the project's vfio-user
client, so every request crosses: client -> guest vgpud -> guest kernel VFIO -> QEMU ->
host vgpud -> synthetic GPU (and back; interrupts the other way). Last, it upgrades that
daemon (SIGUSR2) under an attached client, once with the exec failing and once for real
(:func:`upgrade`). It prints one fact per line
(``VGTEST key=value``) for the host test to assert on; it decides nothing itself.

``python -m tests.e2e.guest_vfio BDF WORKDIR``
"""

from __future__ import annotations

import json
import mmap
import os
import signal
import struct
import subprocess
import sys
from pathlib import Path

import trio

import protocol as p
from backends.synthetic.bar0 import DOORBELL, SCRATCH
from backends.synthetic.capabilities import MSIX_OFFSET
from tests.serve_process import interpreter_link
from vgpud.client import VfioUserClient

# What the test writes, and where (the host test imports these to check the usemem file).
MMAP_PATTERN = b"vgpud-vfio-mmap!" * 4
MMAP_OFFSET = 0x10000
WRITE_PATTERN = b"vgpud-vfio-region-write"
WRITE_OFFSET = 0x20008
DMA_IOVA = 0x4000_0000
DMA_SIZE = 2 << 20
READY_TIMEOUT = 300.0  # seconds: Python starting under TCG inside the guest is slow
IRQ_TIMEOUT = 60.0
_DATA_EVENTFD_TRIGGER = 4 | 32
UPGRADE_SCRATCH = 0xC0FFEE  # written before the upgrade, read after it
_MSIX = 2
MSIX_PBA = 0x3000  # in BAR0 (backends/synthetic/bar0.py)
PCI_COMMAND = 0x04
PCI_COMMAND_MASTER = 0x4


def report(key: str, value: object) -> None:
    print(f"VGTEST {key}={value}", flush=True)


async def start_daemon(
    bdf: str, workdir: Path, nursery: trio.Nursery
) -> tuple[trio.Process, Path, Notify, DaemonLog]:
    """Start the guest vgpud on ``bdf`` and wait for its READY=1 (sd_notify). It runs through
    an interpreter link (tests.serve_process), so that an upgrade's exec can be made to
    fail. Its JSON log is kept in ``workdir/vgpud.log`` (:class:`DaemonLog`, pumped in
    ``nursery``)."""
    await trio.Path(workdir).mkdir(parents=True, exist_ok=True)
    sock_path = workdir / "gpu.sock"
    notify = Notify(workdir / "notify")
    await notify.bind()
    env = dict(os.environ, NOTIFY_SOCKET=str(notify.path))
    python = interpreter_link(workdir / "python")
    argv = [str(python), "-m", "vgpud", "serve", "--vfio-device", bdf]
    argv += ["--socket-path", str(sock_path), "--log-format", "json"]
    daemon = await trio.lowlevel.open_process(argv, env=env, stderr=subprocess.PIPE)
    assert daemon.stderr is not None
    log = DaemonLog(workdir / "vgpud.log")
    nursery.start_soon(log.pump, daemon.stderr)
    ready = False

    async def wait_ready(cancel: trio.CancelScope) -> None:
        nonlocal ready
        await notify.wait_for(b"READY=1")
        ready = True
        cancel.cancel()

    # READY=1, or the daemon's exit (a start-up error it printed), whichever comes first.
    with trio.fail_after(READY_TIMEOUT):
        async with trio.open_nursery() as waiting:
            waiting.start_soon(wait_ready, waiting.cancel_scope)
            await daemon.wait()
            waiting.cancel_scope.cancel()
    if not ready:
        raise SystemExit(f"the guest vgpud exited with {daemon.returncode} before READY=1")
    return daemon, sock_path, notify, log


class DaemonLog:
    """The guest vgpud's JSON log (its stderr), written to a file as it comes and waited on
    event by event; the daemon's next image after an exec writes to the same pipe."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.events: list[dict[str, object]] = []
        self._grew = trio.Event()

    async def pump(self, stream: trio.abc.ReceiveStream) -> None:
        pending = b""
        with self.path.open("wb") as file:
            async for chunk in stream:
                file.write(chunk)
                file.flush()
                *lines, pending = (pending + chunk).split(b"\n")
                for line in lines:
                    if line.startswith(b"{"):
                        self.events.append(json.loads(line))
                self._grew.set()
                self._grew = trio.Event()

    async def wait_for(self, since: int, *names: str) -> dict[str, object]:
        """The first event called one of ``names`` from event number ``since`` on."""
        while True:
            for event in self.events[since:]:
                if event.get("event") in names:
                    return event
            since = len(self.events)
            await self._grew.wait()


class Notify:
    """The datagram socket the guest vgpud says READY=1 / RELOADING=1 on (sd_notify)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_DGRAM)

    async def bind(self) -> None:
        await self.sock.bind(str(self.path))

    async def wait_for(self, word: bytes) -> None:
        """Until a message holding ``word`` as one of its lines."""
        while word not in (await self.sock.recv(4096)).split(b"\n"):
            pass

    def close(self) -> None:
        self.sock.close()


def locked_kib(pid: int) -> int:
    """The process's locked_vm (``VmLck``), which VFIO type1 charges pinned DMA pages to."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmLck:"):
            return int(line.split()[1])
    return -1


async def region_facts(client: VfioUserClient) -> dict[int, tuple[int, int]]:
    """Region sizes/flags; returns (fd, mmap offset) of the mmappable ones (caller closes)."""
    fds: dict[int, tuple[int, int]] = {}
    info = await client.device_info()
    report("device_flags", info.flags)
    report("num_regions", info.num_regions)
    report("num_irqs", info.num_irqs)
    for index in (0, 2, 4, 7):
        region = await client.region_info(index)
        report(f"region{index}", f"{region.info.size:#x},{region.info.flags:#x}")
        if region.fd is not None:
            fds[index] = (region.fd, region.info.offset)
    return fds


async def interrupt(client: VfioUserClient) -> None:
    """MSI-X vector 0 wired to an eventfd; a doorbell write must signal it."""
    # As a guest driver does first: a device sends MSI-X messages only as a bus master
    # (QEMU drops them otherwise, like a real bridge).
    command = struct.unpack("<H", await client.region_read(7, PCI_COMMAND, 2))[0]
    await client.region_write(7, PCI_COMMAND, struct.pack("<H", command | PCI_COMMAND_MASTER))
    efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    try:
        await client.set_irqs(_MSIX, _DATA_EVENTFD_TRIGGER, 0, 1, [efd])
        await client.region_write(0, DOORBELL, struct.pack("<I", 0))
        with trio.move_on_after(IRQ_TIMEOUT):
            await trio.lowlevel.wait_readable(efd)
        # The device's own view: MSI-X control (enable, function mask) and pending bits.
        control = struct.unpack("<H", await client.region_read(7, MSIX_OFFSET + 2, 2))[0]
        report("msix_control", hex(control))
        report("msix_pba", (await client.region_read(0, MSIX_PBA, 8)).hex())
        # For a failing run's log: the guest kernel's view of the vfio interrupt.
        for line in (await trio.Path("/proc/interrupts").read_text()).splitlines():
            if "vfio" in line or "DMAR" in line:
                print("interrupts:", " ".join(line.split()), flush=True)
        try:
            report("msix_count", os.eventfd_read(efd))
        except BlockingIOError:
            report("msix_count", 0)
        await client.set_irqs(_MSIX, 1 | 32, 0, 0)  # DATA_NONE|TRIGGER count 0: disable
    finally:
        os.close(efd)


async def dma(client: VfioUserClient) -> None:
    """A memfd mapped for DMA: the guest kernel pins it into the (emulated) IOMMU."""
    memfd = os.memfd_create("guest-dma", os.MFD_CLOEXEC)
    try:
        os.ftruncate(memfd, DMA_SIZE)
        await client.dma_map(DMA_IOVA, DMA_SIZE, 3, memfd, 0)
        report("dma_map", "ok")
        await client.dma_unmap(DMA_IOVA, DMA_SIZE)
        report("dma_unmap", "ok")
    finally:
        os.close(memfd)


async def upgrade(
    client: VfioUserClient, daemon: trio.Process, notify: Notify, log: DaemonLog, workdir: Path
) -> None:
    """A live upgrade (SIGUSR2) of the guest vgpud with this client attached: MSI-X vector 0
    wired to an eventfd and a memfd mapped for DMA (in the guest's IOMMU, pinned: charged to
    the daemon's locked_vm) before it, and an upgrade whose exec failed
    (:func:`abandoned_upgrade`) before that; after it the same connection must answer, the
    doorbell must still signal the eventfd the kernel was given before the exec, and the
    mapping must unmap, with the pinned pages charged to the new image (not underflowing
    its locked_vm: Linux 6.2's vfio/type1 exec fixes, VFIO_DMA_MAP_FLAG_VADDR)."""
    command = struct.unpack("<H", await client.region_read(7, PCI_COMMAND, 2))[0]
    await client.region_write(7, PCI_COMMAND, struct.pack("<H", command | PCI_COMMAND_MASTER))
    efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    memfd = os.memfd_create("guest-dma", os.MFD_CLOEXEC)
    try:
        os.ftruncate(memfd, DMA_SIZE)
        await client.set_irqs(_MSIX, _DATA_EVENTFD_TRIGGER, 0, 1, [efd])
        await client.dma_map(DMA_IOVA, DMA_SIZE, 3, memfd, 0)
        await client.region_write(0, SCRATCH, struct.pack("<I", UPGRADE_SCRATCH))
        report("upgrade_locked_before_kib", locked_kib(daemon.pid))
        await abandoned_upgrade(client, daemon, notify, log, workdir)

        since = len(log.events)
        daemon.send_signal(signal.SIGUSR2)
        with trio.fail_after(READY_TIMEOUT):
            outcome = await log.wait_for(
                since, "upgraded", "upgrade refused", "upgrade failed; serving on"
            )
            if outcome["event"] != "upgrade refused":  # refused before any RELOADING=1
                await notify.wait_for(b"READY=1")
        report("upgrade_event", outcome["event"])
        report("upgrade_reason", outcome.get("reason", ""))
        report("upgrade_same_pid", outcome.get("pid") == daemon.pid)
        report("upgrade_clients", outcome.get("clients"))
        report("upgrade_locked_after_kib", locked_kib(daemon.pid))

        scratch = struct.unpack("<I", await client.region_read(0, SCRATCH, 4))[0]
        report("upgrade_scratch", hex(scratch))
        await client.region_write(0, DOORBELL, struct.pack("<I", 0))
        with trio.move_on_after(IRQ_TIMEOUT):
            await trio.lowlevel.wait_readable(efd)
        try:
            report("upgrade_msix_count", os.eventfd_read(efd))
        except BlockingIOError:
            report("upgrade_msix_count", 0)
        await client.dma_unmap(DMA_IOVA, DMA_SIZE)
        report("upgrade_dma_unmap", "ok")
        report("upgrade_locked_unmapped_kib", locked_kib(daemon.pid))
        await client.set_irqs(_MSIX, 1 | 32, 0, 0)
    finally:
        os.close(efd)
        os.close(memfd)


async def abandoned_upgrade(
    client: VfioUserClient, daemon: trio.Process, notify: Notify, log: DaemonLog, workdir: Path
) -> None:
    """An upgrade whose exec fails after the DMA mappings' addresses were taken from the
    kernel (VFIO_DMA_UNMAP_FLAG_VADDR): the daemon must give them back and serve on. The
    client holds the freeze with half a message until the new code has been checked, then
    points the interpreter's link at nothing and sends the rest."""
    since = len(log.events)
    read = p.RegionReadRequest(region=0, offset=SCRATCH, count=4)
    wire = client.conn.send_request(read)[1].data
    await client.stream.send(wire[: p.HEADER_SIZE], [])
    daemon.send_signal(signal.SIGUSR2)
    with trio.fail_after(READY_TIMEOUT):
        await log.wait_for(since, "new code checked; bringing the clients to rest")
    interpreter_link(workdir / "python", broken=True)
    await client.stream.send(wire[p.HEADER_SIZE :], [])
    reply = await client.receive()
    served = isinstance(reply, p.Reply) and isinstance(reply.message, p.RegionReadReply)
    report("abandoned_read", served)
    with trio.fail_after(READY_TIMEOUT):
        failed = await log.wait_for(since, "upgrade failed; serving on", "upgrade refused")
        report("abandoned_event", failed["event"])
        if failed["event"] != "upgrade refused":
            # The exec's RELOADING=1, then READY=1 again once it failed.
            await notify.wait_for(b"RELOADING=1")
            await notify.wait_for(b"READY=1")
    report("abandoned_exec_error", "No such file or directory" in str(failed.get("exception")))
    report(
        "abandoned_device_errors",
        sum(
            e.get("event") == "device could not take back what it let go of"
            for e in log.events[since:]
        ),
    )
    report("abandoned_locked_kib", locked_kib(daemon.pid))
    scratch = struct.unpack("<I", await client.region_read(0, SCRATCH, 4))[0]
    report("abandoned_scratch", hex(scratch))
    interpreter_link(workdir / "python")  # back, for the upgrade that follows


async def main(bdf: str, workdir: Path) -> None:
    async with trio.open_nursery() as nursery:  # the log pump ends with the daemon
        await scenario(bdf, workdir, nursery)


async def scenario(bdf: str, workdir: Path, nursery: trio.Nursery) -> None:
    daemon, sock_path, notify, log = await start_daemon(bdf, workdir, nursery)
    report("daemon", "ready")
    try:
        # What a user runs first: `vgpud probe` on the socket.
        probed = await trio.run_process(
            [sys.executable, "-m", "vgpud", "probe", "--json", str(sock_path)], capture_stdout=True
        )
        bar4 = next(r for r in json.loads(probed.stdout)["regions"] if r["index"] == 4)
        report("probe_bar4", f"{bar4['size']:#x},{bar4['fd_kind']}")
        async with await VfioUserClient.connect(sock_path) as client:
            fds = await region_facts(client)
            config = await client.region_read(7, 0, 4)
            report("config_ids", config.hex())
            ready = await client.region_read(0, 0x1498, 4)
            report("c2c_link", hex(struct.unpack("<I", ready)[0]))
            # BAR4 (usemem) both ways: the region fd mmapped, and REGION_WRITE.
            fd, offset = fds[4]
            usemem = mmap.mmap(fd, 1 << 20, offset=offset)
            usemem[MMAP_OFFSET : MMAP_OFFSET + len(MMAP_PATTERN)] = MMAP_PATTERN
            usemem.close()
            await client.region_write(4, WRITE_OFFSET, WRITE_PATTERN)
            back = await client.region_read(4, MMAP_OFFSET, len(MMAP_PATTERN))
            report("bar4_readback", back == MMAP_PATTERN)
            for fd, _ in fds.values():
                os.close(fd)
            await interrupt(client)
            await dma(client)
            await client.region_write(0, SCRATCH, struct.pack("<I", 0x5CA7C4))
            before = struct.unpack("<I", await client.region_read(0, SCRATCH, 4))[0]
            await client.reset()
            after = struct.unpack("<I", await client.region_read(0, SCRATCH, 4))[0]
            report("scratch", f"{before:#x},{after:#x}")
        # A second client after the first left: device state and memory kept.
        async with await VfioUserClient.connect(sock_path) as client:
            back = await client.region_read(4, WRITE_OFFSET, len(WRITE_PATTERN))
            report("reconnect_readback", back == WRITE_PATTERN)
            await upgrade(client, daemon, notify, log, workdir)
        # The upgraded daemon takes the next client on the socket it inherited. The client
        # before it left the device a bus master (upgrade()); its DMA must not go on into
        # this one's memory, so the daemon cleared that bit when it left.
        async with await VfioUserClient.connect(sock_path) as client:
            back = await client.region_read(4, WRITE_OFFSET, len(WRITE_PATTERN))
            report("upgraded_reconnect_readback", back == WRITE_PATTERN)
            command = struct.unpack("<H", await client.region_read(7, PCI_COMMAND, 2))[0]
            report("reconnect_bus_master", bool(command & PCI_COMMAND_MASTER))
    finally:
        notify.close()
        daemon.terminate()
        report("daemon_exit", await daemon.wait())
        for event in log.events:  # for a failing run's serial log
            print("vgpud:", json.dumps(event), flush=True)


if __name__ == "__main__":
    trio.run(main, sys.argv[1], Path(sys.argv[2]))
