"""Each libvfio-user device on a thread of its own (vgpud/libvfio_user/thread.py): a client
blocking the library mid-message holds up its own device only, and a stop does not wait for
the stall limit.

Needs a libvfio-user build (``VGPUD_LIBVFIO_USER``); skipped without one.
"""

from __future__ import annotations

import functools
import os
import signal
import socket
import struct
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import structlog
import structlog.testing
import trio
import trio.testing

from tests.server.rawclient import HEADER, QEMU_VERSION
from vgpud.client import VfioUserClient
from vgpud.config import single_device
from vgpud.devices import build_device
from vgpud.libvfio_user import EngineUnavailable, load_library
from vgpud.libvfio_user import thread as thread_module
from vgpud.libvfio_user.engine import LibvfioUserServer, serve_device
from vgpud.libvfio_user.thread import DeviceThread, serve_device_on_thread
from vgpud.libvfio_user.watchdog import StallWatchdog
from vgpud.server.socket_files import ListenerError

try:
    LIBRARY = load_library()
except EngineUnavailable as exc:
    pytest.skip(f"libvfio-user engine tests need the library ({exc})", allow_module_level=True)

CONFIG, REGION_WRITE = 7, 10
NEVER = 3600.0  # a stall limit no test reaches: only a stop can cut the staller off
HANG_GUARD = 30.0  # seconds; waits that are over in milliseconds unless something hangs


@asynccontextmanager
async def served(tmp_path: Path, name: str, **options: Any) -> AsyncIterator[DeviceThread]:
    socket_path = tmp_path / f"{name}.sock"
    config = single_device(
        socket_path=socket_path, memory_size="4GiB", backing_dir=tmp_path / f"mem-{name}"
    )
    built = build_device(config)
    try:
        async with trio.open_nursery() as nursery:
            serve = functools.partial(
                serve_device_on_thread, built, socket_path, library=LIBRARY, **options
            )
            yield await nursery.start(serve)
            nursery.cancel_scope.cancel()
    finally:
        built.release()


def stall_blocking(path: Path) -> socket.socket:
    """Negotiate, then send a REGION_WRITE header announcing a body that never comes."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(HANG_GUARD)
    sock.connect(str(path))
    sock.sendall(QEMU_VERSION)
    assert sock.recv(4096), "no VERSION reply"
    sock.sendall(HEADER.pack(5, REGION_WRITE, 16 + 16 + 64, 0, 0))
    return sock


async def stall(path: Path) -> socket.socket:
    """:func:`stall_blocking`, the test's loop going on meanwhile."""
    return await trio.to_thread.run_sync(stall_blocking, path)


async def until(condition: Callable[[], bool]) -> None:
    while not condition():  # noqa: ASYNC110 (state of another thread, no event to wait on)
        await trio.sleep(0.001)


async def test_a_stalled_client_holds_up_its_own_device_only(tmp_path: Path) -> None:
    # Without the thread, reaching gpu1 would wait for the stall limit, NEVER; without the
    # cut on stop, so would leaving. pytest's timeout (pyproject) turns a hang into a failure.
    async with (
        served(tmp_path, "gpu0", stall_limit=NEVER) as gpu0,
        served(tmp_path, "gpu1") as gpu1,
    ):
        staller = await stall(tmp_path / "gpu0.sock")
        # gpu0's thread is now inside vfu_run_ctx, blocked reading the body.
        await until(lambda: gpu0.server is not None and gpu0.server.watchdog.busy)
        async with await VfioUserClient.connect(tmp_path / "gpu1.sock") as client:
            assert await client.region_read(CONFIG, 0, 2) == b"\xde\x10"
        await gpu1.wait_idle()
        assert gpu0.server is not None and gpu0.server.watchdog.busy
        assert gpu0.server.watchdog.stalls == 0
    # Leaving stopped both: the staller was cut off at once.
    with staller:
        assert staller.recv(1) == b""
    assert not (tmp_path / "gpu0.sock").exists()


