"""The stand-in of a live upgrade: a fork of the daemon that serves its VMs while the next
process starts, then hands everything to it (vgpud/upgrade.py).

Why: the exec'd process spends 0.2-0.4 s starting its interpreter and importing its code
before it can serve (benchmarks/upgrade.py, on the 2-CPU development VM), and with the
devices frozen across the exec a VM's trapped access made meanwhile waited that long. So the
daemon forks just before it execs. The fork -- the stand-in -- serves every device from its
copy of the state (the memory is in shared files, the eventfds and sockets are the kernel's)
until the next process has imported its code and asks; then it brings the sessions to rest,
describes them exactly as the daemon would have, sends the description and every fd it names
over a socket, and exits. A VM waits only for that last step. The daemon keeps its pid: it is
the one that execs, and the stand-in is its child.

1. The daemon, its sessions at rest, makes a close-on-exec pipe and a SOCK_SEQPACKET
   socketpair and forks (:func:`fork`).
2. The stand-in reads the pipe before serving anything. End of file means the exec went
   through: the kernel closes the daemon's end only past exec's point of no return. A byte
   means the exec failed: the stand-in exits at once, and the daemon, whose state nothing
   has touched, serves on.
3. The next process finds ``VGPUD_STANDIN=fd:pid`` and, once imported, sends
   :data:`TAKE_OVER` (:func:`take_over`). The stand-in answers with records of up to
   :data:`FDS_PER_RECORD` fds, each naming the numbers those fds had in the stand-in, and a
   last record carrying a memfd with the document (:func:`hand_over`). The next process puts
   each fd at its old number, so the document reads as one handed across an exec.
4. The next process serves at once and reaps the stand-in afterwards (:class:`Exiting`):
   waiting for it to exit first held the VMs up by another 1-4 ms (its address space
   torn down, on the 2-CPU development VM), for nothing, as it serves no more.

If the stand-in does not answer (it died, or the socket says something else) the next
process kills it and starts afresh, as it does with a document it cannot read.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import socket
from collections.abc import Callable, Mapping, Sequence

import trio

from vgpud.server.transport import close_fds

STANDIN_ENV = "VGPUD_STANDIN"
TAKE_OVER = b"take over"
FDS_PER_RECORD = 250  # SCM_RIGHTS carries at most 253 fds per message (SCM_MAX_FD)
RECORD_SIZE = 64 * 1024  # a record's JSON: 250 fd numbers, well under this
# Seconds the next process waits for the whole handover: the stand-in may first wait
# FREEZE_TIMEOUT (5 s) for a client half-way through a message, cut it and wait again.
TAKE_OVER_TIMEOUT = 15.0
# Seconds a stand-in that has handed over gets to exit before it is killed: it only
# flushes its log and exits, in a few ms.
EXIT_TIMEOUT = 5.0


class StandInError(Exception):
    """The stand-in did not hand over (the message says why)."""


def fork(exec_next: Callable[[Mapping[str, str]], object]) -> socket.socket:
    """Fork a stand-in, then call ``exec_next`` with the environment entries that tell the
    next process where the stand-in is; ``exec_next`` execs, or raises.

    Returns only in the stand-in, once the exec went through: the socket on which the next
    process will ask. In the daemon an exec that fails re-raises here, after the stand-in
    has exited having served nothing."""
    daemon_end, stand_in_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    exec_read, exec_write = os.pipe()  # close-on-exec, both
    try:
        pid = os.fork()
    except BaseException:
        for sock in (daemon_end, stand_in_end):
            sock.close()
        os.close(exec_read)
        os.close(exec_write)
        raise
    if pid == 0:
        daemon_end.close()
        os.close(exec_write)
        failed = os.read(exec_read, 1)
        os.close(exec_read)
        if failed:
            os._exit(0)
        return stand_in_end
    stand_in_end.close()
    os.close(exec_read)
    try:
        os.set_inheritable(daemon_end.fileno(), True)
        exec_next({STANDIN_ENV: f"{daemon_end.fileno()}:{pid}"})
        raise AssertionError("exec_next returned")
    except BaseException:
        with contextlib.suppress(OSError):
            os.write(exec_write, b"x")
        os.close(exec_write)
        os.waitpid(pid, 0)
        daemon_end.close()
        raise


def hand_over(control: socket.socket, document: bytes, fds: Sequence[int]) -> None:
    """In the stand-in: send ``document`` and the ``fds`` it names to the next process."""
    control.setblocking(True)
    for start in range(0, len(fds), FDS_PER_RECORD):
        chunk = list(fds[start : start + FDS_PER_RECORD])
        socket.send_fds(control, [json.dumps({"fds": chunk}).encode()], chunk)
    memfd = memfd_holding(document)
    try:
        socket.send_fds(control, [json.dumps({"document": len(document)}).encode()], [memfd])
    finally:
        os.close(memfd)


def memfd_holding(document: bytes) -> int:
    """A memfd (close-on-exec) holding ``document``, read from its start: how a handover
    document travels, with a stand-in or across a plain exec."""
    memfd = os.memfd_create("vgpud-handover", os.MFD_CLOEXEC)
    try:
        os.write(memfd, document)
        os.lseek(memfd, 0, os.SEEK_SET)
    except BaseException:
        os.close(memfd)
        raise
    return memfd


class Exiting:
    """A stand-in that has handed over and is exiting, not yet reaped."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        # Opened once every fd of the handover is placed, so that it takes none of their
        # numbers; the pid cannot be reused meanwhile, as the stand-in is our child.
        self._pidfd: int | None = None
        try:
            self._pidfd = os.pidfd_open(pid)
        except OSError:  # none to wait on (EMFILE, say): wait for the stand-in here
            _reap(pid)

    async def reaped(self) -> bool:
        """Wait for the stand-in to exit, and reap it; whether it did so by itself within
        :data:`EXIT_TIMEOUT` (if not, or if cancelled, it is killed)."""
        if self._pidfd is None:
            return True  # reaped already
        exited = False
        try:
            with trio.move_on_after(EXIT_TIMEOUT):
                await trio.lowlevel.wait_readable(self._pidfd)
                exited = True
        finally:
            self.stop(kill=not exited)
        return exited

    def stop(self, *, kill: bool = True) -> None:
        """Kill the stand-in (unless ``kill`` is false) and reap it; once only."""
        pidfd, self._pidfd = self._pidfd, None
        if pidfd is None:
            return
        try:
            if kill:
                with contextlib.suppress(ProcessLookupError):
                    signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        finally:
            os.close(pidfd)
            _reap(self.pid)


