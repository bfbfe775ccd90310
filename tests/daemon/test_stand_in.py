"""The stand-in of a live upgrade (vgpud/stand_in.py): a fork of the daemon serves the VMs
while the next process starts, then hands everything over a socket.

The daemon tests hold the next process at its interpreter's start-up with a gate: a
``sitecustomize`` module on PYTHONPATH that, in a process started with ``VGPUD_STANDIN`` (only
the next process is), opens a FIFO and reads it to its end, which comes when the test opens
it for writing and closes it. So what the client sees between the stand-in's first line and
the gate's opening was served by the stand-in, and nothing else. The wire tests run the
stand-in's half in a forked child of the test process.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import resource
import signal
import socket
import struct
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

import protocol as p
from backends.synthetic.bar0 import SCRATCH
from tests.serve_process import (
    VGPUD,
    read_log_until,
    read_log_until_one_of,
    serve_args,
    start,
    stop,
)
from vgpud import stand_in
from vgpud.client import VfioUserClient, VfioUserError
from vgpud.server.transport import close_fds
from vgpud.upgrade import FREEZE_TIMEOUT, read_handover

BAR0 = 0
PAGE = 4096
GATE_MODULE = """\
import os

if os.environ.get("NO_STAND_IN"):  # upgrade as a fleet with a passthrough device does
    from backends.synthetic.device import SyntheticGpu

    SyntheticGpu.stand_in_refusal = lambda self: "refused by the test"
upgraded = os.environ.get("VGPUD_STANDIN") or os.environ.get("VGPUD_HANDOVER_FD")
if upgraded and os.environ.get("GATE"):
    with open(os.environ["GATE"]) as gate:
        gate.read()
