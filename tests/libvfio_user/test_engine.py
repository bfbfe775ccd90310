"""The libvfio-user engine over a real socket, driven by the project's own client.

Needs a libvfio-user build: point ``VGPUD_LIBVFIO_USER`` at its ``libvfio-user.so.0``.
Without one the whole module is skipped.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import resource
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import structlog
import structlog.testing
import trio
import trio.testing

import protocol as p
from backends.device import DmaRegion
from tests.server.conftest import reset_flood
from tests.server.rawclient import HEADER, QEMU_VERSION
from vgpud.client import VfioUserClient, VfioUserError
from vgpud.config import single_device
from vgpud.devices import BuiltDevice, build_device
from vgpud.libvfio_user import EngineUnavailable, LibvfioUserServer, load_library
from vgpud.libvfio_user import engine as engine_module
from vgpud.libvfio_user.engine import serve_device
from vgpud.libvfio_user.sockets import accepted_connections
from vgpud.log_limit import BURST

try:
    LIBRARY = load_library()
except EngineUnavailable as exc:
    pytest.skip(f"libvfio-user engine tests need the library ({exc})", allow_module_level=True)

CONFIG = 7
BAR0, BAR2, BAR4 = 0, 2, 4
COMMAND_MEMORY = 0x0002
MSIX_CAP = 0xA0
DEVCTL, DEVCTL_FLR = 0x60 + 0x8, 0x8000  # PCIe capability at 0x60: Device Control, BCR_FLR
DOORBELL = 0xFF0000
SET_IRQS_EVENTFD_TRIGGER = 0x4 | 0x20
SET_IRQS_NONE_TRIGGER = 0x1 | 0x20
MSIX_IRQ = 2
REGION_WRITE = 10
VFIO_USER_F_ERROR = 0x20
HANG_GUARD = 10.0  # seconds: only an engine that never waits takes that long
# 4 GiB gh200: usemem 3 GiB in a 4 GiB BAR4 (a 1 GiB trapped tail), resmem 1 GiB in BAR2.
USEMEM_LENGTH = 3 << 30
USEMEM_BAR_SIZE = 4 << 30
RESMEM_LENGTH = 1 << 30


@dataclass
class Engine:
    socket_path: Path
    backing_dir: Path
    built: BuiltDevice
    server: LibvfioUserServer

    async def connect(self) -> VfioUserClient:
        return await VfioUserClient.connect(self.socket_path)


async def start_engine(nursery: trio.Nursery, tmp_path: Path, ready_delay: float = 0.0) -> Engine:
    socket_path = tmp_path / "gpu0.sock"
    config = single_device(
        socket_path=socket_path,
        memory_size="4GiB",
        backing_dir=tmp_path / "mem",
        ready_delay=ready_delay,
    )
    built = build_device(config)

    async def run(task_status: trio.TaskStatus[LibvfioUserServer]) -> None:
        try:
            await serve_device(built, socket_path, library=LIBRARY, task_status=task_status)
        finally:
            built.release()

    server = await nursery.start(run)
    return Engine(socket_path, tmp_path / "mem", built, server)


@pytest.fixture
async def engine(tmp_path: Path) -> AsyncIterator[Engine]:
    async with trio.open_nursery() as nursery:
        yield await start_engine(nursery, tmp_path)
        nursery.cancel_scope.cancel()


async def enable_memory(client: VfioUserClient) -> None:
    await client.region_write(CONFIG, 0x04, struct.pack("<H", COMMAND_MEMORY))


async def test_negotiation_and_device_info(engine: Engine) -> None:
    async with await engine.connect() as client:
        caps = client.server_capabilities
        assert caps is not None and caps.max_msg_fds > 0
        info = await client.device_info()
        assert (info.num_regions, info.num_irqs) == (9, 5)
        assert info.flags == 0x3  # RESET | PCI
        assert (await client.irq_info(MSIX_IRQ)).count == engine.built.device.irq_info(2).count


@pytest.mark.parametrize(("region", "length"), [(BAR4, USEMEM_LENGTH), (BAR2, RESMEM_LENGTH)])
async def test_region_fd_and_sparse_area_show_device_memory(
    engine: Engine, region: int, length: int
) -> None:
    async with await engine.connect() as client:
        await enable_memory(client)
        got = await client.region_info(region)
        assert got.fd is not None
        expected = engine.built.device.region_info(region)
        assert got.info.size == expected.size
        assert got.info.flags & 0x7 == 0x7  # READ | WRITE | MMAP
        assert expected.mmap is not None and got.info.offset == expected.mmap.offset
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


async def test_config_space_is_the_variants(engine: Engine) -> None:
    async with await engine.connect() as client:
        ids = struct.unpack("<HH", await client.region_read(CONFIG, 0, 4))
        assert ids == (0x10DE, 0x2342)
        # BAR4 sizing goes to the variant's emulated register, not libvfio-user's BAR code.
        await client.region_write(CONFIG, 0x20, struct.pack("<I", 0xFFFFFFFF))
        await client.region_write(CONFIG, 0x24, struct.pack("<I", 0xFFFFFFFF))
        low, high = struct.unpack("<II", await client.region_read(CONFIG, 0x20, 8))
        sized = (high << 32) | low
        assert sized == (0xFFFFFFFFFFFFFFFF & ~(USEMEM_BAR_SIZE - 1)) | 0xC
        # Whole-dword and odd-sized accesses reach the device unchanged.
        assert await client.region_read(CONFIG, 0x20, 8) == engine.built.device.region_read(
            CONFIG, 0x20, 8
        )


async def test_bar4_tail_reads_ff_and_drops_writes(engine: Engine) -> None:
    async with await engine.connect() as client:
        await enable_memory(client)
        tail = USEMEM_LENGTH + 0x100
        await client.region_write(BAR4, tail, b"\x12\x34\x56\x78")
        assert await client.region_read(BAR4, tail, 4) == b"\xff" * 4
        await client.region_write(BAR4, USEMEM_LENGTH - 4, b"ABCDEFGH")
        assert await client.region_read(BAR4, USEMEM_LENGTH - 4, 8) == b"ABCD" + b"\xff" * 4
        with pytest.raises(VfioUserError) as info:
            await client.region_read(BAR4, USEMEM_BAR_SIZE - 4, 8)  # past bar_size
        assert info.value.errno == errno.EINVAL


async def test_device_errors_become_error_replies(tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        # Not ready yet: the variant refuses BAR4 accesses with EAGAIN (spec nvgrace-gpu.md
        # §7.4); the errno set in the C callback must reach the client.
        engine = await start_engine(nursery, tmp_path, ready_delay=30.0)
        async with await engine.connect() as client:
            await enable_memory(client)
            with pytest.raises(VfioUserError) as info:
                await client.region_read(BAR4, 0, 8)
            assert info.value.errno == errno.EAGAIN
            assert (await client.device_info()).num_regions == 9  # connection still fine
        nursery.cancel_scope.cancel()


async def test_a_bug_in_the_device_costs_one_request(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(index: int, offset: int, count: int) -> bytes:
        raise RuntimeError("bug")

    async with await engine.connect() as client:
        monkeypatch.setattr(engine.built.device, "region_read", broken)
        with pytest.raises(VfioUserError) as info:
            await client.region_read(BAR0, 0, 4)
        assert info.value.errno == errno.EIO
        monkeypatch.undo()
        assert len(await client.region_read(BAR0, 0, 4)) == 4


def open_fds() -> set[int]:
    return {int(name) for name in os.listdir("/proc/self/fd")}


async def test_a_client_session_leaks_no_fds(engine: Engine) -> None:
    before = open_fds()
    efd = os.eventfd(0, os.EFD_CLOEXEC)
    ram = os.memfd_create("guest-ram", os.MFD_CLOEXEC)
    os.ftruncate(ram, 1 << 20)
    async with await engine.connect() as client:
        await enable_msix(client)
        await client.set_irqs(MSIX_IRQ, SET_IRQS_EVENTFD_TRIGGER, 0, 1, [efd])
        await client.dma_map(0, 1 << 20, fd=ram)
        got = await client.region_info(BAR4)
        assert got.fd is not None
        os.close(got.fd)
    await engine.server.wait_idle()
    os.close(efd)
    os.close(ram)
    assert open_fds() == before


async def test_reset_clears_emulated_bars_and_keeps_memory(engine: Engine) -> None:
    async with await engine.connect() as client:
        await enable_memory(client)
        await client.region_write(BAR4, 0, b"keep me!")
        await client.region_write(CONFIG, 0x20, struct.pack("<I", 0xFFFFFFFF))
        await client.reset()
        assert struct.unpack("<I", await client.region_read(CONFIG, 0x20, 4))[0] == 0xC
        await enable_memory(client)
        assert await client.region_read(BAR4, 0, 8) == b"keep me!"


async def test_reconnect_keeps_device_memory(engine: Engine) -> None:
    async with await engine.connect() as client:
        await enable_memory(client)
        await client.region_write(BAR2, 0x40, b"persist!")
    async with await engine.connect() as client:
        await enable_memory(client)
        assert await client.region_read(BAR2, 0x40, 8) == b"persist!"
    await engine.server.wait_idle()
    assert engine.server.connections == 2
    with (engine.backing_dir / "resmem").open("rb") as handle:
        handle.seek(0x40)
        assert handle.read(8) == b"persist!"


async def interrupts(efd: int) -> int:
    """Wait (5 s at most) for ``efd`` to be signalled; how many times it was."""
    with trio.fail_after(5):
        await trio.lowlevel.wait_readable(efd)
    return os.eventfd_read(efd)


async def enable_msix(client: VfioUserClient) -> None:
    control = struct.unpack("<H", await client.region_read(CONFIG, MSIX_CAP + 2, 2))[0]
    await client.region_write(CONFIG, MSIX_CAP + 2, struct.pack("<H", control | 0x8000))


async def test_doorbell_reaches_the_msix_eventfd_through_libvfio_user(engine: Engine) -> None:
    efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    try:
        async with await engine.connect() as client:
            await enable_msix(client)
            await client.set_irqs(MSIX_IRQ, SET_IRQS_EVENTFD_TRIGGER, 3, 1, [efd])
            await client.region_write(BAR0, DOORBELL, struct.pack("<I", 3))
            assert await interrupts(efd) == 1
            await client.set_irqs(MSIX_IRQ, SET_IRQS_NONE_TRIGGER, 0, 0)
    finally:
        os.close(efd)


async def test_interrupt_waits_until_the_client_wires_the_vector(engine: Engine) -> None:
    efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    try:
        async with await engine.connect() as client:
            await enable_msix(client)
            await client.region_write(BAR0, DOORBELL, struct.pack("<I", 5))  # not wired yet
            await client.set_irqs(MSIX_IRQ, SET_IRQS_EVENTFD_TRIGGER, 5, 1, [efd])
            assert await interrupts(efd) == 1
    finally:
        os.close(efd)


async def test_an_unwired_vector_does_not_make_every_request_log(engine: Engine) -> None:
    """libvfio-user says "no fd for interrupt" (LOG_ERR) each time the pending vector is
    retried, which was after every request: one doorbell, then a warning per access."""
    async with await engine.connect() as client:
        await enable_msix(client)
        with structlog.testing.capture_logs() as logs:
            await client.region_write(BAR0, DOORBELL, struct.pack("<I", 9))  # not wired
            for _ in range(200):
                await client.region_read(CONFIG, 0, 4)
    complaints = [e for e in logs if "no fd for interrupt" in str(e.get("message"))]
    assert len(complaints) <= 1, complaints  # the doorbell's own forward, at most


async def test_a_reset_flood_is_logged_within_the_device_rate_limit(engine: Engine) -> None:
    """As under the Python engine: one "device reset" line per DEVICE_RESET made 200 lines
    of ours and 200 of libvfio-user's for 200 resets back to back."""
    logs, limit = await reset_flood(engine.connect, engine.server.wait_idle)
    ours = [e for e in logs if e["event"] == "device reset"]
    library = [e for e in logs if e.get("message") == "device reset by client"]
    assert BURST <= len(ours) <= limit
    assert BURST <= len(library) <= limit


