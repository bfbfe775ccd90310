"""A live upgrade: on SIGUSR2 the daemon re-executes itself, and every VM keeps its GPU.

Why: QEMU 11.1.3 never reconnects a vfio-user device (docs/operations.md, "The VM's life
cycle"), so restarting vgpud -- to install a fix, say -- takes the GPU from every running VM.
An upgrade instead hands everything a VM depends on to the next process, which is the same
process (same pid, so the service manager sees no restart) running the code now on disk:

1. *Refused* up front, with the daemon serving on, when something cannot be handed over: a
   device served by the libvfio-user engine (its connection state lives inside the C
   library), or a passthrough device on a kernel that cannot give DMA mappings a new
   process's addresses (backends/vfio/device.py, ``handover_refusal``).
2. *The new code is checked*: the same command line runs once with ``VGPUD_UPGRADE_CHECK=1``
   and must parse its options and configuration as a start would, then say which handover
   formats it reads (vgpud.cli). A broken install or a configuration it rejects refuses the
   upgrade while everything still serves.
3. *Freeze*: no device accepts (a client connecting now waits in the socket's backlog for
   the next process), and every attached client's session comes to rest between two
   messages: nothing of a message read, no reply owed (vgpud.server.session). A session that
   does not within :data:`FREEZE_TIMEOUT` (a client stuck half-way through a message) refuses
   the upgrade, and everything thaws.
4. *Fork a stand-in, and exec* (vgpud/stand_in.py): a fork of the daemon serves every device
   while the next process starts, and describes them when it asks -- one JSON document: per
   device its settings, its listening socket, the attached client's socket, connection state
   and DMA mappings, and the device's state with the client's eventfds -- then sends the
   document and every fd it names over a socket and exits. The next process puts each fd at
   the number it had, so the document names fds by number. A VM's access waits only for
   that handover, not for the next process's start-up (docs/operations.md, "Upgrade").
   Without a stand-in (a passthrough device: the kernel ties its DMA mappings to the
   daemon's own process) the daemon describes the devices itself, puts the document in a
   memfd, makes every fd it names inheritable and execs with ``VGPUD_HANDOVER_FD`` naming
   the memfd; fds keep their numbers across exec. Either way nothing runs between the last
   check and the describing (no await), so nothing changes under the description.
5. *Take over* (:func:`read_handover`, :func:`resume`): the next process builds each device
   from its carried settings (an upgrade changes the code, not the configuration: a reload
   applies an edited file), lets it take its state over, listens on the same socket and
   resumes each session where it stood. Then READY=1 and one "upgraded" line.

A document the next process cannot read makes it start afresh from its configuration,
closing every fd it names (the VMs then lose their GPUs, as with a restart); a device it
cannot take over is dropped the same way, and the others are served.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import trio

from backends.device import HandsOver
from vgpud import __version__, stand_in, systemd
from vgpud.budget import MIN_DMA_MAPS, BudgetError, dma_map_limit
from vgpud.config import DeviceConfig
from vgpud.devices import BuiltDevice, take_over_device
from vgpud.fleet import Endpoint, Fleet, LiveDevice
from vgpud.memory_files import MemoryFiles
from vgpud.server.listener import DeviceServer, peer_credentials
from vgpud.server.socket_files import SocketClaim, lock_socket_path
from vgpud.server.transport import close_fds
from vgpud.signals import HeldSignals, quiet_thread

HANDOVER_ENV = "VGPUD_HANDOVER_FD"
CHECK_ENV = "VGPUD_UPGRADE_CHECK"
FORMAT = 1  # of the handover document; the next process says which it reads
FREEZE_TIMEOUT = 5.0  # seconds every session has to come to rest (QEMU waits 5 s per reply)
CHECK_TIMEOUT = 60.0  # seconds the new code has to parse its command line
CHECK_NICENESS = 10  # the check runs this much nicer than the daemon (_lower_priority)


class UpgradeRefusedError(Exception):
    """The upgrade cannot be done now; the daemon serves on (message for the log)."""


@dataclass
class Handover:
    """A handover document, read in the next process."""

    devices: list[dict[str, Any]]
    version: str
    # CLOCK_MONOTONIC when the devices were frozen for the handover: by the stand-in, or
    # by the previous process just before its exec
    upgrading_ns: int
    stand_in_ms: float | None = None  # how long a stand-in served (None: there was none)
    # The stand-in that handed over, still to be reaped once the devices are served
    exiting: stand_in.Exiting | None = None


def check_reply() -> str:
    """What ``vgpud serve`` prints under ``VGPUD_UPGRADE_CHECK`` (step 2)."""
    return json.dumps({"handover_formats": [FORMAT], "stand_in": True, "version": __version__})


def command_line() -> list[str]:
    """The command line this process was started with, to run again."""
    return [sys.executable, *sys.orig_argv[1:]]


async def upgrade(
    fleet: Fleet,
    log: Any,
    *,
    argv: Sequence[str] | None = None,
    due: Callable[[], Sequence[int]] = tuple,
) -> None:
    """Upgrade (module docstring); returns only when the upgrade did not happen, logged.
    ``due``: the signals of requests (a reload, another upgrade) the daemon took and has yet
    to act on, for the next process to act on instead."""
    argv = list(argv) if argv is not None else command_line()
    log.info("upgrading", devices=len(fleet.devices))
    servers: list[DeviceServer] = []
    held: HeldSignals | None = None
    try:
        servers = _servers(fleet)
        takes_stand_in = await _check_new_code(argv)
        # From here until the exec, or until the upgrade is refused, the daemon's signals
        # are held aside (HeldSignals): a stop then waits at most FREEZE_TIMEOUT, for the
        # thaw or for the next process, instead of being lost with this one (found by a
        # test run under load: trio's signal task took a SIGTERM, then the exec came).
        held = HeldSignals()
        held.hold()
        reason = stand_in_refusal(fleet) if takes_stand_in else "the new code cannot take it"
        log.info(
            "new code checked; bringing the clients to rest",
            clients=_clients(servers),
            stand_in=reason is None,
            **({} if reason is None else {"no_stand_in": reason}),
        )
        for server in servers:
            server.freeze()
        if not await come_to_rest(servers):
            busy = [server.name for server in servers if not server.at_rest]
            raise UpgradeRefusedError(
                f"a client stayed in the middle of a message for {FREEZE_TIMEOUT:.0f} s "
                f"(devices {', '.join(busy)})"
            )
        # From here to the exec, no await: nothing can change what is described, nor what
        # is due (a reload asked for while the new code was checked, say).
        held.received += due()
        if reason is None:
            forked_ns = time.monotonic_ns()
            exec_next = functools.partial(_exec_next, argv, held=held)
            control = stand_in.fork(exec_next)  # returns only in the stand-in
            await _stand_in(control, fleet, servers, log, forked_ns)
        try:
            document, fds = describe(fleet)
            _exec(argv, document, fds, held)
        except BaseException:
            _abandon(fleet, log)
            raise
    except UpgradeRefusedError as exc:
        log.warning("upgrade refused", reason=str(exc))
    except Exception:
        # A bug, or exec failed: the devices are still ours, frozen; thaw them.
        log.exception("upgrade failed; serving on")
    finally:
        for server in servers:
            server.thaw()
        if held is not None:
            held.release()  # a stop held meanwhile now stops the daemon


async def come_to_rest(servers: Sequence[DeviceServer]) -> bool:
    """Whether every frozen server came to rest within :data:`FREEZE_TIMEOUT`."""
    with trio.move_on_after(FREEZE_TIMEOUT):
        while not all(server.at_rest for server in servers):
            # One that rested may read on while another is awaited (a message that had
            # arrived; it rests again once that is served): all at once, or again.
            for server in servers:
                await server.wait_at_rest()
    return all(server.at_rest for server in servers)


def stand_in_refusal(fleet: Fleet) -> str | None:
    """Why a fork cannot serve every device while the next process starts, or None."""
    for live in fleet.devices:
        device = live.built.device
        assert isinstance(device, HandsOver), "_servers() checked"
        refusal = device.stand_in_refusal()
        if refusal is not None:
            return f"device {live.config.name}: {refusal}"
    return None


async def _stand_in(
    control: socket.socket,
    fleet: Fleet,
    servers: Sequence[DeviceServer],
    log: Any,
    forked_ns: int,
) -> NoReturn:
    """The stand-in (vgpud/stand_in.py): serve every device until the next process asks,
    then hand everything over and exit. Never returns: nothing of the daemon's own ending
    (the stop's clean-up, the held signals, which the next process has) may run here."""
    os.environ.pop("NOTIFY_SOCKET", None)  # the service manager hears the daemon's pid only
    handed = False
    try:
        handed = await _serve_until_asked(control, fleet, servers, log, forked_ns)
    except BaseException:
        log.exception("the stand-in failed; its VMs lose their GPUs")
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(0 if handed else 1)


async def _serve_until_asked(
    control: socket.socket,
    fleet: Fleet,
    servers: Sequence[DeviceServer],
    log: Any,
    forked_ns: int,
) -> bool:
    """The stand-in's work; whether it handed over."""
    for server in servers:
        server.thaw()
    log.info("stand-in serving while the new code starts", pid=os.getpid())
    await trio.lowlevel.wait_readable(control)
    if control.recv(len(stand_in.TAKE_OVER)) != stand_in.TAKE_OVER:
        log.error("the new code did not take over; the stand-in stops, its VMs lose their GPUs")
        return False
    asked_ns = time.monotonic_ns()
    for server in servers:
        server.freeze()
    if not await come_to_rest(servers):
        # The exec is done: the upgrade cannot be refused any more.
        for server in servers:
            for connection in server.cut_unrested():
                log.error(
                    "client stayed in the middle of a message; cut off for the upgrade",
                    device=server.name,
                    connection=connection,
                    seconds=FREEZE_TIMEOUT,
                )
        if not await come_to_rest(servers):
            raise RuntimeError("the devices did not come to rest")
    document, fds = describe(fleet, upgrading_ns=asked_ns)
    document["stand_in_ms"] = round((asked_ns - forked_ns) / 1e6, 1)
    stand_in.hand_over(control, json.dumps(document).encode(), fds)
    return True


def _abandon(fleet: Fleet, log: Any) -> None:
    """The exec did not happen: every device serves on as before it was described (one that
    cannot is logged; the others are still given back theirs)."""
    for live in fleet.devices:
        device = live.built.device
        if isinstance(device, HandsOver):
            try:
                device.handover_abandoned()
            except Exception:
                log.exception(
                    "device could not take back what it let go of", device=live.config.name
                )


def _clients(servers: Sequence[DeviceServer]) -> int:
    return sum(server.active is not None for server in servers)


def _servers(fleet: Fleet) -> list[DeviceServer]:
    """Every device's server, when all can be handed over (UpgradeRefusedError otherwise)."""
    servers: list[DeviceServer] = []
    for live in fleet.devices:
        if not isinstance(live.server, DeviceServer):
            raise UpgradeRefusedError(
                f"device {live.config.name} is served by the libvfio-user engine, whose "
                "connection state cannot leave the library: restart instead"
            )
        device = live.built.device
        if not isinstance(device, HandsOver):
            raise UpgradeRefusedError(
                f"device {live.config.name} ({type(device).__name__}) cannot be handed over: "
                "restart instead"
            )
        refusal = device.handover_refusal()
        if refusal is not None:
            raise UpgradeRefusedError(f"device {live.config.name}: {refusal}; restart instead")
        servers.append(live.server)
    return servers


async def _check_new_code(argv: Sequence[str]) -> bool:
    """Step 2 of the module docstring; whether the new code takes over from a stand-in."""
    env = {**os.environ, CHECK_ENV: "1"}
    env.pop(HANDOVER_ENV, None)

    # Not trio.run_process: its reaper thread would take signals (vgpud.signals.quiet_thread).
    # Abandoned if the daemon stops meanwhile: the check only parses, and exits by itself.
    def check() -> subprocess.CompletedProcess[bytes]:
        with subprocess.Popen(
            list(argv),
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        ) as proc:
            _lower_priority(proc.pid)
            try:
                out, err = proc.communicate(timeout=CHECK_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()
                raise
            return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)

    try:
        done = await trio.to_thread.run_sync(quiet_thread(check), abandon_on_cancel=True)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise UpgradeRefusedError(f"the new code could not be checked: {exc}") from exc
    if done.returncode != 0:
        said = done.stderr.decode(errors="replace").strip().splitlines()
        raise UpgradeRefusedError(
            f"the new code refuses this command line (exit {done.returncode}): "
            f"{said[-1] if said else 'no message'}"
        )
    try:
        reply = json.loads(done.stdout)
        formats = reply["handover_formats"]
    except (ValueError, KeyError, TypeError) as exc:
        raise UpgradeRefusedError("the new code cannot take a handover (no upgrade check)") from exc
    if FORMAT not in formats:
        raise UpgradeRefusedError(f"the new code reads handover formats {formats}, not {FORMAT}")
    return reply.get("stand_in") is True


def _lower_priority(pid: int) -> None:
    """Make the check (a whole interpreter start-up, about a quarter of a second of CPU) yield
    to the daemon: at the daemon's own priority it competes with the sessions it checks for.
    On the 2-CPU development VM a client's p99 during the check was 1.5-4.6 ms that way and
    0.25-0.87 ms with the check at CHECK_NICENESS (benchmarks.upgrade, ``check_p99_us``, the
    median of five upgrades, six or seven runs each), the check no slower on an idle host. Best
    effort: a check left at the daemon's priority only costs latency. (Set after the spawn:
    the few microseconds before are nothing next to the check's start-up.)"""
    try:
        own = os.getpriority(os.PRIO_PROCESS, 0)
        os.setpriority(os.PRIO_PROCESS, pid, min(own + CHECK_NICENESS, 19))
    except OSError:
        pass  # the check already gone (ESRCH), or a sandbox forbids it


def describe(fleet: Fleet, *, upgrading_ns: int | None = None) -> tuple[dict[str, Any], list[int]]:
    """The handover document for the devices of ``fleet`` (all :attr:`DeviceServer.at_rest`),
    and every fd it names. ``upgrading_ns``: when the devices were frozen for it (now)."""
    devices: list[dict[str, Any]] = []
    every_fd: list[int] = []
    for live in fleet.devices:
        entry, fds = _describe_device(live)
        devices.append(entry)
        every_fd += fds
    document = {
        "format": FORMAT,
        "version": __version__,
        "upgrading_ns": time.monotonic_ns() if upgrading_ns is None else upgrading_ns,
        "devices": devices,
    }
    return document, sorted(set(every_fd))


def _describe_device(live: LiveDevice) -> tuple[dict[str, Any], list[int]]:
    server, endpoint, device = live.server, live.endpoint, live.built.device
    assert isinstance(server, DeviceServer) and isinstance(device, HandsOver)
    assert endpoint.sock is not None, "the Python engine serves a socket of the daemon's"
    server_state, server_fds = server.handover()
    device_state, device_fds = device.handover()
    claim = endpoint.claim
    lock_fds = [] if claim is None else [claim.lock_fd]
    fds = sorted({endpoint.sock.fileno(), *lock_fds, *server_fds, *device_fds})
    entry = {
        "config": live.config.to_json(),
        "endpoint": {
            "path": str(endpoint.path),
            "fd": endpoint.sock.fileno(),
            "ours": endpoint.ours,
            "connected": endpoint.connected,
            # The lock on the path goes with it (vgpud/server/socket_files.py), and which
            # file the socket is, so that only that file is removed at stop.
            "lock_fd": None if claim is None else claim.lock_fd,
            "socket_file": None if claim is None else claim.socket_file,
        },
        "server": server_state,
        "device": device_state,
        "fds": fds,
    }
    return entry, fds


def _exec(
    argv: Sequence[str], document: Mapping[str, Any], fds: Iterable[int], held: HeldSignals
) -> None:
    """Step 4 without a stand-in: hand ``document`` and ``fds`` to the process ``argv``
    starts, by exec. Returns only by raising, with the fds this process's again."""
    memfd = stand_in.memfd_holding(json.dumps(document).encode())
    inheritable: list[int] = []
    try:
        for fd in (memfd, *fds):
            os.set_inheritable(fd, True)
            inheritable.append(fd)
        _exec_next(argv, {HANDOVER_ENV: str(memfd)}, held=held)
    except BaseException:
        for fd in inheritable:
            with contextlib.suppress(OSError):
                os.set_inheritable(fd, False)
        os.close(memfd)
        raise


def _exec_next(argv: Sequence[str], handover_env: Mapping[str, str], *, held: HeldSignals) -> None:
    """Exec ``argv``, telling it where its handover is (``handover_env``). Returns only by
    raising."""
    systemd.notify(f"RELOADING=1\nMONOTONIC_USEC={time.monotonic_ns() // 1000}")
    sys.stdout.flush()
    sys.stderr.flush()
    # The signals stay blocked across the exec (the mask is inherited), and those held so
    # far are named to the next process.
    env = {**os.environ, **handover_env, **held.environment()}
    try:
        os.execve(argv[0], list(argv), env)
    except BaseException:
        systemd.notify("READY=1")
        raise


# -- the next process ------------------------------------------------------------------------


def read_handover() -> Handover | None:
    """The handover document the previous process left (``VGPUD_HANDOVER_FD``), or None
    when this is a plain start. The fds it names are made close-on-exec again. Raises
    ValueError for a document that cannot be read, having closed every fd it named."""
    from_stand_in = os.environ.pop(stand_in.STANDIN_ENV, None)
    raw = os.environ.pop(HANDOVER_ENV, None)
    if from_stand_in is None and raw is None:
        return None
    exiting: stand_in.Exiting | None = None
    # The fds a stand-in sent: closed should the document be unusable, even where it does
    # not name them. (Across a plain exec, only the document tells which are the handover's.)
    placed: list[int] = []
    try:
        if from_stand_in is not None:
            memfd, exiting, placed = stand_in.take_over(from_stand_in)
        else:
            assert raw is not None
            memfd = int(raw)
        with os.fdopen(memfd, "rb") as memory:
            document = json.loads(memory.read())
    except stand_in.StandInError as exc:
        raise ValueError(str(exc)) from exc
    except (ValueError, OSError, RecursionError) as exc:  # RecursionError: nested too deep
        _give_up(placed, exiting)
        raise ValueError(f"handover document unreadable: {exc}") from exc
    try:
        return _handover(document, exiting)
    except BaseException:
        # Those it named are closed already: closing them again finds them closed, as
        # nothing has opened a file since.
        _give_up(placed, exiting)
        raise


def _give_up(placed: list[int], exiting: stand_in.Exiting | None) -> None:
    close_fds(placed)
    if exiting is not None:
        exiting.stop()


def _handover(document: object, exiting: stand_in.Exiting | None) -> Handover:
    """The :class:`Handover` ``document`` describes (ValueError, its fds closed, if none)."""
    if not isinstance(document, dict):
        raise ValueError("handover document is not a JSON object")
    devices = document.get("devices")
    fds = _named_fds(devices)
    for fd in fds:
        with contextlib.suppress(OSError):
            os.set_inheritable(fd, False)
    try:
        if document.get("format") != FORMAT or not isinstance(devices, list):
            raise ValueError(
                f"handover document of format {document.get('format')!r}, not {FORMAT}"
            )
        return Handover(
            devices=devices,
            version=str(document.get("version")),
            upgrading_ns=int(document.get("upgrading_ns", 0)),
            stand_in_ms=_optional_float(document.get("stand_in_ms")),
            exiting=exiting,
        )
    except (ValueError, TypeError) as exc:
        close_fds(fds)
        raise ValueError(str(exc)) from exc


def _optional_float(value: object) -> float | None:
    return float(value) if isinstance(value, int | float) else None


def _named_fds(devices: object) -> list[int]:
    if not isinstance(devices, list):
        return []
    named: set[int] = set()
    for device in devices:
        fds = device.get("fds") if isinstance(device, dict) else None
        if isinstance(fds, list):
            named.update(fd for fd in fds if type(fd) is int and fd >= 0)
    return sorted(named)


@dataclass
class Resumed:
    """What :func:`resume` took over."""

    devices: int = 0
    clients: int = 0
    client_pids: tuple[int, ...] = ()  # the VMMs attached: their mappings are expected


async def resume(handover: Handover, fleet: Fleet, log: Any) -> Resumed:
    """Serve the devices of ``handover`` in ``fleet`` (step 5). A device that cannot be taken
    over is logged and dropped, every fd it names closed; the others are served."""
    rebuilt: list[tuple[BuiltDevice, MemoryFiles, Endpoint, Mapping[str, Any]]] = []
    for entry in handover.devices:
        try:
            built, files, endpoint = _rebuild(entry)
        except Exception as exc:  # any failure drops this device only
            log.error(
                "device could not be taken over; its VM loses it",
                device=_name(entry),
                error=f"{type(exc).__name__}: {exc}",
            )
            # Those the device had taken over its release closed already: closing them
            # again finds them closed, as nothing opens a file in between.
            close_fds(_named_fds([entry]))
            _remove_socket(entry)
            continue
        rebuilt.append((built, files, endpoint, entry["server"]))
    try:
        fleet.share(dma_map_limit([built.device for built, _, _, _ in rebuilt]))
    except BudgetError as exc:
        # The limits were enough before the exec; the attached clients keep theirs.
        log.warning("DMA-map budget", error=str(exc))
        fleet.share(MIN_DMA_MAPS)
    resumed = Resumed()
    pids: list[int] = []
    while rebuilt:
        built, files, endpoint, server_state = rebuilt.pop(0)
        client = server_state.get("client")
        if client is not None:
            pid = _peer_pid(int(client["fd"]))
            if pid:
                pids.append(pid)
            resumed.clients += 1
        try:
            await fleet.start(built, files, endpoint, handed=server_state)
        except BaseException:
            for later, _, later_endpoint, _ in rebuilt:  # cancelled: the daemon stops
                later_endpoint.close()
                later.release()
            raise
        resumed.devices += 1
    resumed.client_pids = tuple(pids)
    return resumed


def _name(entry: Mapping[str, Any]) -> str:
    config = entry.get("config")
    return str(config.get("name", "?")) if isinstance(config, Mapping) else "?"


def _peer_pid(fd: int) -> int | None:
    """The pid of the process at the other end of the connected socket ``fd`` (left open)."""
    try:
        with socket.socket(fileno=os.dup(fd)) as sock:
            return peer_credentials(sock).get("peer_pid")
    except OSError:
        return None


def _rebuild(entry: Mapping[str, Any]) -> tuple[BuiltDevice, MemoryFiles, Endpoint]:
    """One device of the document, built afresh from its settings with its state taken
    over, and its endpoint; raises for anything that does not fit."""
    config = DeviceConfig.from_json(entry["config"])
    raw_endpoint = entry["endpoint"]
    path = Path(raw_endpoint["path"])
    built = take_over_device(config, entry["device"])
    try:
        files = MemoryFiles(built.device)
        sock = socket.socket(fileno=int(raw_endpoint["fd"]))
        claim = _handed_claim(path, raw_endpoint)
    except BaseException:
        built.release()
        raise
    endpoint = Endpoint(path, sock, claim, connected=bool(raw_endpoint["connected"]))
    return built, files, endpoint


def _handed_claim(path: Path, raw_endpoint: Mapping[str, Any]) -> SocketClaim | None:
    """The daemon's hold on its socket path, as the previous process had it: None for an
    inherited socket. A process older than the lock (no ``lock_fd``) handed a socket it
    bound without one: the lock is taken now, and the file at the path is taken for the
    one it bound."""
    if not raw_endpoint["ours"]:
        return None
    lock_fd = raw_endpoint.get("lock_fd")
    if lock_fd is not None:
        socket_file = raw_endpoint.get("socket_file")
        return SocketClaim(
            path,
            int(lock_fd),
            None if socket_file is None else (int(socket_file[0]), int(socket_file[1])),
        )
    claim = lock_socket_path(path)
    claim.bound()
    return claim


def _remove_socket(entry: Mapping[str, Any]) -> None:
    """The socket of a device that could not be taken over, if it still is the one the
    previous process bound (its lock fd was closed with the others)."""
    with contextlib.suppress(KeyError, TypeError, ValueError, IndexError, OSError):
        endpoint = entry["endpoint"]
        if endpoint["ours"]:
            path = Path(endpoint["path"])
            socket_file = endpoint.get("socket_file")
            if socket_file is None:
                path.unlink(missing_ok=True)  # from a process older than the lock
                return
            st = os.lstat(path)
            if (st.st_dev, st.st_ino) == (int(socket_file[0]), int(socket_file[1])):
                path.unlink()
        # Its lock file stays: unlocked now, another daemon may be taking it this moment.


def handover_ms(handover: Handover) -> float:
    """Milliseconds from the freeze for the handover to now (CLOCK_MONOTONIC): the longest
    a VM's access made meanwhile waited."""
    return round((time.monotonic_ns() - handover.upgrading_ns) / 1e6, 1)
