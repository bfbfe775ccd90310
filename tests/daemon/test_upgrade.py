"""SIGUSR2 upgrades the daemon in place (vgpud/upgrade.py): the process execs itself, and an
attached client goes on with the same connection as if nothing had happened.

Each test runs ``vgpud serve`` as a process (an upgrade execs: it cannot run inside the test
process) and talks to it with the project's own vfio-user client, which sees what a VMM
would. The daemon's JSON log says when the upgrade is done ("upgraded") or refused.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import os
import signal
import socket
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog.testing
import trio

import protocol as p
from backends.synthetic import SyntheticGpu
from backends.synthetic.bar0 import DOORBELL, SCRATCH
from tests.daemon.test_signals import wait_for_event
from tests.serve_process import (
    VGPUD,
    interpreter_link,
    read_log_until,
    read_log_until_one_of,
    serve_args,
    start,
    stop,
)
from vgpud import daemon as daemon_module
from vgpud import upgrade as upgrade_module
from vgpud.client import VfioUserClient, VfioUserError
from vgpud.config import DaemonConfig, single_device
from vgpud.server.socket_files import ListenerError, claim_socket_path
from vgpud.upgrade import FREEZE_TIMEOUT

BAR0, BAR4_REGISTER, CONFIG = 0, 0x20, 7
MSIX_CAP, MSIX_IRQ = 0xA0, 2
SET_IRQS_EVENTFD_TRIGGER = 0x4 | 0x20
PAGE = 4096


@pytest.fixture
def daemon(tmp_path: Path, notify_socket: socket.socket) -> Iterator[subprocess.Popen[str]]:
    proc = start([*serve_args(tmp_path, "--memory-size", "2GiB"), "--log-format", "json"], tmp_path)
    read_log_until(proc, "ready")
    yield proc
    if proc.poll() is None:
        stop(proc, check=False)


async def log_until(proc: subprocess.Popen[str], event: str) -> dict[str, Any]:
    record, _ = await trio.to_thread.run_sync(read_log_until, proc, event)
    return record


async def upgrade(proc: subprocess.Popen[str]) -> dict[str, Any]:
    """SIGUSR2, and the "upgraded" line (an "upgrade refused" one fails the test)."""
    proc.send_signal(signal.SIGUSR2)
    record, lines = await trio.to_thread.run_sync(read_log_until, proc, "upgraded")
    assert "upgrade refused" not in lines, lines
    return record


async def test_an_attached_client_keeps_its_connection_device_and_mappings(
    daemon: subprocess.Popen[str], tmp_path: Path, notify_socket: socket.socket
) -> None:
    efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    ram = os.memfd_create("guest-ram", os.MFD_CLOEXEC)
    os.ftruncate(ram, 4 * PAGE)
    notify_socket.recv(64)  # READY=1 of the start
    try:
        async with await VfioUserClient.connect(tmp_path / "gpu0.sock") as client:
            # State in every part the upgrade carries: registers, config space and the
            # emulated BAR4 register, MSI-X enabled with an eventfd, a DMA mapping.
            await client.region_write(BAR0, SCRATCH, struct.pack("<I", 0x5EED_0001))
            await client.region_write(CONFIG, BAR4_REGISTER, struct.pack("<I", 0xFFFF_FFFF))
            sized = await client.region_read(CONFIG, BAR4_REGISTER, 4)
            control = struct.unpack("<H", await client.region_read(CONFIG, MSIX_CAP + 2, 2))[0]
            await client.region_write(CONFIG, MSIX_CAP + 2, struct.pack("<H", control | 0x8000))
            await client.set_irqs(MSIX_IRQ, SET_IRQS_EVENTFD_TRIGGER, 3, 1, [efd])
            await client.dma_map(0x10_0000, 4 * PAGE, fd=ram)

            upgraded = await upgrade(daemon)
            assert upgraded["pid"] == daemon.pid  # the same process, so no restart seen
            assert (upgraded["devices"], upgraded["clients"]) == (1, 1)
            assert notify_socket.recv(64).startswith(b"RELOADING=1\nMONOTONIC_USEC=")
            assert notify_socket.recv(64) == b"READY=1"

            assert await client.region_read(BAR0, SCRATCH, 4) == struct.pack("<I", 0x5EED_0001)
            assert await client.region_read(CONFIG, BAR4_REGISTER, 4) == sized
            await client.region_write(BAR0, DOORBELL, struct.pack("<I", 3))
            with trio.fail_after(5):
                await trio.lowlevel.wait_readable(efd)
            assert os.eventfd_read(efd) == 1
            # The DMA table came along: the same range with other flags overlaps it.
            with pytest.raises(VfioUserError) as overlapping:
                await client.dma_map(0x10_0000, 4 * PAGE, flags=1, fd=ram)
            assert overlapping.value.errno == errno.EEXIST
            # ... and it is still the only client.
            with pytest.raises(VfioUserError) as refused:
                await VfioUserClient.connect(tmp_path / "gpu0.sock")
            assert refused.value.errno == errno.EBUSY
            await client.dma_unmap(0x10_0000, 4 * PAGE)
        await log_until(daemon, "client disconnected")
        async with await VfioUserClient.connect(tmp_path / "gpu0.sock") as client:
            assert await client.region_read(BAR0, SCRATCH, 4) == struct.pack("<I", 0x5EED_0001)
    finally:
        os.close(efd)
        os.close(ram)
    stop(daemon)
    assert not (tmp_path / "gpu0.sock").exists()


async def test_an_idle_daemon_upgrades_twice_and_takes_clients_after(
    daemon: subprocess.Popen[str], tmp_path: Path
) -> None:
    for _ in range(2):
        upgraded = await upgrade(daemon)
        assert (upgraded["devices"], upgraded["clients"], upgraded["pid"]) == (1, 0, daemon.pid)
    async with await VfioUserClient.connect(tmp_path / "gpu0.sock") as client:
        info = await client.device_info()
        assert info.num_regions == 9
    # The claim on the socket path went with it (vgpud/server/socket_files.py).
    with pytest.raises(ListenerError, match="in use: another vgpud holds"):
        claim_socket_path(tmp_path / "gpu0.sock")
    stop(daemon)
    assert not (tmp_path / "gpu0.sock").exists()
    assert not (tmp_path / "gpu0.sock.lock").exists()


async def test_a_command_line_the_new_code_refuses_refuses_the_upgrade(
    tmp_path: Path, notify_socket: socket.socket
) -> None:
    config = tmp_path / "tray.toml"
    socket_path = tmp_path / "gpu0.sock"
    config.write_text(
        f'[[device]]\nname = "gpu0"\nsocket_path = "{socket_path}"\n'
        f'memory_size = "2GiB"\nbacking_dir = "{tmp_path / "mem"}"\n'
    )
    proc = start(["serve", "--config", str(config), "--log-format", "json"], tmp_path)
    try:
        read_log_until(proc, "ready")
        async with await VfioUserClient.connect(socket_path) as client:
            await client.region_write(BAR0, SCRATCH, struct.pack("<I", 7))
            config.write_text("[[device]]\nname = 5\n")  # what the new code would read
            proc.send_signal(signal.SIGUSR2)
            refused = await log_until(proc, "upgrade refused")
            assert "refuses this command line" in refused["reason"]
            assert await client.region_read(BAR0, SCRATCH, 4) == struct.pack("<I", 7)
    finally:
        stop(proc)


async def test_a_client_stuck_half_way_through_a_message_refuses_the_upgrade(
    daemon: subprocess.Popen[str], tmp_path: Path
) -> None:
    async with await VfioUserClient.connect(tmp_path / "gpu0.sock") as client:
        read = p.RegionReadRequest(region=BAR0, offset=SCRATCH, count=4)
        wire = client.conn.send_request(read)[1].data  # the client owes no other reply
        header, body = wire[: p.HEADER_SIZE], wire[p.HEADER_SIZE :]
        # The header of a message whose body never comes (until the test says so).
        sock = client.stream.socket
        sock.send(header)
        daemon.send_signal(signal.SIGUSR2)
        refused = await log_until(daemon, "upgrade refused")
        assert f"{FREEZE_TIMEOUT:.0f} s" in refused["reason"]
        sock.send(body)  # thawed: the message is served
        with trio.fail_after(10):
            await trio.lowlevel.wait_readable(sock)
        reply = sock.recv(4096)
        assert len(reply) == p.HEADER_SIZE + 16 + 4  # the read's reply, not an error
    stop(daemon)


def test_the_upgrade_check_prints_the_formats_and_starts_nothing(tmp_path: Path) -> None:
    done = subprocess.run(
        [*VGPUD, *serve_args(tmp_path)],
        env={**os.environ, "VGPUD_UPGRADE_CHECK": "1"},
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["handover_formats"] == [1]
    assert not (tmp_path / "gpu0.sock").exists()
    assert not (tmp_path / "mem").exists()


def test_the_upgrade_check_runs_nicer_than_the_daemon() -> None:
    # A whole interpreter start-up would otherwise compete with the sessions it checks for.
    with subprocess.Popen(
        [sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE
    ) as child:
        upgrade_module._lower_priority(child.pid)
        niceness = os.getpriority(os.PRIO_PROCESS, child.pid)
        child.communicate()
    own = os.getpriority(os.PRIO_PROCESS, 0)
    assert niceness == min(own + upgrade_module.CHECK_NICENESS, 19) > own or own == 19


@pytest.mark.skipif(
    not os.environ.get("VGPUD_LIBVFIO_USER"),
    reason="VGPUD_LIBVFIO_USER is not set: the libvfio-user engine needs a local build",
)
async def test_the_libvfio_user_engine_refuses_and_serves_on(
    tmp_path: Path, notify_socket: socket.socket
) -> None:
    engine = ["--engine", "libvfio-user", "--log-format", "json"]
    proc = start([*serve_args(tmp_path, "--memory-size", "2GiB"), *engine], tmp_path)
    try:
        read_log_until(proc, "ready")
        async with await VfioUserClient.connect(tmp_path / "gpu0.sock") as client:
            proc.send_signal(signal.SIGUSR2)
            refused = await log_until(proc, "upgrade refused")
            assert "libvfio-user engine" in refused["reason"]
            assert (await client.device_info()).num_regions == 9
    finally:
        stop(proc)


async def test_a_stop_sent_as_the_daemon_execs_stops_it_cleanly(
    tmp_path: Path, notify_socket: socket.socket
) -> None:
    """RELOADING=1 comes just before the exec, so SIGTERM sent on it reaches the next process
    while it imports: it waits, blocked, for that process's handlers instead of killing it
    half-way (and the socket with it)."""
    proc = start([*serve_args(tmp_path), "--log-format", "json"], tmp_path)
    try:
        read_log_until(proc, "ready")
        assert notify_socket.recv(64) == b"READY=1"
        proc.send_signal(signal.SIGUSR2)
        assert notify_socket.recv(64).startswith(b"RELOADING=1")
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            stop(proc, check=False)
    assert proc.returncode == 0, stderr
    assert '"stopping"' in stderr
    assert not (tmp_path / "gpu0.sock").exists()


def start_with_handover(
    tmp_path: Path, document: bytes, pass_fds: tuple[int, ...] = ()
) -> subprocess.Popen[str]:
    """``vgpud serve`` as the next process of an upgrade whose document is ``document``
    (``pass_fds``: the fds it names)."""
    memfd = os.memfd_create("handover", 0)
    os.write(memfd, document)
    os.lseek(memfd, 0, os.SEEK_SET)
    try:
        return subprocess.Popen(
            [*VGPUD, *serve_args(tmp_path), "--log-format", "json"],
            env={**os.environ, "VGPUD_HANDOVER_FD": str(memfd)},
            pass_fds=[memfd, *pass_fds],
            stderr=subprocess.PIPE,
            text=True,
        )
    finally:
        os.close(memfd)


@pytest.mark.parametrize(
    "document",
    [b"not json", b"[1]", b'{"format": 99, "devices": []}', b"[" * 100_000],  # too deep
)
def test_a_handover_that_cannot_be_read_starts_afresh(tmp_path: Path, document: bytes) -> None:
    proc = start_with_handover(tmp_path, document)
    try:
        _, lines = read_log_until(proc, "ready")
        assert "the handover cannot be read; starting afresh" in lines
    finally:
        stop(proc)


def test_a_device_that_cannot_be_taken_over_is_dropped_with_its_fds(tmp_path: Path) -> None:
    path = tmp_path / "gone.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen()
    handed = os.dup(listener.fileno())  # what the previous process would have left open
    device = {
        "config": {"name": "gone", "socket_path": str(path), "profile": "no-such-profile"},
        "endpoint": {"path": str(path), "fd": handed, "ours": True, "connected": False},
        "fds": [handed],
    }
    document = json.dumps({"format": 1, "devices": [device], "upgrading_ns": 0}).encode()
    try:
        proc = start_with_handover(tmp_path, document, (handed,))
    finally:
        os.close(handed)
    try:
        upgraded, lines = read_log_until(proc, "upgraded")
        assert "device could not be taken over" in lines
        assert (upgraded["devices"], upgraded["clients"]) == (0, 0)
        assert not path.exists()  # ours, so removed
        listening = os.readlink(f"/proc/self/fd/{listener.fileno()}")  # socket:[inode]
        held = [
            os.readlink(f"/proc/{proc.pid}/fd/{fd}") for fd in os.listdir(f"/proc/{proc.pid}/fd")
        ]
        assert listening not in held  # the daemon closed the listener it was handed
    finally:
        listener.close()
        stop(proc)


async def test_an_upgrade_reads_the_daemon_settings_afresh(
    tmp_path: Path, notify_socket: socket.socket
) -> None:
    """The [daemon] table (here the log level) is read as at a start; the devices keep
    theirs (a reload applies those)."""
    config = tmp_path / "tray.toml"
    socket_path = tmp_path / "gpu0.sock"
    device = (
        f'[[device]]\nname = "gpu0"\nsocket_path = "{socket_path}"\n'
        f'memory_size = "2GiB"\nbacking_dir = "{tmp_path / "mem"}"\n'
    )
    config.write_text('[daemon]\nlog_level = "info"\n' + device)
    proc = start(["serve", "--config", str(config), "--log-format", "json"], tmp_path)
    try:
        read_log_until(proc, "ready")
        config.write_text('[daemon]\nlog_level = "debug"\n' + device.replace("2GiB", "4GiB"))
        await upgrade(proc)
        async with await VfioUserClient.connect(socket_path) as client:
            with pytest.raises(VfioUserError):
                await client.region_read(BAR0, 1 << 30, 4)  # outside BAR0: refused
            refused = await log_until(proc, "request refused")  # a debug line
            assert refused["errno"] == errno.EINVAL
            bar4 = await client.region_info(4)
            if bar4.fd is not None:
                os.close(bar4.fd)
            # BAR4 as served before the upgrade: 2 GiB of memory make a 1 GiB usemem BAR
            # (4 GiB would make a 4 GiB one).
            assert bar4.info.size == 1 << 30
    finally:
        stop(proc)


async def test_a_stop_during_an_upgrade_that_is_refused_still_stops(
    daemon: subprocess.Popen[str], tmp_path: Path
) -> None:
    """The upgrade holds the daemon's signals back while it freezes; when it is refused (a
    client stuck mid-message), a stop that came meanwhile is acted on, not lost."""
    async with await VfioUserClient.connect(tmp_path / "gpu0.sock") as client:
        read = p.RegionReadRequest(region=BAR0, offset=SCRATCH, count=4)
        client.stream.socket.send(client.conn.send_request(read)[1].data[: p.HEADER_SIZE])
        daemon.send_signal(signal.SIGUSR2)
        await log_until(daemon, "new code checked; bringing the clients to rest")
        daemon.send_signal(signal.SIGTERM)  # held: the upgrade waits for the client
        _, stderr = await trio.to_thread.run_sync(functools.partial(daemon.communicate, timeout=30))
    assert daemon.returncode == 0, stderr
    assert stderr.index('"upgrade refused"') < stderr.index('"stopping"')
    assert '"stopped"' in stderr
    assert not (tmp_path / "gpu0.sock").exists()


@pytest.mark.parametrize("stand_in", [True, False], ids=["stand-in", "no-stand-in"])
async def test_an_exec_that_fails_gives_everything_back_and_serves_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stand_in: bool
) -> None:
    """In-process, with ``os.execve`` failing: the new code is checked and the session
    frozen. With a stand-in, it is forked and exits at once (nothing was described, so
    there is nothing to give back); without one (a passthrough device), the device is
    described (a passthrough device lets go of its DMA addresses there), then told the
    upgrade was abandoned. Either way the session thaws, and the attached client is served
    as before."""
    command = [*VGPUD, *serve_args(tmp_path, "--memory-size", "2GiB")]
    monkeypatch.setattr(upgrade_module, "command_line", lambda: command)
    if not stand_in:
        monkeypatch.setattr(SyntheticGpu, "stand_in_refusal", lambda _: "as a passthrough device")

    def exec_fails(*_: object) -> None:
        raise OSError(errno.ENOEXEC, os.strerror(errno.ENOEXEC))

    monkeypatch.setattr(os, "execve", exec_fails)
    abandoned: list[SyntheticGpu] = []

    def handover_abandoned(self: SyntheticGpu) -> None:
        abandoned.append(self)

    monkeypatch.setattr(SyntheticGpu, "handover_abandoned", handover_abandoned)
    device = single_device(
        socket_path=tmp_path / "gpu0.sock", memory_size="2GiB", backing_dir=tmp_path / "mem"
    )
    with structlog.testing.capture_logs() as logs, trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await nursery.start(functools.partial(daemon_module.run, DaemonConfig((device,))))
            async with await VfioUserClient.connect(tmp_path / "gpu0.sock") as client:
                await client.region_write(BAR0, SCRATCH, struct.pack("<I", 7))
                signal.raise_signal(signal.SIGUSR2)
                await wait_for_event(logs, "upgrade failed; serving on")
                assert await client.region_read(BAR0, SCRATCH, 4) == struct.pack("<I", 7)
            nursery.cancel_scope.cancel()
    assert len(abandoned) == (0 if stand_in else 1)
    checked = next(e for e in logs if e["event"].startswith("new code checked"))
    assert checked["stand_in"] is stand_in
    with pytest.raises(ChildProcessError):  # the stand-in, if any, was reaped
        os.waitpid(-1, os.WNOHANG)  # noqa: ASYNC222 (WNOHANG: does not wait)
    assert [e["event"] for e in logs if "upgrad" in e["event"]] == [
        "upgrading",
        "upgrade failed; serving on",
    ]


async def test_an_exec_that_fails_for_real_serves_on_and_the_next_upgrade_goes_through(
    tmp_path: Path, notify_socket: socket.socket
) -> None:
    """The daemon runs through an interpreter link that the test points at nothing once the
    new code is checked (a client holds the freeze with half a message meanwhile), so the
    exec itself fails: the same client is served on, and with the link back the next
    upgrade goes through (the guest's passthrough device does the same in
    tests/e2e/test_vfio_backend.py)."""
    link = interpreter_link(tmp_path / "python")
    args = [*serve_args(tmp_path, "--memory-size", "2GiB"), "--log-format", "json"]
    proc = start(args, tmp_path, interpreter=link)
    try:
        read_log_until(proc, "ready")
        async with await VfioUserClient.connect(tmp_path / "gpu0.sock") as client:
            await client.region_write(BAR0, SCRATCH, struct.pack("<I", 7))
            read = p.RegionReadRequest(region=BAR0, offset=SCRATCH, count=4)
            wire = client.conn.send_request(read)[1].data
            client.stream.socket.send(wire[: p.HEADER_SIZE])
            proc.send_signal(signal.SIGUSR2)
            await log_until(proc, "new code checked; bringing the clients to rest")
            interpreter_link(tmp_path / "python", broken=True)
            client.stream.socket.send(wire[p.HEADER_SIZE :])
            with trio.fail_after(30):
                reply = await client.receive()
            assert isinstance(reply, p.Reply)
            assert isinstance(reply.message, p.RegionReadReply)
            assert reply.message.data == struct.pack("<I", 7)
            failed = await log_until(proc, "upgrade failed; serving on")
            assert "No such file or directory" in failed["exception"]
            assert await client.region_read(BAR0, SCRATCH, 4) == struct.pack("<I", 7)

            interpreter_link(tmp_path / "python")
            upgraded = await upgrade(proc)
            assert upgraded["pid"] == proc.pid
            assert upgraded["clients"] == 1
            assert await client.region_read(BAR0, SCRATCH, 4) == struct.pack("<I", 7)
    finally:
        stop(proc, check=False)
    assert proc.returncode == 0


async def test_a_daemon_serving_an_inherited_fd_upgrades_through_its_stand_in(
    tmp_path: Path, notify_socket: socket.socket
) -> None:
    """``--fd``: the socket the daemon was handed is inheritable (nothing made it
    close-on-exec), so the next process found it open at its number, where the stand-in's
    copy had to go ("fd N is taken in this process"), and started afresh: the VM lost its
    GPU."""
    path = tmp_path / "inherited.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(1)
    proc = start_on_fd(tmp_path, listener.fileno())
    listener.close()
    try:
        read_log_until(proc, "ready")
        async with await VfioUserClient.connect(path) as client:
            await client.region_write(BAR0, SCRATCH, struct.pack("<I", 7))
            proc.send_signal(signal.SIGUSR2)
            checked = await log_until(proc, "new code checked; bringing the clients to rest")
            assert checked["stand_in"] is True
            # "ready" is what a next process that started afresh says instead.
            done = await trio.to_thread.run_sync(read_log_until_one_of, proc, "upgraded", "ready")
            assert done["event"] == "upgraded", done
            assert done["clients"] == 1
            assert await client.region_read(BAR0, SCRATCH, 4) == struct.pack("<I", 7)
    finally:
        stop(proc, check=False)


def start_on_fd(tmp_path: Path, fd: int) -> subprocess.Popen[str]:
    """``vgpud serve --fd FD``, its log JSON on stderr."""
    args = ["serve", "--fd", str(fd), "--backing-dir", str(tmp_path / "mem")]
    return subprocess.Popen(
        [*VGPUD, *args, "--memory-size", "2GiB", "--log-format", "json"],
        pass_fds=(fd,),
        env=dict(os.environ, NOTIFY_SOCKET=str(tmp_path / "notify")),
        stderr=subprocess.PIPE,
        text=True,
    )


CHECK_GATE_MODULE = """\
import os