async def test_a_stop_before_the_daemon_heard_the_device_listens_cuts_too(
    tmp_path: Path,
) -> None:
    """The device's loop tells the daemon's loop that it listens, and goes on serving; a
    stop the daemon's loop handles before that news has no server to cut, while a client
    may already have attached and blocked the library. It is cut at once all the same (a
    start-up stress -- stop signals while hostile clients stalled each socket as it
    appeared -- found 1 stop in 250 taking 6.3 s, the stall limit)."""
    socket_path = tmp_path / "gpu0.sock"
    built = build_device(
        single_device(socket_path=socket_path, memory_size="4GiB", backing_dir=tmp_path / "mem")
    )
    listening = threading.Event()
    servers: list[LibvfioUserServer] = []

    async def serve(task_status: trio.TaskStatus[LibvfioUserServer]) -> None:
        # serve_device, telling this test too once the socket listens (in the device's loop).
        async with trio.open_nursery() as nursery:
            server = await nursery.start(
                functools.partial(
                    serve_device, built, socket_path, library=LIBRARY, stall_limit=NEVER
                )
            )
            servers.append(server)
            listening.set()
            task_status.started(server)

    device_thread = DeviceThread("gpu0", serve)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(device_thread.run, trio.TASK_STATUS_IGNORED)
            await trio.testing.wait_all_tasks_blocked()  # the device's thread has started
            # No await from here to stop(): this loop cannot take the device's news meanwhile.
            assert listening.wait(HANG_GUARD)
            staller = stall_blocking(socket_path)
            [server] = servers
            until_without_yielding(lambda: server.watchdog.busy)  # blocked in the library
            device_thread.stop()
        # Without the cut, the device's thread would return only at the stall limit, NEVER.
    finally:
        built.release()
    with staller:
        assert staller.recv(1) == b""
    assert server.watchdog.stalls == 0


def until_without_yielding(condition: Callable[[], bool]) -> None:
    """:func:`until`, holding the test's loop up meanwhile."""
    while not condition():
        time.sleep(0.001)


async def test_wait_idle_returns_when_the_device_stops_meanwhile(tmp_path: Path) -> None:
    """A wait for the device to be idle that is under way when the device stops ends with
    it: its half in the device's loop is cancelled there, and still says so (it said
    nothing, and the wait never returned: found by a cross-thread hand-off audit)."""
    async with (
        served(tmp_path, "gpu0") as gpu0,
        await VfioUserClient.connect(tmp_path / "gpu0.sock") as client,
    ):
        assert await client.region_read(CONFIG, 0, 2) == b"\xde\x10"
        returned = trio.Event()

        async def wait_idle() -> None:
            await gpu0.wait_idle()
            returned.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(wait_idle)  # the client stays: it waits
            await trio.testing.wait_all_tasks_blocked()
            assert not returned.is_set(), "wait_idle returned with a client attached"
            gpu0.stop()  # as the daemon does when it stops
        # The nursery ended: wait_idle returned. pytest's timeout turns a hang into a failure.


async def test_a_start_up_error_comes_out_as_itself(tmp_path: Path) -> None:
    """The daemon reports start-up errors in one line: no exception group around them."""
    busy = tmp_path / "gpu0.sock"
    built = build_device(
        single_device(socket_path=busy, memory_size="4GiB", backing_dir=tmp_path / "mem")
    )
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as live:
            live.bind(str(busy))
            live.listen()
            async with trio.open_nursery() as nursery:
                serve = functools.partial(serve_device_on_thread, built, busy, library=LIBRARY)
                with pytest.raises(ListenerError, match="already listening"):
                    await nursery.start(serve)
    finally:
        built.release()


def test_a_call_begun_as_the_daemon_stops_is_cut_too() -> None:
    """The stop may come just before the device's loop enters ``vfu_run_ctx``: that call is
    cut as it begins instead of blocking until the stall limit (a start/stop stress found
    stops taking 6.25 s)."""
    ours, client = socket.socketpair()
    with ours, client:
        watchdog = StallWatchdog("gpu0", structlog.get_logger(), NEVER)
        watchdog.guard(ours.fileno(), structlog.get_logger())
        watchdog.cut_all()  # no call in progress: nothing to cut yet
        client.setblocking(False)
        with pytest.raises(BlockingIOError):
            client.recv(1)
        watchdog.enter()  # the loop's next call
        assert client.recv(1) == b""  # cut: the library's blocked read would return
        watchdog.leave()
        watchdog.forget()
        assert watchdog.stalls == 0


