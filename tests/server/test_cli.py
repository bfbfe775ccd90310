"""The ``vgpud`` command as a user runs it: a real process, READY=1, probe, SIGTERM."""

from __future__ import annotations

import functools
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import trio

from tests.serve_process import VGPUD, run_vgpud, serve_args, start, stop
from tests.server.conftest import tray_config
from vgpud.client import VfioUserClient

# Inherited sockets are served by either engine (the libvfio-user one with a local build).
ENGINES = [
    pytest.param([], id="python"),
    pytest.param(
        # The path on the command line: systemd-socket-activate passes no environment.
        ["--engine", "libvfio-user", "--libvfio-user", os.environ.get("VGPUD_LIBVFIO_USER", "")],
        id="libvfio-user",
        marks=pytest.mark.skipif(
            not os.environ.get("VGPUD_LIBVFIO_USER"),
            reason="VGPUD_LIBVFIO_USER is not set: the libvfio-user engine needs a local build",
        ),
    ),
]


def test_serve_with_only_a_socket_path_then_probe(
    tmp_path: Path, notify_socket: socket.socket
) -> None:
    sock = tmp_path / "gpu0.sock"
    proc = start(serve_args(tmp_path), tmp_path)
    try:
        assert notify_socket.recv(64) == b"READY=1"
        probe = subprocess.run(
            [*VGPUD, "probe", str(sock), "--json"], capture_output=True, text=True, check=True
        )
        result = json.loads(probe.stdout)
        assert result["config"]["vendor_id"] == 0x10DE
        assert result["config"]["device_id"] == 0x2342
        regions = {r["name"]: r for r in result["regions"]}
        # The default device: gh200, 96 GiB -> 1 GiB resmem (BAR2), 128 GiB BAR4.
        assert regions["BAR2"]["size"] == 1 << 30
        assert regions["BAR4"]["size"] == 128 << 30
        for bar in ("BAR2", "BAR4"):
            assert "mmap" in regions[bar]["flags"]
            assert regions[bar]["fd_size"] == regions[bar]["sparse_areas"][0]["size"]
        assert regions["BAR4"]["sparse_areas"] == [{"offset": 0, "size": 95 << 30}]
        text = subprocess.run(
            [*VGPUD, "probe", str(sock)], capture_output=True, text=True, check=True
        ).stdout
        assert "10de:2342" in text and "MIG hardware bug: yes" in text
    finally:
        stderr = stop(proc)
    assert not sock.exists(), "socket left behind"
    assert (tmp_path / "mem" / "usemem").stat().st_size == 95 << 30, "memory file removed"
    assert '"event": "stopping"' in stderr and '"signal": "SIGTERM"' in stderr


@pytest.mark.parametrize("engine", ENGINES)
async def test_probe_of_a_device_in_use_says_why_in_one_line(
    tmp_path: Path, notify_socket: socket.socket, engine: list[str]
) -> None:
    """What users meet when they probe the device of a running VM: the refusal, explained."""
    sock = tmp_path / "gpu0.sock"
    proc = start(serve_args(tmp_path, "--memory-size", "4GiB", *engine), tmp_path)
    try:
        assert notify_socket.recv(64) == b"READY=1"
        async with await VfioUserClient.connect(sock):
            probe = await trio.to_thread.run_sync(functools.partial(run_vgpud, "probe", str(sock)))
    finally:
        stop(proc)
    assert probe.returncode == 1
    assert probe.stderr.count("\n") == 1, probe.stderr
    assert "VERSION failed: Device or resource busy (errno 16)" in probe.stderr
    assert "has a client already, e.g. its VM: one client at a time" in probe.stderr


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGHUP])
def test_sigint_and_sighup_stop_cleanly_too(
    tmp_path: Path, notify_socket: socket.socket, signum: signal.Signals
) -> None:
    """Without a config file, SIGHUP (the terminal went away, or a ``kill -HUP`` expecting
    a reload there is none to do) stops like SIGTERM, as for QEMU; its default action left
    the socket behind."""
    sock = tmp_path / "gpu0.sock"
    proc = start(serve_args(tmp_path), tmp_path)
    assert notify_socket.recv(64) == b"READY=1"
    stderr = stop(proc, signum)
    assert f'"signal": "{signum.name}"' in stderr
    assert not sock.exists()