def take_over(raw: str) -> tuple[int, Exiting, list[int]]:
    """In the next process, ``raw`` being :data:`STANDIN_ENV`'s value: ask the stand-in for
    everything and put each fd it sends at the number it had there. Returns a memfd
    holding the document, the stand-in, exiting, for the caller to reap once it serves,
    and the numbers the fds were put at (for the caller to close should the document be
    unusable). Raises :class:`StandInError` having closed what it received and stopped the
    stand-in."""
    try:
        fd_text, pid_text = raw.split(":")
        fd, pid = int(fd_text), int(pid_text)
    except ValueError:
        raise StandInError(f"{STANDIN_ENV}={raw!r} is not fd:pid") from None
    try:
        with socket.socket(fileno=fd) as control:
            control.settimeout(TAKE_OVER_TIMEOUT)
            control.send(TAKE_OVER)
            received, memfd = _receive(control)
    except (OSError, ValueError, StandInError) as exc:
        _stop(pid)
        raise StandInError(f"the stand-in did not hand over: {exc}") from exc
    # The control socket is closed: its number may be one of those the stand-in used.
    try:
        memfd = _place(received, memfd)
    except BaseException:
        _stop(pid)
        raise
    return memfd, Exiting(pid), [number for _, number in received]


def _receive(control: socket.socket) -> tuple[list[tuple[int, int]], int]:
    """The fds (each with its number in the stand-in) and the document's memfd."""
    received: list[tuple[int, int]] = []
    try:
        while True:
            data, fds, flags, _ = socket.recv_fds(
                control, RECORD_SIZE, FDS_PER_RECORD, socket.MSG_CMSG_CLOEXEC
            )
            if not data:
                close_fds(fds)
                raise StandInError("it closed the socket before the document")
            if flags & (socket.MSG_CTRUNC | socket.MSG_TRUNC):
                close_fds(fds)
                raise StandInError("a record was cut short")
            try:
                try:
                    record = json.loads(data)
                except RecursionError:
                    raise StandInError("a record nests too deep") from None
                if "document" in record:
                    if len(fds) != 1:
                        raise StandInError(f"the document came with {len(fds)} fds, not 1")
                    return received, fds[0]
                numbers = [int(number) for number in record["fds"]]
                if len(numbers) != len(fds):
                    raise StandInError(f"{len(fds)} fds came named {len(numbers)} numbers")
            except (ValueError, KeyError, TypeError, StandInError):
                close_fds(fds)
                raise
            received += zip(fds, numbers, strict=True)
    except BaseException:
        close_fds([fd for fd, _ in received])
        raise


def _place(received: Sequence[tuple[int, int]], memfd: int) -> int:
    """Put each received fd at the number it had in the stand-in (close-on-exec); return
    where ``memfd`` is now. Refuses (StandInError, everything closed) a number below 3 or
    taken by anything else of this process."""
    numbers = [number for _, number in received]
    # Where each fd of the handover is now (the memfd last), and which one each number holds.
    at = [fd for fd, _ in received] + [memfd]
    holder = {fd: index for index, fd in enumerate(at)}
    try:
        if len(set(numbers)) != len(numbers) or min(numbers, default=3) < 3:
            raise StandInError("the stand-in named its fds with numbers that cannot be kept")
        for number in numbers:
            if number not in holder and _is_open(number):
                raise StandInError(f"fd {number} is taken in this process")
        # Each goes straight to its number, once whichever fd of the handover is there has
        # moved to the lowest free one: one fd more than were received at most, however
        # near RLIMIT_NOFILE the stand-in's numbers are (a client may hold DMA mappings up
        # to its share of it: vgpud/budget.py).
        for index, number in enumerate(numbers):
            fd = at[index]
            if fd == number:
                continue
            other = holder.pop(number, None)
            if other is not None:
                moved = fcntl.fcntl(number, fcntl.F_DUPFD_CLOEXEC, 3)
                at[other], holder[moved] = moved, other
                os.close(number)
            os.dup2(fd, number, inheritable=False)
            at[index], holder[number] = number, index
            del holder[fd]
            os.close(fd)
        return at[-1]
    except BaseException:
        close_fds(at)
        raise


def _is_open(fd: int) -> bool:
    try:
        fcntl.fcntl(fd, fcntl.F_GETFD)
    except OSError:
        return False
    return True


def _stop(pid: int) -> None:
    """The stand-in will not hand over: make sure it serves no more, and reap it."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    _reap(pid)


def _reap(pid: int) -> None:
    """Wait for the stand-in, which exits as soon as it has sent (or was killed)."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)
