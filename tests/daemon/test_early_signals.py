"""A signal sent while ``vgpud serve`` starts is acted on once the daemon can, never fatal.

Before, SIGUSR2 (upgrade) or SIGUSR1 (status) during the quarter of a second the interpreter
spends importing the CLI killed the daemon by their default action, and SIGHUP before the
daemon served stopped it even when it had a config file to reload (vgpud/signals.py,
vgpud/entry.py).
"""

from __future__ import annotations

import importlib.abc
import signal
import socket
import sys
from pathlib import Path

import pytest

import vgpud
from tests.daemon.test_reload import write_tray
from tests.serve_process import read_log_until, start, stop
from vgpud import entry
from vgpud.signals import DEFERRED_SIGNALS


class _MaskAtImport(importlib.abc.MetaPathFinder):
    """Records the main thread's signal mask when ``vgpud.cli`` is imported."""

    def __init__(self) -> None:
        self.mask: set[int] | None = None

    def find_spec(self, fullname: str, path: object, target: object = None) -> None:
        if fullname == "vgpud.cli":
            self.mask = set(signal.pthread_sigmask(signal.SIG_BLOCK, ()))


def test_the_upgrade_and_status_signals_wait_while_the_cli_is_imported(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    recorder = _MaskAtImport()
    monkeypatch.delitem(sys.modules, "vgpud.cli", raising=False)
    monkeypatch.delattr(vgpud, "cli", raising=False)
    monkeypatch.setattr(sys, "meta_path", [recorder, *sys.meta_path])
    signal.pthread_sigmask(signal.SIG_UNBLOCK, DEFERRED_SIGNALS)  # as a process starts

    assert entry.main(["layout", "--profile", "gh200"]) == 0
    assert "profile gh200" in capsys.readouterr().out
    assert recorder.mask is not None and set(DEFERRED_SIGNALS) <= recorder.mask
    # Not a daemon: the command takes them as any program does.
    assert not set(DEFERRED_SIGNALS) & set(signal.pthread_sigmask(signal.SIG_BLOCK, ()))


@pytest.mark.parametrize(
    ("signum", "event"), [(signal.SIGUSR2, "upgraded"), (signal.SIGHUP, "reloaded")]
)
def test_an_upgrade_or_reload_asked_while_the_daemon_starts_is_done_once_it_serves(
    tmp_path: Path, notify_socket: socket.socket, signum: int, event: str
) -> None:
    """The signal is pending from the process's first instruction on (the test starts it
    blocked, as vgpud.entry blocks SIGUSR2 while the CLI is imported), so it lands before
    the daemon serves whatever the timing."""
    config = tmp_path / "tray.toml"
    write_tray(config, {"gpu0": ""})
    args = ["serve", "--config", str(config), "--log-format", "json"]
    proc = start(args, tmp_path, blocked=(signum,))
    try:
        proc.send_signal(signum)
        record, lines = read_log_until(proc, event)
        assert '"event": "ready"' in lines, "done before the daemon served"
        assert '"event": "stopping"' not in lines, lines
        assert notify_socket.recv(64) == b"READY=1"
        assert notify_socket.recv(64).startswith(b"RELOADING=1\nMONOTONIC_USEC=")
        assert notify_socket.recv(64) == b"READY=1"
        if signum == signal.SIGUSR2:
            assert (record["pid"], record["devices"]) == (proc.pid, 1)
        else:
            assert record["devices"] == 1
    finally:
        log = stop(proc, check=False)
    assert proc.returncode == 0, log
    assert not (tmp_path / "gpu0.sock").exists()