def test_sighup_reloads_a_config_file_and_tells_the_service_manager(
    tmp_path: Path, notify_socket: socket.socket
) -> None:
    """``systemctl reload`` (ExecReload= sends SIGHUP): RELOADING=1 with the monotonic time,
    then READY=1 once the devices are what the file says (sd_notify(3)); the daemon runs on."""
    config = tray_config(tmp_path, devices=1)
    proc = start(["serve", "--config", str(config), "--log-format", "json"], tmp_path)
    try:
        assert notify_socket.recv(64) == b"READY=1"
        config = tray_config(tmp_path, devices=2)
        before = time.monotonic_ns() // 1000
        proc.send_signal(signal.SIGHUP)
        reloading, _, stamp = notify_socket.recv(128).decode().partition("\n")
        assert reloading == "RELOADING=1"
        assert before <= int(stamp.removeprefix("MONOTONIC_USEC=")) <= time.monotonic_ns() // 1000
        assert notify_socket.recv(64) == b"READY=1"
        probe = run_vgpud("probe", str(tmp_path / "gpu1.sock"))
        assert probe.returncode == 0, probe.stderr
    finally:
        stderr = stop(proc)
    assert '"event": "reloaded"' in stderr and '"added": ["gpu1"]' in stderr
    assert not (tmp_path / "gpu0.sock").exists() and not (tmp_path / "gpu1.sock").exists()


@pytest.mark.parametrize("engine", ENGINES)
def test_serve_on_an_inherited_listening_fd(
    tmp_path: Path, notify_socket: socket.socket, engine: list[str]
) -> None:
    path = tmp_path / "inherited.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(1)
    env = dict(os.environ, NOTIFY_SOCKET=str(tmp_path / "notify"))
    proc = subprocess.Popen(
        [
            *VGPUD,
            "serve",
            "--fd",
            str(listener.fileno()),
            "--backing-dir",
            str(tmp_path / "m"),
            "--memory-size",
            "4GiB",
            *engine,
        ],
        pass_fds=(listener.fileno(),),
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    listener.close()
    try:
        assert notify_socket.recv(64) == b"READY=1"
        probe = run_vgpud("probe", str(path))
        assert probe.returncode == 0, probe.stderr
        assert "BAR4    size 4GiB" in probe.stdout
    finally:
        stop(proc)
    assert path.exists(), "an inherited socket is not ours to remove"


@pytest.mark.parametrize("engine", ENGINES[1:])
def test_a_connected_fd_needs_the_python_engine(tmp_path: Path, engine: list[str]) -> None:
    """libvfio-user only accepts clients, so a connection handed over whole is refused with
    the reason (the Python engine serves it: tests/server/test_daemon.py)."""
    ours, theirs = socket.socketpair()
    serve = ["serve", "--fd", str(ours.fileno()), "--backing-dir", str(tmp_path / "m")]
    with ours, theirs:
        result = run_vgpud(*serve, "--memory-size", "4GiB", *engine, pass_fds=(ours.fileno(),))
    assert result.returncode == 1
    assert "connected, not listening" in result.stderr
    assert "python engine" in result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["serve", "--memory-size", "lots"], "memory_size"),
        (["serve", "--profile", "h100"], "unknown profile"),
        (["layout", "--memory-size", "1GiB"], "no usemem left"),
        # The same size is the same usage error for serve (it used to fail later, exit 1).
        (["serve", "--memory-size", "1GiB"], "no usemem left"),
        (["qemu-args", "--memory-size", "1GiB"], "no usemem left"),
        (["serve", "--config", "/nonexistent.toml"], "No such file"),
    ],
)
def test_bad_input_is_one_clear_line(args: list[str], message: str, tmp_path: Path) -> None:
    result = run_vgpud(
        *args,
        *(
            ["--socket-path", str(tmp_path / "s")]
            if "--config" not in args and args[0] == "serve"
            else []
        ),
    )
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--socket-group", "no-such-group-here"],
            "device gpu0: unknown group 'no-such-group-here'",
        ),
        (
            ["--vfio-device", "0000:00:03.0", "--engine", "libvfio-user"],
            "the libvfio-user engine cannot serve a vfio_device (gpu0); use the python engine",
        ),
    ],
)
def test_configuration_the_daemon_refuses_is_a_usage_error(
    args: list[str], message: str, tmp_path: Path
) -> None:
    """Found before anything is made, like the config checks: exit 2, one line (both were a
    start-up failure, exit 1, though nothing had started)."""
    result = run_vgpud("serve", "--socket-path", str(tmp_path / "s"), *args)
    assert (result.returncode, result.stderr) == (2, f"vgpud: {message}\n"), result.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command", ["serve", "qemu-args"])
