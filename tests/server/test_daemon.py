"""The daemon over a real UNIX socket, driven by the project's own client."""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import functools
import json
import mmap
import os
import socket
import struct
import threading
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import structlog
import trio
import trio.testing

import protocol as p
from backends.device import DeviceError, MmapTarget, RegionInfo
from backends.irq import same_eventfd
from backends.stall_breaker import BREAKER
from backends.synthetic import SyntheticGpu, get_profile
from backends.synthetic.bar0 import SCRATCH
from tests.hugepages import HUGE, Q35_WINDOWS, fake_huge_blocks, hugetlb_memfd, position_pattern
from tests.server.conftest import (
    RESMEM_LENGTH,
    USEMEM_BAR_SIZE,
    USEMEM_LENGTH,
    Daemon,
    open_fds,
    reset_flood,
    start_daemon,
)
from tests.server.rawclient import QEMU_VERSION, RawConn
from vgpud import daemon
from vgpud.client import CLIENT_CAPABILITIES, VfioUserClient, VfioUserError
from vgpud.config import DaemonConfig, single_device
from vgpud.log_limit import BURST, PER_SECOND
from vgpud.server import listener as listener_module
from vgpud.server import session as session_module
from vgpud.server.dma import DmaMapping
from vgpud.server.listener import SERVER_CAPABILITIES, DeviceServer
from vgpud.server.socket_files import ListenerError, bind_unix_listener
from vgpud.server.transport import FdStream, close_fds

CONFIG = 7
BAR0, BAR2, BAR4 = 0, 2, 4
COMMAND_MEMORY = 0x0002
MSIX_CAP = 0xA0
DOORBELL = 0xFF0000
SET_IRQS_EVENTFD_TRIGGER = 0x4 | 0x20
SET_IRQS_NONE_TRIGGER = 0x1 | 0x20
MSIX_IRQ = 2


async def enable_memory(client: VfioUserClient) -> None:
    """Set COMMAND.MEM, as a guest does before touching BARs (spec nvgrace-gpu.md §7.4)."""
    await client.region_write(CONFIG, 0x04, struct.pack("<H", COMMAND_MEMORY))


async def test_negotiation_as_qemu_does_it(vgpud: Daemon) -> None:
    conn = await RawConn.open(vgpud.socket_path, negotiate=False)
    await conn.send(QEMU_VERSION)
    reply = await conn.receive()
    assert reply is not None and not reply.is_error
    # Spec vfio-user.md R2: never longer than QEMU's 214-byte request, NUL-terminated JSON.
    assert reply.size <= len(QEMU_VERSION)
    major, minor = struct.unpack_from("<HH", reply.payload)
    assert (major, minor) == (0, 0)
    assert reply.payload.endswith(b"\0")
    caps = json.loads(reply.payload[4:-1])["capabilities"]
    assert caps["max_msg_fds"] == 16
    assert caps["max_data_xfer_size"] == 1 << 20
    # The granule the DMA table maps; left out when it is the spec's default, 4096.
    assert caps.get("pgsizes", 4096) == mmap.PAGESIZE
    conn.close()


@pytest.mark.parametrize("page_size", [4096, 16384, 65536])
def test_the_reply_to_qemu_offers_the_hosts_page_size_whatever_it_is(page_size: int) -> None:
    """An arm64 Grace host may run a 16K- or 64K-page kernel: the DMA table then maps in that
    granule, so that is what the reply offers, with every other key still in QEMU's 214
    bytes (spec vfio-user.md §3.1, R2)."""
    request = p.Version.unpack(QEMU_VERSION[p.HEADER_SIZE :])
    ours = dataclasses.replace(SERVER_CAPABILITIES, pgsizes=page_size)
    reply = p.negotiate_reply(request, ours, len(QEMU_VERSION))
    assert reply.capabilities is not None
    assert reply.capabilities.pgsizes == page_size
    assert reply.capabilities.max_msg_fds == 16
    assert reply.capabilities.max_dma_maps == SERVER_CAPABILITIES.max_dma_maps
    assert p.HEADER_SIZE + len(reply.pack()) <= len(QEMU_VERSION)


async def test_dma_map_unmap_and_unmap_all(vgpud: Daemon) -> None:
    before = open_fds()
    ram = os.memfd_create("guest-ram", os.MFD_CLOEXEC)
    os.ftruncate(ram, 1 << 30)
    async with await vgpud.connect() as client:
        await client.dma_map(0, 0xA0000, fd=ram)
        await client.dma_map(0x100000, (1 << 30) - 0x100000, fd=ram, offset=0x100000)
        await client.dma_map(0xFFFC0000, 0x40000, flags=1)  # BIOS: read-only, no fd
        assert len(client_table(vgpud)) == 3
        await client.dma_unmap(0, 0xA0000)
        await client.dma_unmap(0, 0xA0000)  # nothing there any more: type1 says fine
        with pytest.raises(VfioUserError) as info:
            await client.dma_unmap(0x100000, 0x1000)  # would cut the RAM map in two
        assert info.value.errno == errno.EINVAL
        assert len(client_table(vgpud)) == 2
        with pytest.raises(VfioUserError) as info:
            await client.dma_map(0x200000, 0x1000, fd=ram)  # overlaps the RAM map
        assert info.value.errno == errno.EEXIST
        await client.dma_unmap(0, 0, flags=2)  # unmap-all
        assert len(client_table(vgpud)) == 0
        await client.dma_map(0, 0x1000, fd=ram)
    await vgpud.idle()
    os.close(ram)
    assert open_fds() == before