async def _device_reset(client: VfioUserClient) -> None:
    await client.reset()


async def _guest_flr(client: VfioUserClient) -> None:
    """The reset a guest starts itself: DEVCTL bit 15 (spec vfio-user.md §5.3), a config
    write the device acts on inside the access callback."""
    devctl = struct.unpack("<H", await client.region_read(CONFIG, DEVCTL, 2))[0]
    await client.region_write(CONFIG, DEVCTL, struct.pack("<H", devctl | DEVCTL_FLR))


@pytest.mark.parametrize("reset", [_device_reset, _guest_flr], ids=["device_reset", "guest_flr"])
async def test_an_interrupt_raised_before_a_reset_is_not_delivered_after_it(
    engine: Engine, reset: Callable[[VfioUserClient], Awaitable[None]]
) -> None:
    efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    try:
        async with await engine.connect() as client:
            await enable_msix(client)
            await client.region_write(BAR0, DOORBELL, struct.pack("<I", 5))  # not wired yet
            await reset(client)  # drops it, as the device drops its pending bits
            await enable_msix(client)
            await client.set_irqs(MSIX_IRQ, SET_IRQS_EVENTFD_TRIGGER, 5, 1, [efd])
            await client.region_read(CONFIG, 0, 4)  # a request: pending vectors are retried
            with pytest.raises(BlockingIOError):
                os.eventfd_read(efd)
            # The vector works: a doorbell after the reset arrives.
            await client.region_write(BAR0, DOORBELL, struct.pack("<I", 5))
            assert await interrupts(efd) == 1
    finally:
        os.close(efd)