def test_a_bad_memory_size_in_a_tray_names_the_device(tmp_path: Path, command: str) -> None:
    """Checked with the rest of the config, before any device is built: the first GPU's
    backing files are not made (they were, when the layout was only computed at start)."""
    config = tray_config(tmp_path)
    gpu0, gpu1 = config.read_text().split('name = "gpu1"')
    config.write_text(gpu0 + 'name = "gpu1"' + gpu1.replace('"4GiB"', '"1GiB"'))
    result = run_vgpud(command, "--config", str(config))
    assert result.returncode == 2
    assert result.stderr == "vgpud: device gpu1: no usemem left after the resmem carve-out\n"
    assert not (tmp_path / "mem0").exists()
    assert not (tmp_path / "gpu0.sock").exists()


@pytest.mark.parametrize("engine", ENGINES)
def test_refuses_to_steal_a_non_socket(tmp_path: Path, engine: list[str]) -> None:
    path = tmp_path / "not-a-socket"
    path.write_text("precious")
    serve = ["serve", "--socket-path", str(path), "--backing-dir", str(tmp_path / "m")]
    result = run_vgpud(*serve, *engine)
    assert result.returncode == 1
    # One line, the reason: no traceback (the libvfio-user engine's came out of the nursery
    # as an exception group) and no "stopped" log line before it.
    assert result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("vgpud: ") and "is not a socket" in result.stderr
    assert path.read_text() == "precious"


def _tcp_listener() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(1)
    return sock


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (_tcp_listener, "not a UNIX stream socket (AF_INET, SOCK_STREAM)"),
        (lambda: socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM), "not a UNIX stream socket"),
        (lambda: socket.socket(socket.AF_UNIX, socket.SOCK_STREAM), "neither listening nor"),
    ],
    ids=["tcp", "unix-datagram", "unbound"],
)
def test_an_inherited_fd_must_be_a_unix_stream_endpoint(
    tmp_path: Path, make: Callable[[], socket.socket], message: str
) -> None:
    """A TCP listener was served (an audit: anyone on the network could reach the device);
    a datagram or unbound socket waited for a client that could never come, then exit 0."""
    with make() as given:
        result = run_vgpud(
            "serve",
            "--fd",
            str(given.fileno()),
            "--backing-dir",
            str(tmp_path / "m"),
            pass_fds=(given.fileno(),),
        )
    assert result.returncode == 1
    assert message in result.stderr and result.stderr.count("\n") == 1, result.stderr