@pytest.fixture(params=["hugetlb", "fake-huge-blocks"])
def huge_page_ram(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[int]:
    """4 huge pages of guest RAM: a hugetlb memfd, or a memfd that looks like one to the DMA
    table. A sync fixture, so a skip keeps its reason (a skip inside a trio test loses it)."""
    if request.param == "hugetlb":
        ram = hugetlb_memfd("guest-ram", 4 * HUGE)
    else:
        fake_huge_blocks(monkeypatch)
        ram = os.memfd_create("guest-ram", os.MFD_CLOEXEC)
        os.ftruncate(ram, 4 * HUGE)
    yield ram
    os.close(ram)


async def test_dma_map_of_huge_page_ram_at_qemu_offsets(vgpud: Daemon, huge_page_ram: int) -> None:
    """q35 low RAM in 2 MiB pages, mapped as QEMU does (spec vfio-user.md §5.7)."""
    length = 4 * HUGE
    ram = huge_page_ram
    before = open_fds()
    whole = mmap.mmap(ram, length, mmap.MAP_SHARED)  # hugetlbfs has no write()
    whole[:] = position_pattern(length)
    async with await vgpud.connect() as client:
        for offset, size in Q35_WINDOWS:
            await client.dma_map(offset, size, fd=ram, offset=offset)
        for entry in client_table(vgpud):
            assert isinstance(entry, DmaMapping)
            memory_view = entry.region().memory
            assert memory_view is not None
            assert len(memory_view) == entry.size
            start = entry.file_offset
            assert bytes(memory_view) == whole[start : start + entry.size]
            memory_view.release()
        await client.dma_unmap(0, 0, flags=2)
    await vgpud.idle()
    whole.close()
    assert open_fds() == before


def client_table(vgpud: Daemon) -> list[object]:
    session = vgpud.server.current_session
    assert session is not None
    return list(session.dma.mappings())


@pytest.mark.parametrize(("region", "length"), [(BAR4, USEMEM_LENGTH), (BAR2, RESMEM_LENGTH)])
async def test_region_fd_shows_the_same_bytes_as_region_read(
    vgpud: Daemon, region: int, length: int
) -> None:
    async with await vgpud.connect() as client:
        await enable_memory(client)
        got = await client.region_info(region)
        assert got.fd is not None
        assert got.info.flags & 0x4  # MMAP
        sparse = [cap for cap in got.info.caps if isinstance(cap, p.SparseMmapCap)]
        assert sparse[0].areas == ((0, length),)
        view = mmap.mmap(got.fd, length, mmap.MAP_SHARED, offset=got.info.offset)
        os.close(got.fd)
        try:
            view[0x1000:0x1008] = b"from-mm!"
            assert await client.region_read(region, 0x1000, 8) == b"from-mm!"
            await client.region_write(region, length - 8, b"from-rw!")
            assert view[length - 8 : length] == b"from-rw!"
        finally:
            view.close()
    backing = vgpud.backing_dir / ("usemem" if region == BAR4 else "resmem")
    with backing.open("rb") as handle:
        handle.seek(0x1000)
        assert handle.read(8) == b"from-mm!"


async def test_bar4_tail_reads_ff_and_drops_writes(vgpud: Daemon) -> None:
    async with await vgpud.connect() as client:
        await enable_memory(client)
        tail = USEMEM_LENGTH + 0x100
        await client.region_write(BAR4, tail, b"\x12\x34\x56\x78")
        assert await client.region_read(BAR4, tail, 4) == b"\xff" * 4
        # Straddling the end of memory: the real half stores, the tail half reads 0xFF.
        await client.region_write(BAR4, USEMEM_LENGTH - 4, b"ABCDEFGH")
        assert await client.region_read(BAR4, USEMEM_LENGTH - 4, 8) == b"ABCD" + b"\xff" * 4
        with pytest.raises(VfioUserError) as info:
            await client.region_read(BAR4, USEMEM_BAR_SIZE - 4, 8)  # past bar_size
        assert info.value.errno == errno.EINVAL


async def test_doorbell_signals_the_msix_eventfd(vgpud: Daemon) -> None:
    efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    try:
        async with await vgpud.connect() as client:
            control = await client.region_read(CONFIG, MSIX_CAP + 2, 2)
            enabled = struct.unpack("<H", control)[0] | 0x8000
            await client.region_write(CONFIG, MSIX_CAP + 2, struct.pack("<H", enabled))
            await client.set_irqs(MSIX_IRQ, SET_IRQS_EVENTFD_TRIGGER, 3, 1, [efd])
            await client.region_write(BAR0, DOORBELL, struct.pack("<I", 3))
            with trio.fail_after(5):
                await trio.lowlevel.wait_readable(efd)
            assert os.eventfd_read(efd) == 1
            await client.set_irqs(MSIX_IRQ, SET_IRQS_NONE_TRIGGER, 0, 0)
    finally:
        os.close(efd)


async def test_a_blocking_eventfd_at_its_limit_cannot_block_the_daemon(vgpud: Daemon) -> None:
    """A hostile VMM's eventfd: blocking, counter at its maximum, so a plain write would
    block the event loop (every device) forever. The daemon makes it non-blocking first."""
    efd = os.eventfd(0, os.EFD_CLOEXEC)
    try:
        os.eventfd_write(efd, 0xFFFF_FFFF_FFFF_FFFE)
        async with await vgpud.connect() as client:
            control = struct.unpack("<H", await client.region_read(CONFIG, MSIX_CAP + 2, 2))[0]
            await client.region_write(CONFIG, MSIX_CAP + 2, struct.pack("<H", control | 0x8000))
            await client.set_irqs(MSIX_IRQ, SET_IRQS_EVENTFD_TRIGGER, 3, 1, [efd])
            assert not os.get_blocking(efd)  # the open file description is shared
            await client.region_write(BAR0, DOORBELL, struct.pack("<I", 3))  # answered
            # The counter was already non-zero, so that interrupt was pending anyway; once
            # the VMM drains it, the next one arrives.
            assert os.eventfd_read(efd) == 0xFFFF_FFFF_FFFF_FFFE
            await client.region_write(BAR0, DOORBELL, struct.pack("<I", 3))
            with trio.fail_after(5):
                await trio.lowlevel.wait_readable(efd)
            assert os.eventfd_read(efd) == 1
    finally:
        os.close(efd)


# write(2)'s number, to see the daemon's thread blocked in it (/proc/<tid>/syscall).
_WRITE_SYSCALL = {"x86_64": 1, "aarch64": 64}


def _blocked_writing(tid: int, efd: int) -> bool:
    """Whether thread ``tid`` of this process sits in write(2) on (a copy of) eventfd ``efd``."""
    try:
        fields = Path(f"/proc/self/task/{tid}/syscall").read_text().split()
    except OSError:
        return False
    if not fields or fields[0] != str(_WRITE_SYSCALL.get(os.uname().machine)):
        return False
    fd = int(fields[1], 16)
    return fd != efd and same_eventfd(fd, efd)


async def test_an_eventfd_made_blocking_again_cannot_block_the_daemon(vgpud: Daemon) -> None:
    """The open file description of an eventfd is the VMM's too: after SET_IRQS made it
    non-blocking, a hostile VMM clears O_NONBLOCK again and fills the counter. A plain write
    would then block the event loop, and with it every device of the daemon, for as long as
    the VMM likes. A watchdog thread rescues the daemon (drains the counter) once it sees it
    blocked in that write, so the test fails instead of hanging."""
    efd = os.eventfd(0, os.EFD_CLOEXEC)
    main = threading.get_native_id()
    done = threading.Event()
    rescued: list[bool] = []

    def watchdog() -> None:
        while not done.wait(0.01):  # polls the daemon's state: not a timing assumption
            if _blocked_writing(main, efd):
                rescued.append(True)
                os.eventfd_read(efd)

    thread = threading.Thread(target=watchdog, daemon=True)
    thread.start()
    try:
        async with await vgpud.connect() as client:
            control = struct.unpack("<H", await client.region_read(CONFIG, MSIX_CAP + 2, 2))[0]
            await client.region_write(CONFIG, MSIX_CAP + 2, struct.pack("<H", control | 0x8000))
            await client.set_irqs(MSIX_IRQ, SET_IRQS_EVENTFD_TRIGGER, 3, 1, [efd])
            os.set_blocking(efd, True)  # the daemon's copy shares the file description
            os.eventfd_write(efd, 0xFFFF_FFFF_FFFF_FFFE)
            await client.region_write(BAR0, DOORBELL, struct.pack("<I", 3))  # answered
            # The counter was full, so that interrupt was pending anyway; once the VMM
            # drains it, the next one arrives.
            if not rescued:
                assert os.eventfd_read(efd) == 0xFFFF_FFFF_FFFF_FFFE
            os.set_blocking(efd, False)
            await client.region_write(BAR0, DOORBELL, struct.pack("<I", 3))
            with trio.fail_after(5):
                await trio.lowlevel.wait_readable(efd)
            assert os.eventfd_read(efd) >= 1
    finally:
        done.set()
        thread.join()
        os.close(efd)
    assert not rescued, "the daemon blocked writing the VMM's eventfd"


async def test_a_vmm_that_wins_the_race_for_the_flag_holds_the_daemon_up_briefly(
    vgpud: Daemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The VMM clears O_NONBLOCK again right after the daemon's check and before its write,
    with the counter full (a VMM toggling the flag in a loop wins that moment now and then;
    here it wins every time). The write blocks, and the stall breaker gets the daemon out:
    the request is answered. Without the breaker the test fails on its timeout."""
    efd = os.eventfd(0, os.EFD_CLOEXEC)
    real_fcntl = fcntl.fcntl

    def vmm_wins(fd: int, command: int, arg: int = 0) -> int:
        result = real_fcntl(fd, command, arg)
        if command == fcntl.F_GETFL and same_eventfd(fd, efd):
            os.set_blocking(efd, True)  # the VMM, between the check and the write
            result |= os.O_NONBLOCK  # what the check saw
        return result

    try:
        async with await vgpud.connect() as client:
            control = struct.unpack("<H", await client.region_read(CONFIG, MSIX_CAP + 2, 2))[0]
            await client.region_write(CONFIG, MSIX_CAP + 2, struct.pack("<H", control | 0x8000))
            await client.set_irqs(MSIX_IRQ, SET_IRQS_EVENTFD_TRIGGER, 3, 1, [efd])
            os.eventfd_write(efd, 0xFFFF_FFFF_FFFF_FFFE)
            drained = BREAKER.drained
            monkeypatch.setattr(fcntl, "fcntl", vmm_wins)
            await client.region_write(BAR0, DOORBELL, struct.pack("<I", 3))  # answered
            monkeypatch.undo()
            assert BREAKER.drained == drained + 1
            os.set_blocking(efd, False)
            assert os.eventfd_read(efd) == 1  # the interrupt the daemon wrote is pending
    finally:
        os.close(efd)


async def test_a_refused_request_is_logged_with_the_errno_the_vmm_got(vgpud: Daemon) -> None:
    """docs/operations.md: ``--log-level debug`` adds refused requests with their errno, so
    a VMM's "SET_IRQS: Invalid argument" can be found in the daemon's log."""
    read_end, write_end = os.pipe()
    try:
        with structlog.testing.capture_logs() as logs:
            async with await vgpud.connect() as client:
                with pytest.raises(VfioUserError) as refused:
                    await client.set_irqs(MSIX_IRQ, SET_IRQS_EVENTFD_TRIGGER, 0, 1, [read_end])
    finally:
        os.close(read_end)
        os.close(write_end)
    assert refused.value.errno == errno.EINVAL
    (entry,) = [e for e in logs if e["event"] == "request refused"]
    assert entry["log_level"] == "debug"
    assert (entry["command"], entry["errno"]) == ("DEVICE_SET_IRQS", errno.EINVAL)
    assert "not an eventfd" in entry["error"]


async def test_reset_clears_emulated_bars_and_keeps_memory(vgpud: Daemon) -> None:
    async with await vgpud.connect() as client:
        await enable_memory(client)
        await client.region_write(BAR4, 0, b"keep me!")
        await client.region_write(CONFIG, 0x20, struct.pack("<I", 0xFFFFFFFF))
        sized = struct.unpack("<I", await client.region_read(CONFIG, 0x20, 4))[0]
        assert sized == (0xFFFFFFFF & ~(USEMEM_BAR_SIZE - 1)) | 0xC
        await client.reset()
        assert struct.unpack("<I", await client.region_read(CONFIG, 0x20, 4))[0] == 0xC
        await enable_memory(client)
        assert await client.region_read(BAR4, 0, 8) == b"keep me!"


async def test_a_reset_flood_is_logged_within_the_device_rate_limit(vgpud: Daemon) -> None:
    """A VMM can send DEVICE_RESET back to back; the "device reset" lines stay within the
    device's limit (vgpud/log_limit.py), which a reconnecting client does not refill."""
    logs, limit = await reset_flood(vgpud.connect, vgpud.idle)
    resets = [e for e in logs if e["event"] == "device reset"]
    assert BURST <= len(resets) <= limit, (len(resets), limit)


async def test_a_connection_loop_is_logged_within_the_device_rate_limit(vgpud: Daemon) -> None:
    """A process looping on connect -- whole sessions, or refused second clients -- wrote
    a line or three per connection; they share the device's limits (vgpud/log_limit.py)."""
    start = trio.current_time()
    with structlog.testing.capture_logs() as logs:
        for _ in range(60):
            async with await vgpud.connect():
                pass
            await vgpud.idle()
        async with await vgpud.connect():
            for _ in range(60):
                with pytest.raises(VfioUserError, match="Device or resource busy"):
                    await vgpud.connect()
    limit = BURST + PER_SECOND * (trio.current_time() - start) + 1
    for event in (
        "client connected",
        "negotiated",
        "client disconnected",
        "refusing a second client: the device already has one",
    ):
        count = sum(e["event"] == event for e in logs)
        assert BURST <= count <= limit, (event, count, limit)


async def test_reconnect_keeps_device_memory(vgpud: Daemon) -> None:
    async with await vgpud.connect() as client:
        await enable_memory(client)
        await client.region_write(BAR2, 0x40, b"persist!")
    await vgpud.idle()
    async with await vgpud.connect() as client:
        await enable_memory(client)
        assert await client.region_read(BAR2, 0x40, 8) == b"persist!"


async def test_second_client_is_refused_first_unaffected(vgpud: Daemon) -> None:
    async with await vgpud.connect() as first:
        with pytest.raises(VfioUserError, match="VERSION failed: Device or resource busy"):
            await vgpud.connect()
        info = await first.device_info()
        assert info.num_regions == 9
    await vgpud.idle()
    async with await vgpud.connect() as again:
        assert (await again.device_info()).num_irqs == 5


async def test_restart_keeps_device_memory(tmp_path: Path) -> None:
    for round_ in range(2):
        async with trio.open_nursery() as nursery:
            daemon = await start_daemon(nursery, tmp_path)
            async with await daemon.connect() as client:
                await enable_memory(client)
                if round_ == 0:
                    await client.region_write(BAR4, 0x2000, b"survives")
                else:
                    assert await client.region_read(BAR4, 0x2000, 8) == b"survives"
            nursery.cancel_scope.cancel()
        assert not (tmp_path / "gpu0.sock").exists()  # socket removed on stop


async def test_live_socket_is_not_stolen(vgpud: Daemon, tmp_path: Path) -> None:
    with pytest.raises(ListenerError, match="in use: another vgpud holds"):
        bind_unix_listener(vgpud.socket_path)
    assert vgpud.socket_path.exists()
    # The check connected (and left at once); let the daemon see that before we attach.
    await trio.testing.wait_all_tasks_blocked()
    await vgpud.idle()
    async with await vgpud.connect() as client:
        assert (await client.device_info()).num_regions == 9


async def test_socket_is_owner_only(vgpud: Daemon) -> None:
    assert vgpud.socket_path.stat().st_mode & 0o777 == 0o600


INTX_IRQ = 0
INTX_STATUS = 0xFF0004
SET_IRQS_EVENTFD_UNMASK = 0x4 | 0x10


def _signalled(fd: int) -> bool:
    try:
        return os.eventfd_read(fd) > 0
    except BlockingIOError:
        return False


async def test_intx_resample_eventfd_unmasks_like_kvm(vgpud: Daemon) -> None:
    """KVM's irqfd INTx: trigger fd + resample fd that KVM signals on the guest's EOI."""
    trigger = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    resample = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    before = open_fds()
    try:
        async with await vgpud.connect() as client:
            await client.set_irqs(INTX_IRQ, SET_IRQS_EVENTFD_TRIGGER, 0, 1, [trigger])
            await client.set_irqs(INTX_IRQ, SET_IRQS_EVENTFD_UNMASK, 0, 1, [resample])
            # No MSI/MSI-X enabled: the doorbell asserts INTx, which signals and automasks.
            await client.region_write(BAR0, DOORBELL, struct.pack("<I", 0))
            with trio.fail_after(5):
                await trio.lowlevel.wait_readable(trigger)
            assert _signalled(trigger)
            # EOI while the device still asserts the line: KVM resamples, the device
            # unmasks and interrupts again.
            os.eventfd_write(resample, 1)
            with trio.fail_after(5):
                await trio.lowlevel.wait_readable(trigger)
            assert _signalled(trigger)
            # The driver acknowledges (line drops), then EOI: no new interrupt, and the
            # resample signal was consumed by the device.
            await client.region_write(BAR0, INTX_STATUS, struct.pack("<I", 1))
            os.eventfd_write(resample, 1)
            await client.device_info()  # a round trip, then let the watcher run
            await trio.testing.wait_all_tasks_blocked()
            assert not _signalled(trigger)
            assert not _signalled(resample)
        await vgpud.idle()
        # The device closed its dups of both eventfds when the client left.
        assert open_fds() == before
    finally:
        os.close(trigger)
        os.close(resample)


async def test_memory_file_on_descriptor_0_is_sent(
    vgpud: Daemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A daemon started with stdin closed can hold a memory file on fd 0, which is falsy."""
    device = vgpud.server.device
    region_info = device.region_info

    def on_fd_0(index: int) -> RegionInfo:
        info = region_info(index)
        return dataclasses.replace(info, mmap=MmapTarget(0, 0)) if index == BAR4 else info

    monkeypatch.setattr(device, "region_info", on_fd_0)
    memory = os.memfd_create("memory-on-fd-0", os.MFD_CLOEXEC)
    saved_stdin = os.dup(0)
    os.dup2(memory, 0, inheritable=False)
    try:
        async with await vgpud.connect() as client:
            got = await client.region_info(BAR4)
            assert got.info.flags & 0x4, "MMAP advertised"
            assert got.fd is not None, "MMAP advertised but no fd sent"
            try:
                assert os.fstat(got.fd).st_ino == os.fstat(memory).st_ino
            finally:
                os.close(got.fd)
    finally:
        os.dup2(saved_stdin, 0)
        os.close(saved_stdin)
        os.close(memory)


async def test_no_mmap_serves_bars_trapped(tmp_path: Path) -> None:
    socket_path = tmp_path / "trapped.sock"
    device = single_device(
        socket_path=socket_path, memory_size="4GiB", backing_dir=tmp_path / "m", no_mmap=True
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(functools.partial(daemon.run, DaemonConfig(devices=(device,))))
        async with await VfioUserClient.connect(socket_path) as client:
            for region in (BAR2, BAR4):
                got = await client.region_info(region)
                assert got.fd is None and not got.info.flags & 0x4 and not got.info.caps
            await enable_memory(client)
            await client.region_write(BAR4, 0x10, b"trapped!")
            assert await client.region_read(BAR4, 0x10, 8) == b"trapped!"
        nursery.cancel_scope.cancel()


async def test_client_taking_no_fds_gets_bars_trapped(vgpud: Daemon) -> None:
    """A client that cannot receive fds (max_msg_fds 0) cannot mmap: the BARs are trapped."""
    caps = dataclasses.replace(CLIENT_CAPABILITIES, max_msg_fds=0)
    async with await VfioUserClient.connect(vgpud.socket_path, caps) as client:
        for region in (BAR2, BAR4):
            # An fd would arrive truncated (MSG_CTRUNC) and break the client's stream.
            got = await client.region_info(region, argsz=256)
            assert got.fd is None and not got.info.flags & 0x4 and not got.info.caps
        await enable_memory(client)
        await client.region_write(BAR4, 0x10, b"trapped!")
        assert await client.region_read(BAR4, 0x10, 8) == b"trapped!"
    assert vgpud.server.internal_errors == 0


async def served_on(sock: socket.socket) -> None:
    """Negotiate on ``sock``, an already connected socket, and be served."""
    with trio.fail_after(10):
        async with VfioUserClient(
            FdStream.from_trio(trio.socket.from_stdlib_socket(sock)), CLIENT_CAPABILITIES
        ) as client:
            await client.request(p.Version(major=0, minor=0, capabilities=CLIENT_CAPABILITIES))
            assert (await client.device_info()).num_regions == 9


async def test_a_client_reconnecting_at_once_is_served_not_refused(vgpud: Daemon) -> None:
    """The old connection is closed and the new one made before the daemon runs again: its
    session has not read the EOF yet, but the client has left, so the new one is served."""
    for _ in range(10):  # trio runs the two wake-ups in either order; try both
        old = await vgpud.connect()
        await old.device_info()
        old.close()
        new = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        new.connect(str(vgpud.socket_path))  # no checkpoint since the close
        await served_on(new)
        await vgpud.idle()


async def test_a_client_that_left_before_its_session_began_holds_nothing(vgpud: Daemon) -> None:
    """A connection made and closed at once (a liveness probe), then the VMM: both are
    queued before the daemon runs, so the first one's session has not even started when
    the second is accepted. The second is served; the first never held the device."""
    before = open_fds()
    for _ in range(20):  # trio orders the accepts and the session's start either way
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.connect(str(vgpud.socket_path))
        probe.close()
        vmm = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        vmm.connect(str(vgpud.socket_path))  # no checkpoint since the probe's connect
        await served_on(vmm)
        await vgpud.idle()
    assert open_fds() == before


async def test_a_waiting_client_that_leaves_gives_up_its_turn(vgpud: Daemon) -> None:
    """The one client allowed to wait for a departed client's session (see the stuck-session
    test below) leaves before its turn: the next client waits in its place, is served once
    the session ends, and the one that left is closed."""
    before = open_fds()
    old = await vgpud.connect()
    await enable_memory(old)
    read = struct.pack("<QII", 0, BAR4, 1 << 20)
    header = struct.pack("<HHIII", 50, 9, 16 + len(read), 0, 0)
    await old.stream.send((header + read) * 4)  # 4 MiB of replies: the session is stuck
    old.stream.socket.shutdown(socket.SHUT_WR)
    with structlog.testing.capture_logs() as logs:
        left = await RawConn.open(vgpud.socket_path, negotiate=False)
        await trio.testing.wait_all_tasks_blocked()  # the daemon has taken it: it waits
        assert logs[-1]["event"] == "client waits for the departed client's session to end"
        left.close()
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(functools.partial(_close_later, old, logs, 3))
                async with await vgpud.connect() as client:
                    assert (await client.device_info()).num_regions == 9
    events = [(e.get("connection"), e["event"]) for e in logs if e["event"] != "client connected"]
    assert events[:3] == [
        (2, "client waits for the departed client's session to end"),
        (2, "waiting client left before its turn"),
        (3, "client waits for the departed client's session to end"),
    ]
    assert not any("refusing" in event for _, event in events)
    await vgpud.idle()
    assert open_fds() == before


async def _close_later(
    client: VfioUserClient, logs: Sequence[Mapping[str, Any]], waiter: int
) -> None:
    """Close ``client`` (ending its stuck session) once connection ``waiter`` waits."""
    await trio.testing.wait_all_tasks_blocked()  # the new client awaits its VERSION reply
    assert (logs[-1]["connection"], logs[-1]["event"]) == (
        waiter,
        "client waits for the departed client's session to end",
    )
    client.close()


@pytest.mark.parametrize("sent", [b"", QEMU_VERSION[:8]], ids=["nothing", "half a header"])
async def test_a_client_that_never_negotiates_is_cut_off(
    vgpud: Daemon, monkeypatch: pytest.MonkeyPatch, sent: bytes
) -> None:
    """One client at a time: a client that connects and never negotiates would keep the VM
    the device is meant for refused. It has NEGOTIATION_TIMEOUT to get its VERSION reply."""
    monkeypatch.setattr(session_module, "NEGOTIATION_TIMEOUT", 0.3)
    before = open_fds()
    with structlog.testing.capture_logs() as logs:
        silent = await RawConn.open(vgpud.socket_path, negotiate=False)
        try:
            await silent.send(sent)
            with pytest.raises(VfioUserError, match="Device or resource busy"):
                await vgpud.connect()  # while it holds the device
            with trio.fail_after(10):
                assert await silent.receive() is None
        finally:
            silent.close()
        await vgpud.idle()
    cut = [entry for entry in logs if entry["event"] == "client did not negotiate in time, closing"]
    assert len(cut) == 1 and cut[0]["connection"] == 1
    assert open_fds() == before
    async with await vgpud.connect() as client:
        assert (await client.device_info()).num_regions == 9


async def test_a_negotiated_client_may_stay_idle(
    vgpud: Daemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(session_module, "NEGOTIATION_TIMEOUT", 0.2)
    async with await vgpud.connect() as client:
        await trio.sleep(0.6)  # idle three times the limit: the point of the test, not a wait
        assert (await client.device_info()).num_regions == 9


async def test_a_second_client_is_still_refused_while_the_first_is_there(vgpud: Daemon) -> None:
    async with await vgpud.connect() as first:
        with pytest.raises(VfioUserError, match="VERSION failed: Device or resource busy"):
            await vgpud.connect()
        assert (await first.device_info()).num_regions == 9


async def test_a_client_waiting_for_a_stuck_session_is_refused_in_the_end(
    vgpud: Daemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A half-closed client (POLLRDHUP) whose session is stuck sending it replies it does not
    read: the next client waits HANDOVER_TIMEOUT for that session, then is refused."""
    monkeypatch.setattr(listener_module, "HANDOVER_TIMEOUT", 0.2)
    old = await vgpud.connect()
    await enable_memory(old)
    read = struct.pack("<QII", 0, BAR4, 1 << 20)
    header = struct.pack("<HHIII", 50, 9, 16 + len(read), 0, 0)
    await old.stream.send((header + read) * 4)  # 4 MiB of replies: more than the socket holds
    old.stream.socket.shutdown(socket.SHUT_WR)
    try:
        with (
            trio.fail_after(10),
            structlog.testing.capture_logs() as logs,
            pytest.raises(VfioUserError, match="VERSION failed: Device or resource busy"),
        ):
            await vgpud.connect()
    finally:
        old.close()
    events = [entry["event"] for entry in logs if entry.get("connection") == 2]
    assert events == [
        "client waits for the departed client's session to end",
        "refusing a second client: the device already has one",
    ]
    await vgpud.idle()
    async with await vgpud.connect() as client:
        assert (await client.device_info()).num_regions == 9


async def test_truncated_region_info_reply_carries_no_fd(vgpud: Daemon) -> None:
    async with await vgpud.connect() as client:
        reply = await client.request(p.RegionInfoRequest(argsz=32, index=BAR4))
        fds = list(reply.fds)
        close_fds(fds)
        assert isinstance(reply.message, p.RegionInfo) and reply.message.argsz > 32
        assert fds == []  # spec vfio-user.md R7: the fd comes with the full reply only


async def test_set_irqs_eventfd_without_fds_deassigns(vgpud: Daemon) -> None:
    gpu = vgpud.server.device.backend  # type: ignore[attr-defined]
    trigger = os.eventfd(0, os.EFD_CLOEXEC)
    try:
        async with await vgpud.connect() as client:
            await client.set_irqs(MSIX_IRQ, SET_IRQS_EVENTFD_TRIGGER, 0, 1, [trigger])
            assert gpu.irqs.eventfd(MSIX_IRQ, 0) >= 0
            await client.set_irqs(MSIX_IRQ, SET_IRQS_EVENTFD_TRIGGER, 0, 1)  # no fds
            assert gpu.irqs.eventfd(MSIX_IRQ, 0) == -1
    finally:
        os.close(trigger)


class _RefusesDma(SyntheticGpu):
    def dma_map(self, region: object) -> None:
        raise DeviceError(errno.ENOMEM, "no room for this mapping")


@asynccontextmanager
async def _served(
    tmp_path: Path, device: SyntheticGpu, caps: p.Capabilities
) -> AsyncIterator[DeviceServer]:
    """``device`` served on tmp_path/s.sock with ``caps`` until the block ends."""
    listener, claim = bind_unix_listener(tmp_path / "s.sock")
    server = DeviceServer("gpu0", device, listener, capabilities=caps)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(server.serve)
            yield server
            nursery.cancel_scope.cancel()
    finally:
        listener.close()
        claim.release()
        device.shutdown()


async def test_dma_table_keeps_the_servers_max_dma_maps(tmp_path: Path) -> None:
    device = SyntheticGpu(get_profile("gh200").with_overrides(memory_size=0), tmp_path / "m")
    caps = p.Capabilities(max_msg_fds=16, max_data_xfer_size=1 << 20, pgsizes=4096, max_dma_maps=1)
    async with (
        _served(tmp_path, device, caps),
        await VfioUserClient.connect(tmp_path / "s.sock") as client,  # it offers 65535
    ):
        await client.dma_map(0x100000, 0x1000)
        with pytest.raises(VfioUserError) as info:
            await client.dma_map(0x200000, 0x1000)
        assert info.value.errno == errno.ENOSPC


async def test_dma_map_refused_by_the_device_leaves_no_entry(tmp_path: Path) -> None:
    device = _RefusesDma(get_profile("gh200").with_overrides(memory_size=0), tmp_path / "m")
    async with (
        _served(tmp_path, device, SERVER_CAPABILITIES) as server,
        await VfioUserClient.connect(tmp_path / "s.sock") as client,
    ):
        with pytest.raises(VfioUserError) as info:
            await client.dma_map(0x100000, 0x1000)
        assert info.value.errno == errno.ENOMEM
        assert server.current_session is not None
        assert len(server.current_session.dma) == 0


async def test_an_empty_access_inside_a_region_succeeds(vgpud: Daemon) -> None:
    async with await vgpud.connect() as client:
        assert await client.region_read(CONFIG, 0x10, 0) == b""
        await client.region_write(BAR0, 0, b"")


def test_a_socket_that_cannot_get_its_group_is_not_left_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without CAP_CHOWN, giving the socket its group fails: the socket file goes too."""

    def refuse(*_: object) -> None:
        raise PermissionError(errno.EPERM, os.strerror(errno.EPERM))

    monkeypatch.setattr(os, "chown", refuse)
    with pytest.raises(ListenerError, match="Operation not permitted"):
        bind_unix_listener(tmp_path / "gpu0.sock", 0o660, "0")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("reply", [False, True], ids=["posted", "reply asked for"])
async def test_write_multi_entries_apply_like_posted_writes(vgpud: Daemon, reply: bool) -> None:
    """Spec vfio-user.md §3.11: each entry as an individual posted write, in order. QEMU
    coalesces small posted writes into one when its queue is long (even unadvertised, with
    x-send-queued, §9): an entry the device refuses must cost that write only, as it would
    have uncoalesced, not every write queued after it. A reply, if asked for, says it failed."""
    scratch = p.WriteMultiEntry(SCRATCH, BAR0, 4, struct.pack("<I", 1))
    outside = p.WriteMultiEntry(1 << 40, BAR0, 4, bytes(4))  # past BAR0's end
    last = p.WriteMultiEntry(SCRATCH + 4, BAR0, 4, struct.pack("<I", 3))
    message = p.RegionWriteMulti((scratch, outside, last))
    async with await vgpud.connect() as client:
        await client.region_write(BAR0, SCRATCH + 4, bytes(4))
        if reply:
            with pytest.raises(VfioUserError) as refused:
                await client.request(message)
            assert refused.value.errno == errno.EINVAL
        else:
            await client.send(message, no_reply=True)
        assert await client.region_read(BAR0, SCRATCH, 8) == struct.pack("<II", 1, 3)
