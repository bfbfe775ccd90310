"""Fixtures shared by every test directory."""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from socket import socket

import pytest

from tests.serve_process import notify_socket_at
from vgpud import daemon, log
from vgpud.config import DaemonConfig
from vgpud.signals import STATUS_SIGNAL, STOP_SIGNALS, UPGRADE_SIGNAL, EarlySignals

Served = list[DaemonConfig]


@pytest.fixture(autouse=True)
def _signal_handlers_restored() -> Iterator[None]:
    """``vgpud serve`` run in-process (cli.main) takes the stop signals and leaves them
    ignored, as a process about to exit should (vgpud.signals.EarlySignals), and vgpud.entry
    may leave some blocked; the test process goes on, Ctrl-C included."""
    taken = (*STOP_SIGNALS, STATUS_SIGNAL, UPGRADE_SIGNAL)
    saved = {signum: signal.getsignal(signum) for signum in taken}
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, ())  # vgpud.entry blocks some
    yield
    for signum, handler in saved.items():
        signal.signal(signum, handler)
    signal.pthread_sigmask(signal.SIG_SETMASK, mask)


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[socket]:
    """Where a ``vgpud serve`` started by :func:`tests.serve_process.start` says READY=1."""
    yield from notify_socket_at(tmp_path)


@pytest.fixture
def served(monkeypatch: pytest.MonkeyPatch) -> Served:
    """``vgpud serve`` run in-process never starts a daemon: ``daemon.run`` only records the
    configuration it was given (in the list this returns)."""
    configs: Served = []

    async def run(
        config: DaemonConfig,
        *,
        inherited_fd: int | None = None,
        early: EarlySignals | None = None,
        reload_config: Callable[[], DaemonConfig] | None = None,
        handover: object = None,
    ) -> None:
        configs.append(config)

    monkeypatch.setattr(daemon, "run", run)
    # The real one reconfigures process-wide logging, which other tests rely on.
    monkeypatch.setattr(log, "configure", lambda level, fmt: None)
    return configs