def test_layout_json_matches_the_kernel_formula() -> None:
    out = subprocess.run(
        [*VGPUD, "layout", "--profile", "gh200", "--memory-size", "95.75GiB", "--json"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    layout = json.loads(out)
    regions = {r["name"]: r for r in layout["regions"]}
    # spec nvgrace-gpu.md §3.2's worked example.
    assert regions["usemem"]["memlength"] == 189 << 29  # 94.5 GiB
    assert regions["usemem"]["bar_size"] == 128 << 30
    assert regions["resmem"]["memlength"] == 5 << 28  # 1.25 GiB
    assert regions["resmem"]["bar_size"] == 2 << 30


def test_layout_text_ends_with_its_last_line() -> None:
    result = run_vgpud("layout", "--profile", "gh200")
    assert result.returncode == 0
    assert result.stdout.endswith(" bytes\n"), result.stdout[-40:]  # no blank line after


def test_backing_file_of_another_size_is_kept_and_refused(tmp_path: Path) -> None:
    memory = tmp_path / "mem"
    memory.mkdir()
    (memory / "usemem").write_bytes(b"someone's data")
    result = run_vgpud("serve", "--socket-path", str(tmp_path / "s"), "--backing-dir", str(memory))
    assert result.returncode == 1
    assert "belongs to a device of another size" in result.stderr
    assert (memory / "usemem").read_bytes() == b"someone's data"


@pytest.mark.parametrize("engine", ENGINES)
def test_socket_activation_by_name(
    tmp_path: Path, notify_socket: socket.socket, engine: list[str]
) -> None:
    """As systemd starts vgpud@gpu7.service: fd 3 listening, LISTEN_FDNAMES=gpu7."""
    path = tmp_path / "activated.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(1)
    env = dict(
        os.environ, NOTIFY_SOCKET=str(tmp_path / "notify"), LISTEN_FDS="1", LISTEN_FDNAMES="gpu7"
    )
    # LISTEN_PID must be the daemon's own pid: set it in the shell that execs it, and put the
    # socket at fd 3 (SD_LISTEN_FDS_START).
    cmd = " ".join(
        [
            *VGPUD,
            "serve",
            "--name",
            "gpu7",
            "--backing-dir",
            str(tmp_path / "m"),
            "--memory-size",
            "4GiB",
            *engine,
        ]
    )
    proc = subprocess.Popen(
        ["bash", "-c", f"LISTEN_PID=$$ exec {cmd} 3<&{listener.fileno()}"],
        pass_fds=(listener.fileno(),),
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    listener.close()
    try:
        assert notify_socket.recv(64) == b"READY=1"
        probe = run_vgpud("probe", str(path))
        assert probe.returncode == 0, probe.stderr
        assert "BAR4    size 4GiB" in probe.stdout
    finally:
        stderr = stop(proc)
    assert '"socket": "inherited"' in stderr
    assert path.exists(), "systemd's socket is not ours to remove"


@pytest.mark.skipif(
    shutil.which("systemd-socket-activate") is None, reason="systemd-socket-activate not found"
)
@pytest.mark.parametrize("engine", ENGINES)
def test_started_by_the_first_connection_as_the_socket_unit_does(
    tmp_path: Path, engine: list[str]
) -> None:
    """systemd's own activator, as vgpud@.socket + vgpud@.service run it: nothing runs until
    a client connects; that connection starts vgpud with the listening socket (named like
    FileDescriptorName=%i) and is served, and so is the next one."""
    path = tmp_path / "gpu3.sock"
    activate = ["systemd-socket-activate", "--listen", str(path), "--fdname", "gpu3"]
    serve = ["serve", "--name", "gpu3", "--backing-dir", str(tmp_path / "m")]
    serve += ["--memory-size", "4GiB", "--log-format", "json", *engine]
    activator = subprocess.Popen([*activate, *VGPUD, *serve], stderr=subprocess.PIPE, text=True)
    try:
        log = _read_until(activator, "Listening on")
        assert not (tmp_path / "m").exists()  # nothing has started the daemon yet
        for _ in range(2):
            # A hang guard: unserved, the connection would wait forever.
            probe = run_vgpud("probe", str(path), timeout=30)
            assert probe.returncode == 0, probe.stderr
            assert "BAR4    size 4GiB" in probe.stdout
    finally:
        log += stop(activator, check=False)
    assert activator.returncode == 0, log
    assert '"socket": "inherited"' in log
    assert log.count('"event": "client connected"') == 2


def _read_until(proc: subprocess.Popen[str], text: str) -> str:
    """Read ``proc``'s stderr up to and including the first line containing ``text``."""
    assert proc.stderr is not None
    lines: list[str] = []
    while not lines or text not in lines[-1]:
        line = proc.stderr.readline()
        assert line, "".join(lines) or "exited without output"
        lines.append(line)
    return "".join(lines)