"""


def start_gated(tmp_path: Path, *, no_stand_in: bool = False) -> subprocess.Popen[str]:
    """A daemon whose upgraded process waits at start-up until :func:`open_gate`."""
    (tmp_path / "gate-module").mkdir()
    (tmp_path / "gate-module" / "sitecustomize.py").write_text(GATE_MODULE)
    os.mkfifo(tmp_path / "gate")
    proc = start(
        [*serve_args(tmp_path, "--memory-size", "2GiB"), "--log-format", "json"],
        tmp_path,
        PYTHONPATH=str(tmp_path / "gate-module"),
        GATE=str(tmp_path / "gate"),
        NO_STAND_IN="1" if no_stand_in else "",
    )
    read_log_until(proc, "ready")
    return proc


@pytest.fixture
def gated(tmp_path: Path, notify_socket: socket.socket) -> Iterator[subprocess.Popen[str]]:
    """A gated daemon (:func:`start_gated`) that upgrades with a stand-in."""
    proc = start_gated(tmp_path)
    yield proc
    stop_gated(tmp_path, proc)


@pytest.fixture
def gated_plain(tmp_path: Path, notify_socket: socket.socket) -> Iterator[subprocess.Popen[str]]:
    """A gated daemon that upgrades without a stand-in (its devices frozen across the exec)."""
    proc = start_gated(tmp_path, no_stand_in=True)
    yield proc
    stop_gated(tmp_path, proc)


def stop_gated(tmp_path: Path, proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        with contextlib.suppress(OSError):  # a test that failed before opening the gate
            os.close(os.open(tmp_path / "gate", os.O_WRONLY | os.O_NONBLOCK))
        try:
            stop(proc, check=False)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()


async def open_gate(tmp_path: Path) -> None:
    async with held_at_gate(tmp_path):
        pass


@contextlib.asynccontextmanager
async def held_at_gate(tmp_path: Path) -> AsyncIterator[None]:
    """Inside, the next process is past its exec, held at its start-up; it goes on after."""
    # Opening the FIFO's write end returns once the next process has opened its read end.
    gate = await trio.to_thread.run_sync(os.open, tmp_path / "gate", os.O_WRONLY)
    try:
        yield
    finally:
        os.close(gate)


async def log_until(proc: subprocess.Popen[str], event: str) -> tuple[dict[str, Any], str]:
    return await trio.to_thread.run_sync(read_log_until, proc, event)


async def test_the_stand_in_serves_while_the_next_process_starts_and_hands_its_state_on(
    tmp_path: Path, gated: subprocess.Popen[str]
) -> None:
    """What the client writes while the stand-in serves is what the next process serves."""
    async with await VfioUserClient.connect(tmp_path / "gpu0.sock") as client:
        await client.region_write(BAR0, SCRATCH, struct.pack("<I", 7))
        gated.send_signal(signal.SIGUSR2)
        serving, _ = await log_until(gated, "stand-in serving while the new code starts")
        stand_in_pid = serving["pid"]
        assert stand_in_pid != gated.pid
        # The daemon's own process is held at its start-up: the stand-in answers these.
        assert await client.region_read(BAR0, SCRATCH, 4) == struct.pack("<I", 7)
        await client.region_write(BAR0, SCRATCH, struct.pack("<I", 9))
        with pytest.raises(VfioUserError, match="busy"):  # one client per device, here too
            await VfioUserClient.connect(tmp_path / "gpu0.sock")
        await open_gate(tmp_path)
        upgraded, lines = await log_until(gated, "upgraded")
        assert upgraded["pid"] == gated.pid
        assert upgraded["clients"] == 1
        assert upgraded["stand_in_ms"] > 0
        assert "refusing a second client" in lines
        assert await client.region_read(BAR0, SCRATCH, 4) == struct.pack("<I", 9)
    with pytest.raises(ProcessLookupError):  # exited, and reaped by the daemon
        os.kill(stand_in_pid, 0)


async def test_a_stand_in_that_dies_leaves_the_next_process_to_start_afresh(
    tmp_path: Path, gated: subprocess.Popen[str]
) -> None:
    """The VM loses its GPU, as at a restart; the daemon serves the next client."""
    async with await VfioUserClient.connect(tmp_path / "gpu0.sock") as client:
        gated.send_signal(signal.SIGUSR2)
        serving, _ = await log_until(gated, "stand-in serving while the new code starts")
        os.kill(serving["pid"], signal.SIGKILL)
        with pytest.raises((p.ProtocolError, OSError, trio.BrokenResourceError, EOFError)):
            await client.region_read(BAR0, SCRATCH, 4)
    await open_gate(tmp_path)
    afresh = "upgrade failed: the handover cannot be read; starting afresh"
    failed, _ = await log_until(gated, afresh)
    assert "the stand-in did not hand over" in failed["error"]
    await log_until(gated, "ready")
    async with await VfioUserClient.connect(tmp_path / "gpu0.sock") as client:
        assert len(await client.region_read(BAR0, SCRATCH, 4)) == 4
    with pytest.raises(ProcessLookupError):
        os.kill(serving["pid"], 0)


async def test_a_client_half_way_through_a_message_is_cut_off_once_the_exec_is_done(
    tmp_path: Path, gated: subprocess.Popen[str]
) -> None:
    """After the exec the upgrade cannot be refused: the stand-in waits FREEZE_TIMEOUT for
    the client, cuts it off, and hands the device over; the next client is served."""
    async with await VfioUserClient.connect(tmp_path / "gpu0.sock") as client:
        await client.region_write(BAR0, SCRATCH, struct.pack("<I", 7))
        gated.send_signal(signal.SIGUSR2)
        await log_until(gated, "stand-in serving while the new code starts")
        read = p.RegionReadRequest(region=BAR0, offset=SCRATCH, count=4)
        wire = client.conn.send_request(read)[1].data
        client.stream.socket.send(wire[: p.HEADER_SIZE])
        await open_gate(tmp_path)
        cut, _ = await log_until(
            gated, "client stayed in the middle of a message; cut off for the upgrade"
        )
        assert cut["seconds"] == FREEZE_TIMEOUT
        upgraded, _ = await log_until(gated, "upgraded")
        assert upgraded["clients"] == 0
        client.stream.socket.settimeout(10)  # shut already: the cut came before "upgraded"
        assert client.stream.socket.recv(1) == b""
    async with await VfioUserClient.connect(tmp_path / "gpu0.sock") as client:
        assert await client.region_read(BAR0, SCRATCH, 4) == struct.pack("<I", 7)


def locked_by_someone(directory: Path) -> bool:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


@pytest.mark.parametrize("how", ["stand-in", "no-stand-in"])
async def test_the_backing_directory_stays_locked_while_the_next_process_starts(
    tmp_path: Path, how: str, request: pytest.FixtureRequest
) -> None:
    """The lock that keeps a second device or daemon off the memory files is handed over
    as the locked fd itself. Before, it was the process's own: across a plain exec the
    directory was free for the whole start-up of the next process."""
    daemon = request.getfixturevalue("gated" if how == "stand-in" else "gated_plain")
    async with await VfioUserClient.connect(tmp_path / "gpu0.sock") as client:
        await client.region_write(BAR0, SCRATCH, struct.pack("<I", 7))
        daemon.send_signal(signal.SIGUSR2)
        checked, _ = await log_until(daemon, "new code checked; bringing the clients to rest")
        assert checked["stand_in"] is (how == "stand-in")
        async with held_at_gate(tmp_path):
            assert locked_by_someone(tmp_path / "mem")
        upgraded, _ = await log_until(daemon, "upgraded")
        assert upgraded["devices"] == upgraded["clients"] == 1
        assert locked_by_someone(tmp_path / "mem")
        assert await client.region_read(BAR0, SCRATCH, 4) == struct.pack("<I", 7)
    stop(daemon)
    assert not locked_by_someone(tmp_path / "mem")


# -- the wire, in-process ----------------------------------------------------------------------


def open_fds() -> set[int]:
    return {int(name) for name in os.listdir("/proc/self/fd")}


def fork_stand_in(send: Any) -> str:
    """A child that waits for TAKE_OVER and then runs ``send(control)``; the value
    :func:`stand_in.take_over` is given."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    pid = os.fork()
    if pid == 0:  # pragma: no cover (the child)
        status = 1
        try:
            ours.close()
            if theirs.recv(64) == stand_in.TAKE_OVER:
                send(theirs)
                status = 0
        finally:
            os._exit(status)
    theirs.close()
    return f"{ours.detach()}:{pid}"


