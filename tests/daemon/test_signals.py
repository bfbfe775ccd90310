"""Stop signals are the daemon's from its first moment to its last (vgpud/daemon.py ``run``).

A signal audit found both ends open: SIGTERM while the GPU was still being waited for (or
the sockets made) killed the daemon outright, and a second signal while stopping hit the
default action in the middle of clean-up.
"""

from __future__ import annotations

import functools
import importlib.abc
import os
import signal
import sys
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
import structlog.testing
import trio

import vgpud
from tests.serve_process import read_log_until, serve_args, start, stop
from vgpud import daemon, entry
from vgpud.client import VfioUserClient
from vgpud.config import DaemonConfig, single_device
from vgpud.signals import (
    HELD_SIGNALS_ENV,
    STATUS_SIGNAL,
    STOP_SIGNALS,
    EarlySignals,
    HeldSignals,
)

ENGINES = [
    "python",
    pytest.param(
        "libvfio-user",
        marks=pytest.mark.skipif(
            not os.environ.get("VGPUD_LIBVFIO_USER"),
            reason="VGPUD_LIBVFIO_USER is not set: the libvfio-user engine needs a local build",
        ),
    ),
]


def one_gpu(tmp_path: Path, engine: str = "python") -> DaemonConfig:
    """A 4 GiB gh200 on tmp_path/gpu0.sock, its memory in tmp_path/mem."""
    device = single_device(
        socket_path=tmp_path / "gpu0.sock", memory_size="4GiB", backing_dir=tmp_path / "mem"
    )
    return DaemonConfig((device,), engine=engine)


def test_sigterm_while_waiting_for_the_gpu_is_a_clean_stop(tmp_path: Path) -> None:
    proc = start(serve_args(tmp_path, "--ready-delay", "60", "--log-format", "json"), tmp_path)
    read_log_until(proc, "waiting for the device to become ready")
    log = stop(proc)  # asserts exit status 0
    assert '"event": "stopping"' in log and '"signal": "SIGTERM"' in log
    assert "Traceback" not in log
    assert not (tmp_path / "gpu0.sock").exists()
    assert (tmp_path / "mem" / "usemem").exists(), "device memory kept"


async def test_a_second_signal_while_stopping_is_only_logged(tmp_path: Path) -> None:
    config = one_gpu(tmp_path)
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


@pytest.mark.parametrize("engine", ENGINES)
async def test_sigusr1_logs_each_devices_status_and_stops_nothing(
    tmp_path: Path, engine: str
) -> None:
    """``kill -USR1``: one "status" line per device (its default action killed the daemon
    and left its sockets behind)."""
    config = one_gpu(tmp_path, engine)
    # The Python engine counts the session's VERSION too; libvfio-user answers it itself.
    messages = 4 if engine == "python" else 3
    with structlog.testing.capture_logs() as logs, trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            [server] = await nursery.start(functools.partial(daemon.run, config))
            ram = os.memfd_create("guest-ram", os.MFD_CLOEXEC)
            os.ftruncate(ram, 1 << 20)
            async with await VfioUserClient.connect(tmp_path / "gpu0.sock") as client:
                await client.dma_map(0, 1 << 20, fd=ram)
                os.close(ram)
                await client.region_write(4, 0x1000, b"\xa5" * 8)  # BAR4: usemem
                await client.region_read(7, 0, 4)
                # The libvfio-user engine counts what vfu_run_ctx returns, on the device's
                # thread, after the reply went out: the client can be faster.
                while server.status()["messages"] < messages:  # noqa: ASYNC110
                    await trio.sleep(0.001)
                signal.raise_signal(signal.SIGUSR1)
                await wait_for_event(logs, "status")
                await client.region_read(7, 0, 4)  # still served
            await server.wait_idle()
            signal.raise_signal(signal.SIGUSR1)
            await wait_for_event(logs, "status", count=2)
            nursery.cancel_scope.cancel()
    first, second = (e for e in logs if e["event"] == "status")
    assert first["device"] == "gpu0" and first["engine"] == engine
    assert (first["client"], first["connections"], first["messages"]) == (1, 1, messages)
    assert first["dma_maps"] == 1
    # The (sparse) memory files hold the page the client wrote, and not much more (a
    # filesystem may allocate ahead).
    assert os.sysconf("SC_PAGE_SIZE") <= first["memory_allocated"] <= 1 << 20
    assert (second["client"], second["connections"], second["dma_maps"]) == (None, 1, 0)
    assert second["memory_allocated"] == first["memory_allocated"]  # kept
    assert not any(e["event"] == "stopping" for e in logs)


