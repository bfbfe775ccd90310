"""Other processes mapping a device's memory (vgpud/mappers.py).

A VM whose vgpud restarted keeps its mappings of the memory files while its GPU no longer
answers (QEMU does not reconnect, spec vfio-user.md §5.8), so a new VM attached to the
device would share that memory with it. The daemon names such processes at start-up and
when a client attaches; here a child process that mmaps the usemem file stands in for the
old VM (tests/e2e/test_faults.py has the real one).
"""

from __future__ import annotations

import functools
import mmap
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import structlog.testing
import trio

from backends.synthetic import SyntheticGpu
from tests.daemon.test_signals import ENGINES
from tests.server.conftest import start_daemon, tray_devices
from vgpud import daemon, mappers
from vgpud.client import VfioUserClient
from vgpud.config import DaemonConfig, single_device
from vgpud.devices import build_device
from vgpud.log_limit import LogLimiter
from vgpud.mappers import SharedMemoryCheck, find_mappers
from vgpud.memory_files import MemoryFiles

AT_START = "device memory is still mapped by another process"
AT_ATTACH = "device memory is also mapped by another process"

# A child that mmaps (or only opens) a file, says so, and holds on until its stdin closes.
HOLDER = """
import mmap, os, sys
fd = os.open(sys.argv[1], os.O_RDWR)
held = mmap.mmap(fd, 4096) if sys.argv[2] == "map" else None
print("holding", flush=True)
sys.stdin.read()
"""


@contextmanager
def held_by_child(path: Path, how: str = "map") -> Iterator[int]:
    """A child process that maps ``path`` (``how="open"``: only keeps it open); its pid."""
    child = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(path), how],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None and child.stdout.readline() == "holding\n"
        yield child.pid
    finally:
        assert child.stdin is not None
        child.stdin.close()
        child.wait(timeout=30)
        child.stdout.close()  # type: ignore[union-attr]


def file_id(path: Path) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


# -- finding them -----------------------------------------------------------------------------


def test_a_process_mapping_the_file_is_found_by_pid_and_command(tmp_path: Path) -> None:
    path = tmp_path / "usemem"
    path.write_bytes(bytes(8192))
    other = tmp_path / "other"
    other.write_bytes(bytes(8192))
    with held_by_child(path) as pid:
        (found,) = find_mappers({file_id(path)})
        assert found.pid == pid
        assert found.command == Path(f"/proc/{pid}/comm").read_text().strip()
        assert find_mappers({file_id(other)}) == []
        assert find_mappers({file_id(path)}, exclude=[pid]) == []


def test_a_process_that_only_has_the_file_open_is_not_counted(tmp_path: Path) -> None:
    path = tmp_path / "usemem"
    path.write_bytes(bytes(8192))
    with held_by_child(path, how="open"):
        assert find_mappers({file_id(path)}) == []


def test_this_process_is_never_counted(tmp_path: Path) -> None:
    path = tmp_path / "usemem"
    path.write_bytes(bytes(8192))
    with path.open("r+b") as handle, mmap.mmap(handle.fileno(), 4096):
        assert find_mappers({file_id(path)}) == []


def test_maps_are_matched_by_device_and_inode(tmp_path: Path) -> None:
    """A fake /proc: the same inode number on another device is another file; processes
    whose maps cannot be read (gone, or not ours) are skipped."""
    dev = os.makedev(0x103, 0x2A)
    lines = {
        "100": "7f0000000000-7f0000001000 rw-s 00000000 103:2a 4242 /dev/shm/vgpud/gpu0/usemem\n",
        "200": "7f0000000000-7f0000001000 rw-s 00000000 103:2b 4242 /elsewhere/usemem\n",
        "300": "7f0000000000-7f0000001000 r-xp 00000000 103:2a 42420 /usr/bin/qemu\n",
        "400": "garbage\n00:00 4242 \n",
    }
    for pid, text in lines.items():
        (tmp_path / pid).mkdir()
        (tmp_path / pid / "maps").write_text(text)
        (tmp_path / pid / "comm").write_text(f"proc{pid}\n")
    (tmp_path / "500").mkdir()  # no maps: gone meanwhile
    (tmp_path / "self").mkdir()
    found = find_mappers({(dev, 4242), (dev, 7)}, proc=tmp_path)
    assert [(m.pid, m.command, m.files) for m in found] == [
        (100, "proc100", frozenset({(dev, 4242)}))
    ]


def test_no_proc_finds_nobody(tmp_path: Path) -> None:
    assert find_mappers({(1, 2)}, proc=tmp_path / "absent") == []


def test_memory_files_are_the_files_qemu_maps(tmp_path: Path) -> None:
    for profile, names in (("gh200", {"usemem", "resmem"}), ("gb200", {"usemem", "bar1"})):
        config = single_device(
            socket_path=None, profile=profile, memory_size="4GiB", backing_dir=tmp_path / profile
        )
        built = build_device(config)
        try:
            assert isinstance(built.backend, SyntheticGpu)
            ids = MemoryFiles(built.device).ids
            assert ids == {file_id(tmp_path / profile / name) for name in names}
        finally:
            built.release()


# -- what the daemon says ------------------------------------------------------------------