async def test_dma_map_and_unmap_reach_the_device(engine: Engine) -> None:
    ram = os.memfd_create("guest-ram", os.MFD_CLOEXEC)
    os.ftruncate(ram, 1 << 20)
    seen: list[tuple[str, int, int, bytes]] = []
    device = engine.built.device
    real_map, real_unmap = device.dma_map, device.dma_unmap

    def dma_map(region: DmaRegion) -> None:
        assert region.memory is not None
        seen.append(("map", region.iova, region.size, bytes(region.memory[:4])))
        real_map(region)

    def dma_unmap(iova: int, size: int) -> None:
        seen.append(("unmap", iova, size, b""))
        real_unmap(iova, size)

    os.pwrite(ram, b"RAM!", 0x1000)
    try:
        device.dma_map = dma_map  # type: ignore[method-assign]
        device.dma_unmap = dma_unmap  # type: ignore[method-assign]
        async with await engine.connect() as client:
            await client.dma_map(0x10000, 0x1000, fd=ram, offset=0x1000)
            await client.dma_map(0xFFFC0000, 0x40000, flags=1)  # fd-less, read-only
            await client.dma_unmap(0x10000, 0x1000)
        await engine.server.wait_idle()
    finally:
        os.close(ram)
        del device.dma_map, device.dma_unmap
    assert seen[0] == ("map", 0x10000, 0x1000, b"RAM!")
    assert ("unmap", 0x10000, 0x1000, b"") in seen
    assert ("unmap", 0xFFFC0000, 0x40000, b"") in seen  # dropped when the client left