async def test_a_device_stuck_outside_its_socket_is_abandoned_at_stop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Nothing the stop can cut reaches a thread blocked elsewhere than on its client's
    socket -- in libvfio-user's plain write to a blocking interrupt fd the VMM filled, say.
    The stop gives it STOP_GRACE, then leaves it to die with the process and removes its
    socket file (the daemon used to wait for it for ever: SIGTERM did not stop it, found by
    a cross-thread audit). Here a doorbell write blocks in the device model instead, which
    is the same place for the thread and the test controls it."""
    monkeypatch.setattr(thread_module, "STOP_GRACE", 0.2)
    socket_path = tmp_path / "gpu0.sock"
    built = build_device(
        single_device(socket_path=socket_path, memory_size="4GiB", backing_dir=tmp_path / "mem")
    )
    entered, release = threading.Event(), threading.Event()

    def stuck_write(index: int, offset: int, data: bytes) -> None:
        entered.set()
        release.wait()  # the test's own hang guard ends it (finally below)

    monkeypatch.setattr(built.device, "region_write", stuck_write)
    device_thread: DeviceThread | None = None
    try:
        with structlog.testing.capture_logs() as logs:
            async with trio.open_nursery() as nursery:
                serve = functools.partial(
                    serve_device_on_thread, built, socket_path, library=LIBRARY
                )
                device_thread = await nursery.start(serve)
                client = await stall(socket_path)  # negotiates, then a REGION_WRITE header
                # ... and its body, 64 bytes into config space: the write runs.
                client.sendall(struct.pack("<QII", 0x100, CONFIG, 64) + bytes(64))
                assert await trio.to_thread.run_sync(entered.wait, HANG_GUARD)
                nursery.cancel_scope.cancel()
        client.close()
        assert not socket_path.exists()
        abandoned = [e for e in logs if e["event"] == "device did not stop, abandoning its thread"]
        assert len(abandoned) == 1 and abandoned[0]["log_level"] == "error"
    finally:
        release.set()  # the abandoned thread goes on, and has to finish before the device
        # is released and this test's logs end (its last library lines would land in the
        # next test's otherwise)
        if device_thread is not None:
            assert device_thread.thread_done.wait(HANG_GUARD)
        built.release()


# The syscall a thread blocked sending a reply sits in (/proc/<pid>/task/<tid>/syscall).
SENDMSG = {"x86_64": 46, "aarch64": 211}
REGION_READ, BAR4 = 9, 4
COMMAND_MEMORY = 0x0002
TRAPPED_TAIL = 3 << 30  # 4 GiB gh200: BAR4's trapped tail, past its 3 GiB of usemem
REPLY_DATA = 1 << 20  # max_data_xfer_size: far more than a socket buffer holds
ERROR_FLAG = 0x20


def receive_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            break
        data += chunk
    return data


def receive_reply(sock: socket.socket) -> tuple[int, int, bytes]:
    """msg_id, errno (0: success) and payload of one reply (the payload short if the
    server closed)."""
    msg_id, _command, size, flags, error = HEADER.unpack(receive_exactly(sock, HEADER.size))
    return msg_id, error if flags & ERROR_FLAG else 0, receive_exactly(sock, size - HEADER.size)


def in_syscall(native_id: int, number: int) -> bool:
    with open(f"/proc/self/task/{native_id}/syscall") as status:
        return status.read().split()[0] == str(number)


async def test_a_signal_the_device_thread_takes_does_not_cut_its_client_off(
    tmp_path: Path,
) -> None:
    """The kernel hands a process-directed signal (SIGUSR1 for the status line, SIGHUP,
    ...) to any thread that does not block it. A device thread that took one while
    libvfio-user was sending a reply larger than the socket buffer (QEMU reads it in its
    own time) had its blocking sendmsg return short, which the library takes for a
    broken connection: it reset the context and the VM lost its GPU. Device threads leave
    the daemon's signals to the main thread, as its other worker threads do
    (vgpud.signals.quiet_thread)."""
    sendmsg = SENDMSG.get(os.uname().machine)
    if sendmsg is None:
        pytest.skip(f"no sendmsg syscall number known for {os.uname().machine}")
    taken: list[int] = []
    signal.signal(signal.SIGUSR1, lambda signum, _frame: taken.append(signum))  # conftest
    async with served(tmp_path, "gpu0") as gpu0:
        assert gpu0.server is not None
        device = gpu0.server.device
        device_thread: list[tuple[int, int]] = []
        real_read = device.region_read

        def region_read(index: int, offset: int, count: int) -> bytes:
            device_thread.append((threading.get_ident(), threading.get_native_id()))
            return real_read(index, offset, count)

        device.region_read = region_read  # type: ignore[method-assign]
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(HANG_GUARD)
            sock.connect(str(tmp_path / "gpu0.sock"))
            sock.sendall(QEMU_VERSION)
            receive_reply(sock)
            command = struct.pack("<QII", 0x04, CONFIG, 2) + struct.pack("<H", COMMAND_MEMORY)
            sock.sendall(HEADER.pack(1, REGION_WRITE, 16 + len(command), 0, 0) + command)
            assert receive_reply(sock)[:2] == (1, 0)
            read = struct.pack("<QII", TRAPPED_TAIL, BAR4, REPLY_DATA)
            sock.sendall(HEADER.pack(2, REGION_READ, 16 + len(read), 0, 0) + read)
            # The reply fills the socket buffer and the device thread waits in sendmsg.
            await until(lambda: bool(device_thread) and in_syscall(device_thread[0][1], sendmsg))
            signal.pthread_kill(device_thread[0][0], signal.SIGUSR1)
            msg_id, error, payload = receive_reply(sock)
            assert (msg_id, error, len(payload)) == (2, 0, len(read) + REPLY_DATA)
            assert payload == read + b"\xff" * REPLY_DATA
            # ... and the client is still served.
            probe = struct.pack("<QII", 0, CONFIG, 2)
            sock.sendall(HEADER.pack(3, REGION_READ, 16 + len(probe), 0, 0) + probe)
            assert receive_reply(sock) == (3, 0, probe + b"\xde\x10")