def free_numbers(count: int) -> list[int]:
    """``count`` consecutive fd numbers free here, well above those in use."""
    start = max(open_fds()) + 16
    return list(range(start, start + count))


@pytest.mark.parametrize("count", [2, stand_in.FDS_PER_RECORD + 50])
def test_each_fd_arrives_at_the_number_it_had_and_the_document_with_them(count: int) -> None:
    read_end, write_end = os.pipe()
    numbers = free_numbers(count)
    document = json.dumps({"devices": [], "numbers": numbers}).encode()
    before = open_fds()

    def send(control: socket.socket) -> None:
        for number in numbers:
            os.dup2(write_end, number)
        stand_in.hand_over(control, document, numbers)

    memfd, exiting, _ = stand_in.take_over(fork_stand_in(send))
    exiting.stop(kill=False)  # it exits by itself once it has sent
    try:
        with os.fdopen(os.dup(memfd), "rb") as memory:
            assert memory.read() == document
        assert open_fds() - before == {memfd, *numbers}
        for number in numbers:
            assert os.fstat(number).st_ino == os.fstat(write_end).st_ino
            assert not os.get_inheritable(number)
        os.write(numbers[-1], b"!")
        assert os.read(read_end, 1) == b"!"
    finally:
        for fd in (memfd, *numbers, read_end, write_end):
            os.close(fd)


@pytest.mark.parametrize(
    "document",
    [b"not json", b"[]", b'{"format": 0, "devices": []}'],
    ids=["not json", "not an object", "naming none of them"],
)
def test_a_stand_in_document_unusable_closes_every_fd_it_came_with(
    document: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The next process then starts afresh: the fds the stand-in sent (a VM's socket, its
    DMA memory) are closed, so the VMM sees its device go instead of a socket nobody reads."""
    read_end, write_end = os.pipe()
    numbers = free_numbers(3)
    before = open_fds()

    def send(control: socket.socket) -> None:
        for number in numbers:
            os.dup2(write_end, number)
        stand_in.hand_over(control, document, numbers)

    monkeypatch.setenv(stand_in.STANDIN_ENV, fork_stand_in(send))
    with pytest.raises(ValueError, match="handover document"):
        read_handover()
    assert open_fds() == before
    os.close(write_end)
    assert os.read(read_end, 1) == b""  # no copy of the write end left anywhere
    os.close(read_end)


def still_running(pid: int) -> bool:
    """Whether our child ``pid`` has not exited."""
    return os.waitpid(pid, os.WNOHANG) == (0, 0)


def reaped(pid: int) -> bool:
    """Whether our child ``pid`` was reaped already (the test reaps it if not)."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return True
    return False


def handing_over() -> Any:
    """A stand-in that hands over a document and exits."""

    def send(control: socket.socket) -> None:
        stand_in.hand_over(control, b'{"devices": []}', [])

    return send


def lingering(release: int) -> Any:
    """A stand-in that hands over a document and then stays until ``release`` is readable
    (a pipe's read end): the next process must not wait for it."""

    def send(control: socket.socket) -> None:
        stand_in.hand_over(control, b'{"devices": []}', [])
        os.read(release, 1)

    return send


async def test_the_next_process_goes_on_while_the_stand_in_exits_and_reaps_it_after() -> None:
    release_read, release_write = os.pipe()
    before = open_fds()
    raw = fork_stand_in(lingering(release_read))
    pid = int(raw.split(":")[1])
    memfd, exiting, _ = stand_in.take_over(raw)  # returns with the stand-in still there
    os.close(memfd)
    assert still_running(pid)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(exiting.reaped)
        await trio.testing.wait_all_tasks_blocked()
        assert still_running(pid)  # waited for, not killed
        os.write(release_write, b"x")
    assert reaped(pid)
    assert open_fds() == before  # the control socket, the memfd and the pidfd closed
    for fd in (release_read, release_write):
        os.close(fd)


async def test_without_a_pidfd_the_stand_in_is_waited_for_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """No fd to spare for a pidfd: the next process waits for the stand-in as it did
    before it learnt to serve first, and goes on."""

    def no_pidfd(_: int) -> int:
        raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))

    monkeypatch.setattr(os, "pidfd_open", no_pidfd)
    memfd, exiting, _ = stand_in.take_over(fork_stand_in(handing_over()))
    os.close(memfd)
    assert reaped(exiting.pid)
    assert await exiting.reaped()