async def test_an_identical_re_map_is_not_mapped_in_the_device_twice(engine: Engine) -> None:
    """libvfio-user accepts an identical re-map (spec vfio-user.md R15) as the mapping it has,
    and calls the register callback again for it: the device, told twice, refused the second
    (an IOMMU entry exists already: a warning per re-map) or counted it twice."""
    ram = os.memfd_create("guest-ram", os.MFD_CLOEXEC)
    os.ftruncate(ram, 1 << 20)
    device = engine.built.device
    maps: list[tuple[int, int]] = []
    real_map = device.dma_map

    def dma_map(region: DmaRegion) -> None:
        maps.append((region.iova, region.size))
        real_map(region)

    try:
        device.dma_map = dma_map  # type: ignore[method-assign]
        async with await engine.connect() as client:
            await client.dma_map(0x10000, 0x1000, fd=ram)
            await client.dma_map(0x10000, 0x1000, fd=ram)  # identical: success, no new map
            assert maps == [(0x10000, 0x1000)]
            await client.dma_unmap(0x10000, 0x1000)
            await client.dma_map(0x10000, 0x1000, fd=ram)  # mapped afresh once unmapped
            assert maps == [(0x10000, 0x1000)] * 2
        await engine.server.wait_idle()
    finally:
        os.close(ram)
        del device.dma_map


