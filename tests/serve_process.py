"""``vgpud serve`` as a process of its own, for tests that need one (a daemon that crashes or
blocks must not take the test run with it, and the CLI is what users run).

Readiness is READY=1 on the test's own NOTIFY_SOCKET (the ``notify_socket`` fixture, in
tests/conftest.py); with ``--log-format json`` the daemon's log can be read event by event.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

VGPUD = [sys.executable, "-m", "vgpud"]
NOTIFY_TIMEOUT = 30.0  # seconds; a hang guard only


def notify_socket_at(tmp_path: Path) -> Iterator[socket.socket]:
    """The datagram socket the daemon sends READY=1 to (NOTIFY_SOCKET=tmp_path/notify)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify"))
    sock.settimeout(NOTIFY_TIMEOUT)
    yield sock
    sock.close()


def serve_args(tmp_path: Path, *extra: str) -> list[str]:
    """``serve`` for one device on ``tmp_path/gpu0.sock``, its memory in ``tmp_path/mem``."""
    socket_path, memory = tmp_path / "gpu0.sock", tmp_path / "mem"
    return ["serve", "--socket-path", str(socket_path), "--backing-dir", str(memory), *extra]


def run_vgpud(
    *args: str, pass_fds: Sequence[int] = (), timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """``vgpud ARGS`` to its end: exit status and output, whatever the status (``timeout``
    is a hang guard)."""
    return subprocess.run(
        [*VGPUD, *args],
        pass_fds=pass_fds,
        capture_output=True,
        text=True,
        check=False,
        timeout=timeout,
    )


def start(
    args: list[str],
    tmp_path: Path,
    *,
    blocked: Sequence[int] = (),
    interpreter: Path | None = None,
    **env: str,
) -> subprocess.Popen[str]:
    """``vgpud *args`` with NOTIFY_SOCKET pointing at ``notify_socket``; stdout and stderr
    are pipes (the daemon writes its log to stderr). ``blocked``: signals the process starts
    with blocked, so that one sent before it unblocks them waits for it, wherever it is.
    ``interpreter``: the Python to run it with (:func:`interpreter_link`)."""

    def block() -> None:
        signal.pthread_sigmask(signal.SIG_BLOCK, blocked)

    environment = dict(os.environ, NOTIFY_SOCKET=str(tmp_path / "notify"), **env)
    return subprocess.Popen(
        [str(interpreter or sys.executable), "-m", "vgpud", *args],
        env=environment,
        stderr=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        preexec_fn=block if blocked else None,  # noqa: PLW1509 (no threads to deadlock: it only blocks)
    )


def interpreter_link(directory: Path, *, broken: bool = False) -> Path:
    """``directory/bin/python``: this interpreter through a symlink a test can point at
    nothing (``broken``) and back, to fail a daemon's upgrade at its exec when the check
    before it passed (an upgrade runs ``sys.executable``, the path the daemon was started
    by). ``directory`` is made a venv of the same packages when this interpreter is a venv's."""
    link = directory / "bin" / "python"
    link.parent.mkdir(parents=True, exist_ok=True)
    link.unlink(missing_ok=True)
    link.symlink_to(directory / "no-such-python" if broken else Path(sys.executable))
    if sys.prefix != sys.base_prefix:  # pyvenv.cfg next to bin/ makes the directory the venv
        (directory / "pyvenv.cfg").write_bytes((Path(sys.prefix) / "pyvenv.cfg").read_bytes())
        if not (directory / "lib").is_symlink():
            (directory / "lib").symlink_to(Path(sys.prefix) / "lib")
    return link


def stop(proc: subprocess.Popen[str], signum: int = signal.SIGTERM, *, check: bool = True) -> str:
    """Stop the daemon and (``check``) assert it exited cleanly; what it logged after any
    :func:`read_log_until`. ``check=False`` is for ``finally`` blocks."""
    proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=30)
    if check:
        assert proc.returncode == 0, stderr
    return stderr


def read_log_until(proc: subprocess.Popen[str], event: str) -> tuple[dict[str, Any], str]:
    """Read the daemon's JSON log up to the first ``event``: that record, and every line read
    (its end first fails the test: the daemon exited)."""
    assert proc.stderr is not None
    lines: list[str] = []
    while True:
        line = proc.stderr.readline()
        assert line, "the daemon's log ended: " + "".join(lines)
        lines.append(line)
        record = json.loads(line)
        if record.get("event") == event:
            return record, "".join(lines)


def read_log_until_one_of(proc: subprocess.Popen[str], *events: str) -> dict[str, Any]:
    """The first record of the daemon's JSON log that is one of ``events``."""
    assert proc.stderr is not None
    while True:
        line = proc.stderr.readline()
        assert line, "the daemon's log ended"
        record: dict[str, Any] = json.loads(line)
        if record.get("event") in events:
            return record