async def test_a_stand_in_that_does_not_exit_after_handing_over_is_killed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(stand_in, "EXIT_TIMEOUT", 0.2)
    release_read, release_write = os.pipe()
    raw = fork_stand_in(lingering(release_read))
    memfd, exiting, _ = stand_in.take_over(raw)
    os.close(memfd)
    assert not await exiting.reaped()
    assert reaped(exiting.pid)
    for fd in (release_read, release_write):
        os.close(fd)


async def test_a_stand_in_is_killed_when_the_next_process_stops_before_reaping_it() -> None:
    release_read, release_write = os.pipe()
    raw = fork_stand_in(lingering(release_read))
    memfd, exiting, _ = stand_in.take_over(raw)
    os.close(memfd)
    with trio.move_on_after(0):  # cancelled at once, as a stop signal would
        await exiting.reaped()
    assert reaped(exiting.pid)
    exiting.stop()  # once only: nothing more to do
    for fd in (release_read, release_write):
        os.close(fd)


def hostile(records: list[tuple[bytes, int]]) -> Any:
    """A stand-in that sends each (payload, how many fds) record: the fds are pipes."""

    def send(control: socket.socket) -> None:
        for payload, fds in records:
            pipes = [os.pipe()[0] for _ in range(fds)]
            socket.send_fds(control, [payload], pipes)

    return send


@pytest.mark.parametrize(
    ("records", "says"),
    [
        ([], "closed the socket before the document"),
        ([(b'{"fds": [1]}', 1), (b'{"document": 2}', 1)], "cannot be kept"),
        ([(b'{"fds": [500, 500]}', 2), (b'{"document": 2}', 1)], "cannot be kept"),
        ([(b'{"fds": [500, 501]}', 1)], "1 fds came named 2 numbers"),
        ([(b'{"document": 2}', 2)], "came with 2 fds"),
        ([(b"not json", 3)], "did not hand over"),
        ([(b'{"fds": "x"}', 1)], "did not hand over"),
        ([(b"[" * 60000, 1)], "nests too deep"),  # RecursionError: it escaped all handling
    ],
)
def test_a_stand_in_sending_nonsense_is_refused_with_nothing_left_open(
    records: list[tuple[bytes, int]], says: str
) -> None:
    before = open_fds()
    raw = fork_stand_in(hostile(records))
    with pytest.raises(stand_in.StandInError, match=says):
        stand_in.take_over(raw)
    assert open_fds() == before
    with pytest.raises(ChildProcessError):  # reaped
        os.waitpid(int(raw.split(":")[1]), 0)


def test_a_number_taken_here_is_refused_and_left_alone() -> None:
    taken = os.open("/dev/null", os.O_RDONLY)
    free = free_numbers(1)[0]
    before = open_fds()
    record = json.dumps({"fds": [free, taken]}).encode()
    raw = fork_stand_in(hostile([(record, 2), (b'{"document": 2}', 1)]))
    with pytest.raises(stand_in.StandInError, match=f"fd {taken} is taken"):
        stand_in.take_over(raw)
    assert open_fds() == before
    assert os.fstat(taken).st_ino == os.stat("/dev/null").st_ino
    os.close(taken)