async def wait_for_event(logs: Sequence[Mapping[str, Any]], event: str, count: int = 1) -> None:
    """Until ``count`` lines of ``event`` were logged (a signal reaches trio's receiver from
    the C handler's wake-up fd: no event to wait on from here)."""
    while sum(e["event"] == event for e in logs) < count:  # noqa: ASYNC110
        await trio.sleep(0.001)


@pytest.mark.parametrize("engine", ENGINES)
def test_stop_signals_outside_run_are_neither_lost_nor_fatal(tmp_path: Path, engine: str) -> None:
    """As the CLI runs the daemon: EarlySignals installed, then ``trio.run``. A SIGTERM before
    ``run`` takes the signals over stops it at once, cleanly; one after it has given them
    back is swallowed (its default action used to kill the process that had just stopped).
    Under the libvfio-user engine the stop came before the device's thread had started,
    and was taken for a thread that would not stop: 5 s, then an error line (a review
    found it)."""
    taken = (*STOP_SIGNALS, STATUS_SIGNAL)  # restored: tests/conftest.py
    config = one_gpu(tmp_path, engine)
    with EarlySignals() as early, structlog.testing.capture_logs() as logs:
        signal.raise_signal(signal.SIGTERM)  # before run(): remembered
        trio.run(functools.partial(daemon.run, config, early=early))
        for signum in taken:  # after run(): this process would die here without them
            signal.raise_signal(signum)
    for signum in taken:  # ... and here, once the CLI is done with the daemon
        signal.raise_signal(signum)
    assert early.received == [signal.SIGTERM, *taken]
    assert [(e["event"], e.get("signal")) for e in logs][:1] == [("stopping", "SIGTERM")]
    assert not any(e["event"] == "ready" for e in logs), "it served before stopping"
    assert not any(e["log_level"] == "error" for e in logs), logs
    assert not (tmp_path / "gpu0.sock").exists()


def test_signals_held_for_an_upgrade_are_recorded_and_given_back() -> None:
    """vgpud.signals.HeldSignals: one that reaches a thread that does not block it (its C
    handler runs there, the Python one on the main thread) is recorded for the next
    process, and given to the daemon's own handler if the upgrade does not happen."""
    got: list[int] = []
    previous = signal.signal(signal.SIGUSR1, lambda signum, _frame: got.append(signum))
    held = HeldSignals()
    go = threading.Event()

    def raise_when_told() -> None:
        go.wait()
        signal.raise_signal(signal.SIGUSR1)

    # Started before the hold, so it does not block the signal (a thread inherits the mask
    # of the thread that starts it): a thread that never ran through quiet_thread.
    other = threading.Thread(target=raise_when_told)
    other.start()
    try:
        held.hold()
        go.set()
        other.join()
        assert held.received == [signal.SIGUSR1]
        assert held.environment() == {HELD_SIGNALS_ENV: str(int(signal.SIGUSR1))}
        assert got == []
    finally:
        held.release()
        signal.signal(signal.SIGUSR1, previous)
    assert got == [signal.SIGUSR1]


def test_a_signal_the_previous_process_held_reaches_the_next(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(HELD_SIGNALS_ENV, f"{int(signal.SIGTERM)}")
    with EarlySignals() as early:
        assert early.received == [signal.SIGTERM]
    assert HELD_SIGNALS_ENV not in os.environ
