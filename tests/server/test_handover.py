"""The pieces of a live upgrade (vgpud/upgrade.py), in-process: a session that freezes only
between messages, and a connection, DMA table and device that another process could carry
on from what they describe. (tests/daemon/test_upgrade.py runs the whole exec.)"""

from __future__ import annotations

import errno
import os
import socket
import struct
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import structlog
import trio
import trio.testing

import protocol as p
from backends.device import INTX_IRQ_INDEX, MSIX_IRQ_INDEX, DeviceError, IrqAction
from backends.synthetic.bar0 import DOORBELL, SCRATCH
from tests.server.conftest import Daemon
from tests.server.rawclient import HEADER, QEMU_VERSION
from vgpud.config import single_device
from vgpud.devices import BuiltDevice, build_device
from vgpud.server.dma import DmaError, DmaTable
from vgpud.server.listener import SERVER_CAPABILITIES, DeviceServer
from vgpud.server.session import Session
from vgpud.server.transport import FdStream

BAR0, CONFIG, BAR4_REGISTER, MSIX_FLAGS = 0, 7, 0x20, 0xA0 + 2
PAGE = 4096


@pytest.fixture
def built(tmp_path: Path) -> Iterator[BuiltDevice]:
    device = build_device(
        single_device(socket_path=None, memory_size="2GiB", backing_dir=tmp_path / "a")
    )
    yield device
    device.release()


def scratch_read(msg_id: int) -> bytes:
    body = struct.pack("<QII", SCRATCH, BAR0, 4)
    return HEADER.pack(msg_id, p.Command.REGION_READ, p.HEADER_SIZE + len(body), 0, 0) + body


@asynccontextmanager
async def session_on(built: BuiltDevice) -> AsyncIterator[tuple[Session, socket.socket]]:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    session = Session(
        FdStream(ours), built.device, SERVER_CAPABILITIES, structlog.get_logger("test")
    )
    async with trio.open_nursery() as nursery:
        nursery.start_soon(session.run)
        theirs.setblocking(False)
        theirs.send(QEMU_VERSION)
        await receive(theirs)
        yield session, theirs
        theirs.close()
    ours.close()


async def receive(sock: socket.socket) -> bytes:
    with trio.fail_after(5):
        await trio.lowlevel.wait_readable(sock)
    return sock.recv(65536)


async def test_a_frozen_session_rests_only_between_messages(built: BuiltDevice) -> None:
    async with session_on(built) as (session, client):
        session.freeze()
        await session.wait_at_rest()  # parked, waiting for the next message
        request = scratch_read(7)
        client.send(request[:20])  # the header and a bit of the body
        await trio.testing.wait_all_tasks_blocked()
        assert not session.at_rest
        client.send(request[20:])
        await session.wait_at_rest()  # that message is served first ...
        assert HEADER.unpack((await receive(client))[: p.HEADER_SIZE])[0] == 7
        client.send(scratch_read(8))  # ... the next waits for the thaw
        await trio.testing.wait_all_tasks_blocked()
        assert session.at_rest
        with pytest.raises(BlockingIOError):
            client.recv(1)
        session.thaw()
        assert HEADER.unpack((await receive(client))[: p.HEADER_SIZE])[0] == 8


async def test_a_session_at_rest_is_carried_on_by_another(
    built: BuiltDevice, tmp_path: Path
) -> None:
    ram = os.memfd_create("guest-ram", os.MFD_CLOEXEC)
    os.ftruncate(ram, 2 * PAGE)
    async with session_on(built) as (session, client):
        map_body = struct.pack("<IIQQQ", 32, 3, 0, 0x4000, 2 * PAGE)
        header = HEADER.pack(2, p.Command.DMA_MAP, p.HEADER_SIZE + 32, 0, 0)
        socket.send_fds(client, [header + map_body], [ram])
        assert HEADER.unpack((await receive(client))[: p.HEADER_SIZE])[4] == 0  # no error
        session.freeze()
        await session.wait_at_rest()
        handed, fds = session.handover()
        # The DMA fd is the table's; the next session (as the next process would, finding
        # it open after exec: here a copy, as this session closes its own) maps it again.
        assert len(fds) == 1
        handed["dma"][0]["fd"] = os.dup(fds[0])
    json_safe: dict[str, Any] = handed
    ours, theirs = socket.socketpair()
    try:
        resumed = Session(
            FdStream(ours),
            built.device,
            SERVER_CAPABILITIES,
            structlog.get_logger("test"),
            handed=json_safe,
        )
        assert resumed.conn.state is p.State.READY
        assert [m.iova for m in resumed.dma.mappings()] == [0x4000]
        assert resumed.messages == session.messages
        for mapping in resumed.dma.unmap_all():
            assert mapping.fd is None  # released
    finally:
        ours.close()
        theirs.close()
        os.close(ram)