def test_a_value_that_is_not_fd_and_pid_is_refused() -> None:
    with pytest.raises(stand_in.StandInError, match="not fd:pid"):
        stand_in.take_over("7")


def test_fds_numbered_up_to_the_limit_arrive_at_their_numbers() -> None:
    """A client may hold DMA mappings up to its share of RLIMIT_NOFILE (vgpud/budget.py), so
    the stand-in's fds can be numbered up to the limit, which the next process has too (the
    daemon raised it, and limits survive fork and exec). Lifting every fd above the highest
    number before putting it at its own failed there (EINVAL), and the VMs lost their GPUs."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    limit = max(open_fds()) + 256
    read_end, write_end = os.pipe()
    numbers = list(range(limit - 64, limit))
    before = open_fds()

    def send(control: socket.socket) -> None:
        for number in numbers:
            os.dup2(write_end, number)
        stand_in.hand_over(control, b"{}", numbers)

    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))
    try:
        memfd, exiting, _ = stand_in.take_over(fork_stand_in(send))
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    exiting.stop(kill=False)
    try:
        assert open_fds() - before == {memfd, *numbers}
        for number in numbers:
            assert os.fstat(number).st_ino == os.fstat(write_end).st_ino
            assert not os.get_inheritable(number)
    finally:
        close_fds([memfd, *numbers, read_end, write_end])


def test_fds_that_arrive_at_each_others_numbers_are_put_in_their_places() -> None:
    """The kernel hands received fds the lowest free numbers, which may be those others of
    the handover (or the memfd) are to have: each such one moves aside first."""
    pipes = [os.pipe() for _ in range(4)]
    fds = [read_end for read_end, _ in pipes]
    inodes = [os.fstat(fd).st_ino for fd in fds]
    memfd = stand_in.memfd_holding(b"{}")
    # A cycle, the last to where the memfd is.
    targets = [*fds[1:], memfd]

    def open_here() -> set[int]:  # not open_fds(): listdir's own fd takes a freed number
        return {fd for fd in range(max(open_fds()) + 8) if stand_in._is_open(fd)}

    before = open_here()
    moved = stand_in._place(list(zip(fds, targets, strict=True)), memfd)
    try:
        assert open_here() == (before - {fds[0]}) | {moved}
        assert [os.fstat(number).st_ino for number in targets] == inodes
        assert os.read(moved, 2) == b"{}"
        assert not any(os.get_inheritable(fd) for fd in (*targets, moved))
    finally:
        close_fds([moved, *targets, *(write_end for _, write_end in pipes)])


def start_with_fd_limit(tmp_path: Path, limit: int) -> subprocess.Popen[str]:
    """A daemon whose RLIMIT_NOFILE is ``limit``, soft and hard."""

    def lower() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))

    return subprocess.Popen(
        [*VGPUD, *serve_args(tmp_path, "--memory-size", "2GiB"), "--log-format", "json"],
        env=dict(os.environ, NOTIFY_SOCKET=str(tmp_path / "notify")),
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lower,  # noqa: PLW1509 (no threads to deadlock: it only sets a limit)
    )


async def test_a_client_with_many_dma_mappings_keeps_them_through_the_stand_in(
    tmp_path: Path, notify_socket: socket.socket
) -> None:
    """Each mapping holds two of the daemon's fds (vgpud/budget.py), so a client using much of
    its share numbers fds up to near RLIMIT_NOFILE; the next process then failed to put the
    stand-in's fds at their numbers (EINVAL) and started afresh: the VM lost its GPU."""
    limit, maps = 2048, 800
    proc = start_with_fd_limit(tmp_path, limit)
    ram = os.memfd_create("guest-ram", os.MFD_CLOEXEC)
    os.ftruncate(ram, PAGE)
    try:
        ready, _ = await log_until(proc, "ready")
        assert ready["max_dma_maps"] >= maps
        async with await VfioUserClient.connect(tmp_path / "gpu0.sock") as client:
            for index in range(maps):
                await client.dma_map(index * PAGE, PAGE, fd=ram)
            proc.send_signal(signal.SIGUSR2)
            await log_until(proc, "stand-in serving while the new code starts")
            # "ready" is what a next process that started afresh says instead.
            done = await trio.to_thread.run_sync(read_log_until_one_of, proc, "upgraded", "ready")
            assert done["event"] == "upgraded", done
            assert done["clients"] == 1
            await client.dma_unmap(0, PAGE)  # the mappings came along
    finally:
        os.close(ram)
        stop(proc, check=False)
