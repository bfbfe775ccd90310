"""Stop signals are the daemon's from its first moment to its last (vgpud/daemon.py ``run``).

A signal audit found both ends open: SIGTERM while the GPU was still being waited for (or
the sockets made) killed the daemon outright, and a second signal while stopping hit the
default action in the middle of clean-up.
"""

from __future__ import annotations

import functools
import importlib.abc
import signal
import sys
from pathlib import Path

import pytest
import structlog.testing
import trio

import vgpud
from tests.serve_process import read_log_until, serve_args, start, stop
from vgpud import daemon, entry
from vgpud.config import DaemonConfig, single_device


def test_sigterm_while_waiting_for_the_gpu_is_a_clean_stop(tmp_path: Path) -> None:
    proc = start(serve_args(tmp_path, "--ready-delay", "60", "--log-format", "json"), tmp_path)
    read_log_until(proc, "waiting for the device to become ready")
    log = stop(proc)  # asserts exit status 0
    assert '"event": "stopping"' in log and '"signal": "SIGTERM"' in log
    assert "Traceback" not in log
    assert not (tmp_path / "gpu0.sock").exists()
    assert (tmp_path / "mem" / "usemem").exists(), "device memory kept"


async def test_a_second_signal_while_stopping_is_only_logged(tmp_path: Path) -> None:
    config = DaemonConfig(
        (
            single_device(
                socket_path=tmp_path / "gpu0.sock",
                memory_size="4GiB",
                backing_dir=tmp_path / "mem",
            ),
        )
    )
    with structlog.testing.capture_logs() as logs, trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(functools.partial(daemon.run, config))
            # Two different signals, so that neither the kernel nor trio merges them; no
            # checkpoint between, so the second comes while the first is being acted on.
            signal.raise_signal(signal.SIGTERM)
            signal.raise_signal(signal.SIGINT)
    events = [(e["event"], e.get("signal")) for e in logs if "stopping" in e["event"]]
    assert events == [("stopping", "SIGTERM"), ("already stopping", "SIGINT")]
    assert logs[-1]["event"] == "stopped"
    assert not (tmp_path / "gpu0.sock").exists()


class _InterruptedImport(importlib.abc.MetaPathFinder):
    """Ctrl-C landing while ``vgpud.cli`` (and trio, structlog, ...) is being imported."""

    def find_spec(self, fullname: str, path: object, target: object = None) -> None:
        if fullname == "vgpud.cli":
            raise KeyboardInterrupt


def test_ctrl_c_while_the_cli_is_imported_is_a_quiet_exit(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delitem(sys.modules, "vgpud.cli", raising=False)
    monkeypatch.delattr(vgpud, "cli", raising=False)
    monkeypatch.setattr(sys, "meta_path", [_InterruptedImport(), *sys.meta_path])
    assert entry.main(["--version"]) == 130
    assert capsys.readouterr() == ("", "")