def test_a_connection_is_handed_over_only_between_messages() -> None:
    conn = p.ServerConnection(SERVER_CAPABILITIES)
    conn.receive_data(QEMU_VERSION[:10])
    with pytest.raises(p.LocalProtocolError):
        conn.handover()  # half a header read
    conn.receive_data(QEMU_VERSION[10:])
    event = conn.next_event()
    assert isinstance(event, p.Request)
    with pytest.raises(p.LocalProtocolError):
        conn.handover()  # the VERSION reply is owed
    conn.version_reply(event)
    carried = p.ServerConnection.taken_over(conn.handover())
    assert carried.state is p.State.READY
    assert carried.negotiated == conn.negotiated
    assert carried.capabilities == conn.capabilities


@pytest.mark.parametrize(
    "handed",
    [
        {},
        {"state": "ready", "capabilities": {}, "negotiated": None},  # READY, yet no peer
        {"state": "broken", "capabilities": {}, "negotiated": None},
        {"state": "awaiting-version", "capabilities": {"max_msg_fds": "x"}, "negotiated": None},
    ],
)
def test_a_connection_description_that_is_not_one_is_refused(handed: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="connection state unusable"):
        p.ServerConnection.taken_over(handed)


def test_adopting_dma_takes_every_named_fd_whatever_happens() -> None:
    fds = []
    for _ in range(3):
        fd = os.memfd_create("guest-ram", os.MFD_CLOEXEC)
        os.ftruncate(fd, PAGE)
        fds.append(fd)
    entries: list[dict[str, Any]] = [
        {"iova": 0, "size": PAGE, "readable": True, "writable": True, "file_offset": 0}
    ] * 3
    entries = [dict(entry, fd=fd) for entry, fd in zip(entries, fds, strict=True)]
    table = DmaTable(10)
    with pytest.raises(DmaError):  # the second overlaps the first
        table.adopt(entries)
    assert len(table) == 1
    table.unmap_all()
    for fd in fds:
        with pytest.raises(OSError):
            os.fstat(fd)  # closed: by the table, by map() refusing it, by adopt()


def test_a_device_carries_on_from_another_ones_state(built: BuiltDevice, tmp_path: Path) -> None:
    device = built.device
    device.region_write(BAR0, SCRATCH, struct.pack("<I", 0xC0FFEE))
    device.region_write(CONFIG, BAR4_REGISTER, struct.pack("<I", 0xFFFF_FFFF))
    sized = device.region_read(CONFIG, BAR4_REGISTER, 4)
    flags = struct.unpack("<H", device.region_read(CONFIG, MSIX_FLAGS, 2))[0]
    device.region_write(CONFIG, MSIX_FLAGS, struct.pack("<H", flags | 0x8000))
    efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    device.set_irqs(MSIX_IRQ_INDEX, IrqAction.TRIGGER, 3, 1, eventfds=[os.dup(efd)])
    handover = getattr(device, "handover")  # noqa: B009 (HandsOver is optional)
    state, fds = handover()
    lock = state["backend"]["directory_lock"]
    assert len(fds) == 2 and lock in fds  # the eventfd, and the backing directory's lock
    fds.remove(lock)
    # What exec would do: the next process finds the same fd open (here: a copy of it).
    state["backend"]["irqs"]["eventfds"][str(MSIX_IRQ_INDEX)][3] = os.dup(fds[0])
    other = build_device(
        single_device(socket_path=None, memory_size="2GiB", backing_dir=tmp_path / "b")
    )
    try:
        getattr(other.device, "take_over")(state)  # noqa: B009
        assert other.device.region_read(BAR0, SCRATCH, 4) == struct.pack("<I", 0xC0FFEE)
        assert other.device.region_read(CONFIG, BAR4_REGISTER, 4) == sized
        other.device.region_write(BAR0, DOORBELL, struct.pack("<I", 3))
        assert os.eventfd_read(efd) == 1
        with pytest.raises(ValueError, match="another"):
            getattr(other.device, "take_over")(dict(state, resmem_bar_val=None))  # noqa: B009
    finally:
        other.release()
        os.close(efd)