@pytest.mark.parametrize("body_bytes", [0, 10], ids=["header only", "part of the body"])
async def test_eof_in_the_middle_of_a_message_leaves_the_engine_serving(
    engine: Engine, body_bytes: int
) -> None:
    """libvfio-user answers a message cut short by EOF with an error reply; that reply fails,
    and it resets the context and closes the fd itself while reporting "nothing to do". The
    engine must see that the client is gone rather than wait on the closed fd (EBADF)."""
    client = await engine.connect()
    header = struct.pack("<HHIII", 9, REGION_WRITE, 16 + 16 + 64, 0, 0)
    # Written and closed without a checkpoint: the engine runs only once the client is gone.
    os.write(client.stream.socket.fileno(), header + b"x" * body_bytes)
    client.close()
    with trio.fail_after(10):
        async with await engine.connect() as again:
            assert (await again.device_info()).num_regions == 9


async def test_silent_client_is_cut_off_and_the_next_one_served(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(engine_module, "NEGOTIATION_TIMEOUT", 0.3)
    silent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with structlog.testing.capture_logs() as logs:
            silent.connect(str(engine.socket_path))
            # libvfio-user listens with a backlog of 0: one pending connection at most, so
            # the next client can connect only once the engine has taken this one.
            await accepted(engine.socket_path)
            with trio.fail_after(10):
                async with await engine.connect() as client:
                    assert (await client.device_info()).num_regions == 9
    finally:
        silent.close()
    # The same line as the Python engine's, which docs/operations.md tells operators to find.
    cut = [e for e in logs if e["event"] == "client did not negotiate in time, closing"]
    assert len(cut) == 1 and cut[0]["log_level"] == "warning"


async def test_a_client_still_negotiating_keeps_the_engine_busy(engine: Engine) -> None:
    """``wait_idle`` covers a client from the moment it is taken, not only once its session
    runs: a client has its VERSION reply before the engine has set the session up, and may
    send and close in that gap. (The session fuzz met this: its fd check ran while a posted
    write's fds were still on their way into libvfio-user.)"""
    silent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        silent.connect(str(engine.socket_path))
        await accepted(engine.socket_path)  # the attach thread negotiates with it now
        with trio.move_on_after(0.5) as waited:
            await engine.server.wait_idle()
        assert waited.cancelled_caught, "idle while a client was negotiating"
    finally:
        silent.close()
    with trio.fail_after(10):
        await engine.server.wait_idle()  # its negotiation failed: idle again


@pytest.mark.parametrize("when", ["once accepted", "at once"])
async def test_stop_while_a_client_is_negotiating(tmp_path: Path, when: str) -> None:
    """A silent client never holds up a stop, whether the engine's attach thread has taken
    its connection yet or not ("at once" also hits the moment in between, sometimes)."""
    silent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                engine = await start_engine(nursery, tmp_path)
                silent.connect(str(engine.socket_path))
                if when == "once accepted":
                    await accepted(engine.socket_path)
                nursery.cancel_scope.cancel()
    finally:
        silent.close()
    assert not (tmp_path / "gpu0.sock").exists()


async def accepted(path: Path) -> None:
    """Until the engine has accepted a connection on ``path`` (it has no other way to tell)."""
    # No event exists for this (the accept happens inside libvfio-user), so poll the state.
    while not any(True for _ in accepted_connections(path)):  # noqa: ASYNC110
        await trio.sleep(0.001)


async def test_socket_is_owner_only_and_removed_on_stop(tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        engine = await start_engine(nursery, tmp_path)
        assert engine.socket_path.stat().st_mode & 0o777 == 0o600
        nursery.cancel_scope.cancel()
    assert not engine.socket_path.exists()


async def test_a_client_that_never_pauses_does_not_hold_up_another_device(
    tmp_path: Path,
) -> None:
    """As tests/server/test_tray.py checks for the Python engine: gpu0's client has 2000
    posted writes queued before the daemon runs; gpu1's request is answered long before they
    are through (the engine yields every _YIELD_EVERY requests)."""
    flood = 2000
    async with trio.open_nursery() as nursery:
        gpu0 = await start_engine(nursery, tmp_path / "gpu0")
        gpu1 = await start_engine(nursery, tmp_path / "gpu1")
        async with await gpu0.connect() as client0, await gpu1.connect() as client1:
            # Both attached in full first: libvfio-user answers VERSION before the engine's
            # attach-time search (vgpud/mappers.py) has run, and the first answer after it
            # measures that search, not how the two devices share the process.
            await client0.region_read(CONFIG, 0, 4)
            await client1.region_read(CONFIG, 0, 4)
            posted = struct.pack("<HHIII", 0, REGION_WRITE, 36, 0x10, 0)  # NO_REPLY
            posted += struct.pack("<QII", 0x3C, CONFIG, 4) + b"\x0b\x00\x00\x00"
            start = gpu0.server.messages
            # Plain writes, no checkpoint: all of it is queued before the daemon runs.
            client0.stream.socket.sendall(posted * flood)
            await client1.region_read(CONFIG, 0, 4)
            assert gpu0.server.messages - start < flood // 4, gpu0.server.messages - start
            await client0.device_info()  # after the whole queue, in order
            assert gpu0.server.messages - start == flood + 1
        nursery.cancel_scope.cancel()


async def test_second_client_is_refused_and_the_first_unaffected(engine: Engine) -> None:
    """DESIGN.md "Engines": one client per device, as with the Python engine. Without the
    refusal a second VMM waits in libvfio-user's listen queue and is attached the moment the
    first leaves, to a device in the first one's state."""
    async with await engine.connect() as first:
        await enable_memory(first)
        await first.region_write(BAR4, 0x2000, b"first!!!")
        with (
            structlog.testing.capture_logs() as logs,
            trio.fail_after(10),
            pytest.raises(VfioUserError, match="VERSION failed: Device or resource busy"),
        ):
            await engine.connect()
        refusals = [entry for entry in logs if entry["event"].startswith("refusing")]
        assert len(refusals) == 1
        assert refusals[0]["active_connection"] == 1 and refusals[0]["connection"] == 2
        assert refusals[0]["peer_pid"] == os.getpid()  # the peer's credentials, as logged
        assert await first.region_read(BAR4, 0x2000, 8) == b"first!!!"
        # Refused, not queued: the first client goes on while nothing waits behind it.
        assert engine.server.attached and not engine.server.negotiating
    await engine.server.wait_idle()
    with trio.fail_after(10):
        async with await engine.connect() as after:
            await enable_memory(after)
            assert await after.region_read(BAR4, 0x2000, 8) == b"first!!!"


@contextlib.contextmanager
def no_free_fds() -> Iterator[None]:
    """Every fd number this process may open is taken meanwhile: the next one is EMFILE."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    fillers: list[int] = []
    try:
        top = max(open_fds())
        while not fillers or fillers[-1] < top:  # the holes below the highest fd, and it + 1
            fillers.append(os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC))
        resource.setrlimit(resource.RLIMIT_NOFILE, (fillers[-1] + 1, hard))
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        for fd in fillers:
            os.close(fd)


async def test_out_of_fds_when_a_second_client_connects_costs_nobody_their_device(
    engine: Engine,
) -> None:
    """The refusal's accept failing for want of fds (EMFILE) ended the device's serve() with
    the exception: the first client was dropped and the device served no one again (the
    daemon's devices all share one nursery). It backs off as the Python engine's accept does
    (vgpud/server/listener.py), and the second client is refused once fds are free."""
    second = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)  # its fd, before they run out
    try:
        async with await engine.connect() as first:
            await enable_memory(first)
            await first.region_write(BAR4, 0x3000, b"first!!!")
            with structlog.testing.capture_logs() as logs, no_free_fds():
                second.connect(str(engine.socket_path))  # in the backlog: takes no fd here
                await trio.testing.wait_all_tasks_blocked()  # the engine has tried to accept
            assert [e["log_level"] for e in logs if e["event"] == "accept failed, backing off"]
            assert await first.region_read(BAR4, 0x3000, 8) == b"first!!!"
            second.sendall(QEMU_VERSION)
            with trio.fail_after(10):
                reply = await trio.to_thread.run_sync(second.recv, 4096)
            _, _, _, flags, error = HEADER.unpack_from(reply)
            assert (flags & VFIO_USER_F_ERROR, error) == (VFIO_USER_F_ERROR, errno.EBUSY)
            assert engine.server.attached and engine.server.client == 1
    finally:
        second.close()


async def test_out_of_fds_before_attach_backs_off_instead_of_spinning(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """libvfio-user's accept failing for want of fds leaves the connection queued and the
    listening socket readable: the engine tried again at once, about 2000 times a second,
    a thread hop each, for as long as fds stayed short. It backs off as the Python engine's
    accept does. (The attach runs inline here, so that an engine that never waits keeps
    wait_all_tasks_blocked from returning.)"""
    attempts: list[int] = []

    def out_of_fds() -> tuple[int, int]:
        attempts.append(errno.EMFILE)
        return -1, errno.EMFILE

    async def inline(fn: Any, *args: Any, **_: Any) -> Any:
        await trio.lowlevel.checkpoint()
        return fn(*args)

    monkeypatch.setattr(engine.server, "_attach_blocking", out_of_fds)
    monkeypatch.setattr(trio.to_thread, "run_sync", inline)
    waiting = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        waiting.connect(str(engine.socket_path))
        with trio.fail_after(HANG_GUARD):
            await trio.testing.wait_all_tasks_blocked()  # the engine waits before trying again
        assert attempts == [errno.EMFILE]
    finally:
        waiting.close()


async def test_a_client_reconnecting_after_closing_is_served(engine: Engine) -> None:
    """A VMM that reconnects as soon as it has closed its connection is served, not refused,
    even when it connects before the engine has read the old connection's EOF."""
    client = await engine.connect()
    with structlog.testing.capture_logs() as logs, trio.fail_after(30):
        # Each round: the session runs (a round trip), then close and connect with no
        # checkpoint between, so the engine sees the EOF and the new connection in one
        # scheduler batch, whose order trio shuffles: 12 rounds meet both orders.
        for _ in range(12):
            assert (await client.device_info()).num_regions == 9
            client.close()
            client = await engine.connect()
        client.close()
    assert not [entry for entry in logs if entry["event"].startswith("refusing")]


async def test_a_stop_logs_no_library_line_above_debug(tmp_path: Path) -> None:
    """vfu_destroy_ctx says at every stop that it reset the context for the shutdown, as an
    info line reading like a failure; it is a debug line here (library_log.routine)."""
    with structlog.testing.capture_logs() as logs:
        async with trio.open_nursery() as nursery:
            await start_engine(nursery, tmp_path)
            nursery.cancel_scope.cancel()
    library_lines = [(e["log_level"], e["message"]) for e in logs if e["event"] == "libvfio-user"]
    assert any("vfu_reset_ctx" in message for _, message in library_lines)
    assert {level for level, _ in library_lines} == {"debug"}
