"""What the daemon does with signals (vgpud.daemon.run takes them for its whole life).

SIGTERM and SIGINT stop it cleanly; a repeat one while stopping is only logged. SIGHUP
reloads the config file (``systemctl reload``; vgpud/fleet.py) when the daemon was started
with one, and otherwise stops it as SIGTERM does (as for QEMU: a hang-up, with nothing to
reload; its default action would leave the sockets behind). SIGUSR1 logs one "status" line
per device. SIGUSR2 upgrades the daemon in place (vgpud/upgrade.py). Outside ``run`` --
before it has taken the signals over and after it has given them back --
:class:`EarlySignals` keeps them from killing the process half-way or at the end, and a
signal taken before ``run`` is acted on by ``run`` as if it had come just then: a stop
stops it before it serves, a reload or an upgrade is done once it serves. Before that,
while the interpreter imports the daemon's code, vgpud.entry keeps SIGUSR1 and SIGUSR2
blocked (:data:`DEFERRED_SIGNALS`).
"""

from __future__ import annotations

import os
import signal
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, Protocol, TypeVar

import trio

# What stops the daemon cleanly (see vgpud.daemon.run); SIGHUP reloads instead when there
# is a config file to read again.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
RELOAD_SIGNAL = signal.SIGHUP
# Logs one "status" line per device (``kill -USR1``), instead of the default action, which
# would kill the daemon and leave its sockets behind.
STATUS_SIGNAL = signal.SIGUSR1
# Re-executes the daemon, handing every device and client over (vgpud/upgrade.py); its
# default action would kill the daemon and every VM's GPU with it.
UPGRADE_SIGNAL = signal.SIGUSR2
# Every signal the daemon handles.
TAKEN_SIGNALS = (*STOP_SIGNALS, STATUS_SIGNAL, UPGRADE_SIGNAL)
# Blocked by vgpud.entry while the interpreter imports the CLI (about a quarter of a second),
# and left pending for EarlySignals: their default action would kill a starting daemon (an
# upgrade sent as the service (re)starts). The stop signals are not among them: nothing has
# been made yet that a stop would leave behind, and Ctrl-C must end any vgpud command then.
DEFERRED_SIGNALS = (STATUS_SIGNAL, UPGRADE_SIGNAL)
T = TypeVar("T")

# Signals an upgrading process took and its next process must act on (HeldSignals).
HELD_SIGNALS_ENV = "VGPUD_HELD_SIGNALS"


class EarlySignals:
    """The daemon's signals outside :func:`vgpud.daemon.run`, for a process that runs it
    once::

        with EarlySignals() as early:
            trio.run(functools.partial(daemon.run, config, early=early))

    Entered, a signal that comes before ``run`` has taken the signals over is remembered
    (:attr:`received`), and ``run`` acts on each as it would have then: a stop signal stops
    it at once, the clean way, instead of the default action killing a daemon that may be
    making its files; a reload or an upgrade is done as soon as the daemon serves. Left, the
    signals are ignored: the daemon has stopped, and a repeat signal in the process's last
    milliseconds (trio gives the handlers back, then the interpreter's shutdown resets
    Python handlers to the default action) used to kill the process that had already
    stopped cleanly, exit status 143 instead of 0 (found by a thread audit: 17 of 25 double
    SIGTERMs).
    """

    def __init__(self) -> None:
        self.received: list[int] = []

    def __enter__(self) -> EarlySignals:
        for signum in TAKEN_SIGNALS:  # the main thread's job, as for any Python handler
            signal.signal(signum, self._remember)
        # An upgrade (vgpud/upgrade.py) execs with these blocked, so that one sent while the
        # next process imports waits for its handlers instead of killing it with every VM's
        # GPU, and names those its previous process took meanwhile (HeldSignals); a plain
        # start has DEFERRED_SIGNALS blocked by vgpud.entry, and none held. Unblocked, any
        # pending one is delivered to _remember before this returns.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, TAKEN_SIGNALS)
        held = os.environ.pop(HELD_SIGNALS_ENV, "")
        self.received += [int(signum) for signum in held.split(",") if signum.isdigit()]
        return self

    def __exit__(self, *exc: object) -> None:
        for signum in TAKEN_SIGNALS:
            signal.signal(signum, signal.SIG_IGN)  # not reset by the interpreter's shutdown

    def _remember(self, signum: int, _frame: object) -> None:
        self.received.append(signum)