if os.environ.get("VGPUD_UPGRADE_CHECK") and os.environ.get("GATE"):
    with open(os.environ["GATE"]) as gate:
        gate.read()
"""


async def test_a_reload_asked_for_while_the_new_code_is_checked_is_done_after_the_upgrade(
    tmp_path: Path, notify_socket: socket.socket
) -> None:
    """Before the freeze the daemon's signal task takes a SIGHUP and makes the reload due; the
    exec used to drop it with the process, so the edited file was never applied (and systemd,
    told RELOADING=1 then READY=1 by the upgrade, took the reload for done). The check is held
    at its start-up by a gate (as in test_stand_in.py) while the reload is asked for."""
    (tmp_path / "gate-module").mkdir()
    (tmp_path / "gate-module" / "sitecustomize.py").write_text(CHECK_GATE_MODULE)
    os.mkfifo(tmp_path / "gate")
    config = tmp_path / "tray.toml"
    device = (
        '[[device]]\nname = "{name}"\nsocket_path = "{path}"\nmemory_size = "2GiB"\n'
        'backing_dir = "{memory}"\n'
    )

    def entry(name: str) -> str:
        return device.format(name=name, path=tmp_path / f"{name}.sock", memory=tmp_path / name)

    config.write_text(entry("gpu0"))
    proc = start(
        ["serve", "--config", str(config), "--log-format", "json"],
        tmp_path,
        PYTHONPATH=str(tmp_path / "gate-module"),
        GATE=str(tmp_path / "gate"),
    )
    try:
        read_log_until(proc, "ready")
        proc.send_signal(signal.SIGUSR2)
        await log_until(proc, "upgrading")  # the check is at the gate
        config.write_text(entry("gpu0") + entry("gpu1"))
        proc.send_signal(signal.SIGHUP)
        proc.send_signal(signal.SIGUSR1)  # taken after the SIGHUP: "status" says it was
        await log_until(proc, "status")

        def open_gate() -> None:
            with open(tmp_path / "gate", "w"):  # blocks until the check opens it
                pass

        await trio.to_thread.run_sync(open_gate)
        await log_until(proc, "upgraded")
        # A reload carried over is begun at once, before anything else is logged.
        proc.send_signal(signal.SIGUSR1)
        after = await trio.to_thread.run_sync(read_log_until_one_of, proc, "reloading", "status")
        assert after["event"] == "reloading", after
        reloaded = await log_until(proc, "reloaded")
        assert reloaded["added"] == ["gpu1"]
    finally:
        if proc.poll() is None:
            with contextlib.suppress(OSError):  # a test that failed before opening the gate
                os.close(os.open(tmp_path / "gate", os.O_WRONLY | os.O_NONBLOCK))
        stop(proc, check=False)


def test_a_socket_handed_by_a_process_older_than_the_lock_is_claimed_on_take_over(
    tmp_path: Path,
) -> None:
    """A document without ``lock_fd`` (the version before socket claims): the next process
    takes the lock itself and takes the socket file there for the one it serves, so that
    it is removed at stop, and another daemon cannot take the path meanwhile."""
    path = tmp_path / "gpu0.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(str(path))
        listener.listen()
        endpoint = {"path": str(path), "fd": listener.fileno(), "ours": True, "connected": False}
        claim = upgrade_module._handed_claim(path, endpoint)
        assert claim is not None
        try:
            with pytest.raises(ListenerError, match="in use"):
                claim_socket_path(path)
        finally:
            claim.release()
    assert os.listdir(tmp_path) == []
    assert upgrade_module._handed_claim(path, {**endpoint, "ours": False}) is None