async def test_a_resumed_session_watches_the_intx_resample_eventfd(built: BuiltDevice) -> None:
    """The device carries the client's eventfds across an upgrade, the INTx resampler among
    them (KVM signals it at the guest's EOI), and the session that carries the client on
    must wait on it as the one before did: else the line stays masked after the first EOI
    and the guest never gets another INTx."""
    conn = p.ServerConnection(SERVER_CAPABILITIES)
    conn.receive_data(QEMU_VERSION)
    event = conn.next_event()
    assert isinstance(event, p.Request)
    conn.version_reply(event)
    handed = {"connection": conn.handover(), "dma": [], "messages": 1}
    device = built.device
    trigger = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    resample = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    # What the device took over from the last process: the client's INTx wiring.
    device.set_irqs(INTX_IRQ_INDEX, IrqAction.TRIGGER, 0, 1, eventfds=[os.dup(trigger)])
    device.set_irqs(INTX_IRQ_INDEX, IrqAction.UNMASK, 0, 1, eventfds=[os.dup(resample)])
    device.region_write(BAR0, DOORBELL, struct.pack("<I", 0))  # asserts INTx: signal, mask
    assert os.eventfd_read(trigger) == 1
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        resumed = Session(
            FdStream(ours), device, SERVER_CAPABILITIES, structlog.get_logger("test"), handed=handed
        )
        async with trio.open_nursery() as nursery:
            nursery.start_soon(resumed.run)
            await trio.testing.wait_all_tasks_blocked()
            os.eventfd_write(resample, 1)  # the guest's EOI, the line still asserted
            with trio.fail_after(5):
                await trio.lowlevel.wait_readable(trigger)  # unmasked, so signalled again
            assert os.eventfd_read(trigger) == 1
            theirs.close()  # the client leaves; the session ends
    finally:
        theirs.close()
        ours.close()
        os.close(trigger)
        os.close(resample)


async def test_a_frozen_device_accepts_no_client(vgpud: Daemon) -> None:
    """A VMM that reconnects while the device is frozen waits in the backlog, for the thaw
    or the next process. The accept already waiting used to take it: a waiter for the
    departed client's session, then a session half-started when the device was to rest."""
    server = vgpud.server
    departed = await vgpud.connect()
    await server.wait_at_rest()  # its session parked between messages
    server.freeze()
    await server.wait_at_rest()
    departed.close()
    with structlog.testing.capture_logs() as logs:
        async with trio.open_nursery() as nursery:
            # Connecting completes in the kernel; negotiating waits for the thaw.
            nursery.start_soon(_connect_and_read_info, vgpud)
            await trio.testing.wait_all_tasks_blocked()
            assert server.at_rest
            assert [entry["event"] for entry in logs] == ["client disconnected"]  # the EOF
            server.thaw()
    assert [entry["event"] for entry in logs][:2] == ["client disconnected", "client connected"]


async def _connect_and_read_info(vgpud: Daemon) -> None:
    async with await vgpud.connect() as client:
        assert (await client.device_info()).num_regions == 9


@pytest.mark.parametrize("bug", [False, True], ids=["refused", "bug"])
async def test_a_client_that_cannot_be_resumed_is_closed_and_lets_go_of_all_it_had(
    built: BuiltDevice, bug: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A handed session whose DMA the device fails to map again: the client is closed, the
    DMA mappings already made again and their fds are let go, and the device drops the
    client's eventfds (``close``) -- whether the device refused or vgpud met a bug, which
    used to leave both behind."""
    conn = p.ServerConnection(SERVER_CAPABILITIES)
    conn.receive_data(QEMU_VERSION)
    event = conn.next_event()
    assert isinstance(event, p.Request)
    conn.version_reply(event)
    ram = os.memfd_create("resume-refused-ram", os.MFD_CLOEXEC)
    os.ftruncate(ram, 2 * PAGE)
    dma = {"iova": 0x4000, "size": 2 * PAGE, "readable": True, "writable": True}
    session = {
        "connection": conn.handover(),
        "dma": [{**dma, "file_offset": 0, "fd": ram}],  # the session takes the fd
        "messages": 1,
    }
    device = built.device
    trigger = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    device.set_irqs(INTX_IRQ_INDEX, IrqAction.TRIGGER, 0, 1, eventfds=[os.dup(trigger)])

    def dma_map(region: object) -> None:
        # Raised afresh each time: an exception kept across tests would keep its traceback,
        # and the traceback this frame, whose region views the DMA mapping.
        if bug:
            raise RuntimeError("a bug in vgpud")
        raise DeviceError(errno.ENOMEM, "no room for the map")

    closed: list[bool] = []
    close = device.close

    def counted_close() -> None:
        closed.append(True)
        close()

    monkeypatch.setattr(device, "dma_map", dma_map)
    monkeypatch.setattr(device, "close", counted_close)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    client = {"number": 1, "fd": ours.fileno(), "session": session}
    server = DeviceServer(
        "gpu0", device, None, handed={"connections": 1, "retiring": False, "client": client}
    )
    try:
        with trio.fail_after(5):
            await server.serve_connected(ours)
        assert closed == [True]
        assert server.internal_errors == (1 if bug else 0)
        assert theirs.recv(1) == b""  # closed
        assert not [name for name in open_files() if "resume-refused-ram" in name]
    finally:
        theirs.close()
        ours.close()
        os.close(trigger)


def open_files() -> list[str]:
    """What this process's fds name (a file gone meanwhile, as listdir's own, is skipped)."""
    named = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            named.append(os.readlink(f"/proc/self/fd/{fd}"))
        except FileNotFoundError:
            continue
    return named