def quiet_thread(function: Callable[[], T]) -> Callable[[], T]:
    """``function``, to run on a worker thread that takes none of the daemon's signals (the
    main thread's job): from its first call on, the thread blocks them for good. A signal
    the kernel hands a worker thread instead is seen only once the main thread runs Python
    again, which an upgrade's exec never does (HeldSignals), so the daemon runs its worker
    threads through this."""

    def quietly() -> T:
        signal.pthread_sigmask(signal.SIG_BLOCK, TAKEN_SIGNALS)
        return function()

    return quietly


class HeldSignals:
    """The daemon's signals taken aside while it upgrades (vgpud/upgrade.py), from the freeze
    to the exec: blocked in the main thread (the mask survives the exec, so one sent while
    the next process imports waits for it), and any that reaches another thread recorded
    instead of going to the daemon's signal task, which the exec would end with them unseen.
    If the upgrade does not happen, :meth:`release` gives them to the daemon's handlers;
    if it does, :meth:`environment` names them to the next process (:class:`EarlySignals`).
    Only one that arrives inside the exec call itself can be lost."""

    def __init__(self) -> None:
        self.received: list[int] = []
        self._saved: dict[int, Any] = {}

    def hold(self) -> None:
        """From now on (main thread)."""
        for signum in TAKEN_SIGNALS:
            self._saved[signum] = signal.signal(signum, self._remember)
        signal.pthread_sigmask(signal.SIG_BLOCK, TAKEN_SIGNALS)

    def release(self) -> None:
        """The daemon's handlers back, and the signals held raised to them."""
        for signum, handler in self._saved.items():
            signal.signal(signum, handler)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, TAKEN_SIGNALS)
        received, self.received = self.received, []
        for signum in received:
            signal.raise_signal(signum)

    def environment(self) -> dict[str, str]:
        """For the next process: the signals held so far."""
        return {HELD_SIGNALS_ENV: ",".join(str(signum) for signum in self.received)}

    def _remember(self, signum: int, _frame: object) -> None:
        self.received.append(signum)


class StatusReporter(Protocol):
    """A served device, as the status signal sees it."""

    name: str

    def status(self) -> dict[str, Any]:
        """What the "status" line says about the device."""


async def handle_signals(
    signals: AsyncIterator[int],
    scope: trio.CancelScope,
    servers: Sequence[StatusReporter],
    log: Any,
    early: Sequence[int] = (),
    *,
    reload: Callable[[], None] | None = None,
    upgrade: Callable[[], None] | None = None,
    task_status: trio.TaskStatus[trio.CancelScope] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Cancel ``scope`` at the first stop signal, and keep taking signals until told to
    stop (the scope handed to ``task_status``): shielded, so it outlives the cancellation
    it caused and a repeat signal during clean-up is logged, not fatal. The status signal
    logs what ``servers`` (the devices listening now) say about themselves. With
    ``reload``, SIGHUP calls it (it must not block) instead of stopping; SIGUSR2 calls
    ``upgrade`` (likewise), and is only logged without one. ``early``: the signals taken
    before ``run`` took them over (EarlySignals), handled first, in the order they came."""

    def handle(signum: int) -> None:
        if signum == STATUS_SIGNAL:
            for server in servers:
                log.info("status", device=server.name, **server.status())
            return
        name = signal.Signals(signum).name
        if scope.cancel_called:
            log.info("already stopping", signal=name)
        elif signum == RELOAD_SIGNAL and reload is not None:
            reload()
        elif signum == UPGRADE_SIGNAL:
            if upgrade is None:
                log.warning("cannot upgrade before the daemon serves", signal=name)
            else:
                upgrade()
        else:
            log.info("stopping", signal=name)
            scope.cancel()

    with trio.CancelScope(shield=True) as own:
        task_status.started(own)
        for signum in early:
            handle(signum)
        async for signum in signals:
            handle(signum)