async def test_the_daemon_names_a_process_mapping_its_memory_at_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A tray of two: the child maps gpu1's memory only, and only gpu1 is named."""
    monkeypatch.delenv("LISTEN_FDS", raising=False)
    configs = tray_devices(tmp_path)
    for config in configs:
        build_device(config).release()  # the files exist, as from an earlier run
    usemem = tmp_path / "mem1" / "usemem"
    with held_by_child(usemem) as pid, structlog.testing.capture_logs() as logs:
        async with trio.open_nursery() as nursery:
            await nursery.start(functools.partial(daemon.run, DaemonConfig(devices=configs)))
            nursery.cancel_scope.cancel()
    (warning,) = [line for line in logs if str(line["event"]).startswith(AT_START)]
    assert warning["log_level"] == "warning"
    assert (warning["device"], warning["pids"]) == ("gpu1", [pid])
    # ... before the "ready" line, and the daemon served anyway.
    events = [line["event"] for line in logs]
    assert events.index(warning["event"]) < events.index("ready")


async def test_no_warning_without_another_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("LISTEN_FDS", raising=False)
    with structlog.testing.capture_logs() as logs:
        async with trio.open_nursery() as nursery:
            daemon_ = await start_daemon(nursery, tmp_path)
            async with await daemon_.connect() as client:
                await client.device_info()
            await daemon_.idle()
            nursery.cancel_scope.cancel()
    assert not [line for line in logs if "mapped by another process" in str(line["event"])]


@pytest.mark.parametrize("engine", ENGINES)
async def test_a_client_attaching_while_another_process_maps_the_memory_is_warned_about(
    tmp_path: Path, engine: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("LISTEN_FDS", raising=False)
    config = single_device(
        socket_path=tmp_path / "gpu0.sock", memory_size="4GiB", backing_dir=tmp_path / "mem"
    )
    async with trio.open_nursery() as nursery:
        run = functools.partial(daemon.run, DaemonConfig((config,), engine=engine))
        [server] = await nursery.start(run)
        usemem = tmp_path / "mem" / "usemem"
        with held_by_child(usemem) as pid, structlog.testing.capture_logs() as logs:
            async with await VfioUserClient.connect(tmp_path / "gpu0.sock") as client:
                # The check runs before the session serves: answered means checked.
                assert (await client.device_info()).num_regions == 9
            await server.wait_idle()
        nursery.cancel_scope.cancel()
    (warning,) = [line for line in logs if str(line["event"]).startswith(AT_ATTACH)]
    assert warning["log_level"] == "warning"
    assert warning["pids"] == [pid]
    assert warning["device"] == "gpu0" and warning["connection"] == 1


class SlowSearch:
    """find_mappers held back until released; says when it has started and finished (the
    daemon leaves a search it gave up on running, and it reads /proc meanwhile)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.started, self.release, self.finished = (threading.Event() for _ in range(3))
        self._real = mappers.find_mappers
        monkeypatch.setattr(mappers, "find_mappers", self)

    def __call__(self, *args: Any, **kwargs: Any) -> list[mappers.Mapper]:
        if not kwargs.get("exclude"):  # the start-up search (it excludes nobody): not held
            return self._real(*args, **kwargs)
        self.started.set()
        self.release.wait(30)
        try:
            return self._real(*args, **kwargs)
        finally:
            self.finished.set()

    async def let_finish(self) -> None:
        self.release.set()
        await trio.to_thread.run_sync(self.finished.wait, 30)


async def test_a_search_that_takes_too_long_is_given_up_and_the_client_served(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The attach waits for the search a bounded time (QEMU gives each reply 5 s); past it
    the client is served and the log says the search was given up."""
    config = single_device(socket_path=None, memory_size="4GiB", backing_dir=tmp_path / "mem")
    built = build_device(config)
    check = SharedMemoryCheck(MemoryFiles(built.device))
    log = structlog.get_logger("test")
    peer = {"peer_pid": 1}  # what at_attach excludes; makes SlowSearch hold it
    try:
        with held_by_child(tmp_path / "mem" / "usemem"), structlog.testing.capture_logs() as logs:
            search = SlowSearch(monkeypatch)
            await check.at_attach(log, LogLimiter(), peer, limit=0.01)
            await search.let_finish()
            monkeypatch.undo()
            await check.at_attach(log, LogLimiter(), peer)
    finally:
        built.release()
    assert [line["event"] for line in logs] == [
        "gave up looking for other processes mapping the device memory",
        AT_ATTACH + ", which shares it with this client's guest (a VM from before vgpud's "
        "restart?)",
    ]


async def test_a_stop_during_the_search_closes_the_connection(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The daemon stops while a client's attach waits for the search: the client's
    connection is closed all the same, and no descriptor is left behind."""
    monkeypatch.delenv("LISTEN_FDS", raising=False)
    search = SlowSearch(monkeypatch)
    config = single_device(
        socket_path=tmp_path / "gpu0.sock", memory_size="4GiB", backing_dir=tmp_path / "mem"
    )
    before = {int(name) for name in os.listdir("/proc/self/fd")}
    try:
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                await nursery.start(functools.partial(daemon.run, DaemonConfig((config,))))
                client = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                await client.connect(str(tmp_path / "gpu0.sock"))
                await trio.to_thread.run_sync(search.started.wait, 30)
                nursery.cancel_scope.cancel()
            assert await client.recv(1) == b"", "the connection was left open"
            client.close()
    finally:
        await search.let_finish()
    assert {int(name) for name in os.listdir("/proc/self/fd")} == before
