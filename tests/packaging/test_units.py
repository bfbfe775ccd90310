"""The shipped systemd units and Containerfile are well-formed."""

from __future__ import annotations

import fnmatch
import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import Served
from vgpud import cli
from vgpud.config import DeviceConfig

ROOT = Path(__file__).resolve().parents[2]
SYSTEMD = ROOT / "systemd"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not found")
def test_systemd_units_verify(tmp_path: Path) -> None:
    # systemd-analyze checks that ExecStart exists: point the copies at this venv's vgpud.
    vgpud = Path(sys.executable).with_name("vgpud")
    for unit in ("vgpud@.service", "vgpud@.socket", "vgpud.service"):
        text = (SYSTEMD / unit).read_text().replace("/usr/bin/vgpud", str(vgpud))
        (tmp_path / unit).write_text(text)
    result = subprocess.run(
        ["systemd-analyze", "verify", "vgpud@gpu0.service", "vgpud@gpu0.socket", "vgpud.service"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr


def test_template_serves_the_instance_by_name() -> None:
    service = (SYSTEMD / "vgpud@.service").read_text()
    socket_unit = (SYSTEMD / "vgpud@.socket").read_text()
    # The socket's FileDescriptorName must be the --name the service passes, or the daemon
    # would not match the activated socket to its device.
    assert "FileDescriptorName=%i" in socket_unit
    assert "--name %i" in service
    assert "Type=notify" in service


def _template_argv(instance: str, vgpud_args: str) -> list[str]:
    """vgpud@.service's ExecStart for ``instance`` as systemd runs it: %i replaced, and an
    unquoted $VGPUD_ARGS split into words at whitespace (systemd.service(5), Command lines)."""
    service = (SYSTEMD / "vgpud@.service").read_text()
    (exec_start,) = [line for line in service.splitlines() if line.startswith("ExecStart=")]
    binary, *words = shlex.split(exec_start.removeprefix("ExecStart="))
    assert binary == "/usr/bin/vgpud"
    argv: list[str] = []
    for word in words:
        argv += vgpud_args.split() if word == "$VGPUD_ARGS" else [word.replace("%i", instance)]
    return argv


@pytest.mark.parametrize(
    "vgpud_args",
    ["", "--profile gb200 --memory-size 186GiB", "--vfio-device 0009:01:00.0"],
    ids=["default", "unit comment's example", "a real device"],
)
def test_template_takes_each_documented_vgpud_args(served: Served, vgpud_args: str) -> None:
    """What docs/operations.md puts in /etc/vgpud/<name>.env is accepted by the template's
    command line. Its --backing-dir used to refuse --vfio-device (a real device has no
    memory directory), so the template could not serve one."""
    assert cli.main(_template_argv("gpu7", vgpud_args)) == 0
    (device,) = served[0].devices
    assert device.name == "gpu7"
    if device.vfio_device is None:
        # The unit's promise: memory files in /dev/shm/vgpud/<instance>/.
        assert device.resolved_backing_dir() == Path("/dev/shm/vgpud/gpu7")


def test_containerfile_copies_what_exists() -> None:
    for line in (ROOT / "Containerfile").read_text().splitlines():
        if line.startswith("COPY ") and "--from" not in line:
            for source in line.split()[1:-1]:
                assert (ROOT / source).exists(), f"Containerfile copies missing {source}"


def _build_stage_copies() -> set[str]:
    """What the Containerfile's build stage copies from the build context."""
    stage = (ROOT / "Containerfile").read_text().split("\nFROM ")[1]
    assert stage.startswith("docker.io/library/python:3.11-slim-bookworm AS build\n"), stage
    return {
        source
        for line in stage.splitlines()
        if line.startswith("COPY ") and "--from" not in line
        for source in line.split()[1:-1]
    }


def test_container_build_has_what_the_c_extension_needs() -> None:
    """setup.py is what compiles vgpud/server/fast_reads.c into the wheel: without it the
    image would build, and serve, without the fast path (and say so only in its logs)."""
    assert {"setup.py", "vgpud"} <= _build_stage_copies()


def test_containerfile_sources_are_in_the_build_context() -> None:
    """.dockerignore lets through everything the build stage copies: a source it filters out
    fails the image's build ("no items matching glob")."""
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for source in sorted(_build_stage_copies()):
        excluded = False
        for pattern in patterns:  # the last pattern that matches decides, as in docker's
            if fnmatch.fnmatch(source, pattern.removeprefix("!")):
                excluded = not pattern.startswith("!")
        assert not excluded, f".dockerignore filters out {source}, which the Containerfile copies"


def _containerfile_instruction(keyword: str) -> list[str]:
    """The JSON-form argument of the image's (last) ``keyword`` instruction."""
    lines = [
        line for line in (ROOT / "Containerfile").read_text().splitlines()
        if line.startswith(f"{keyword} ")
    ]  # fmt: skip
    assert lines, f"Containerfile has no {keyword}"
    value = json.loads(lines[-1].removeprefix(f"{keyword} "))
    assert isinstance(value, list)
    return [str(item) for item in value]


def test_container_keeps_sockets_and_memory_in_volumes() -> None:
    """The default command's socket and the default backing directory are volumes: memory
    must not land in the container's own 64 MiB /dev/shm, nor die with the container."""
    volumes = [Path(v) for v in _containerfile_instruction("VOLUME")]
    command = _containerfile_instruction("CMD")
    socket = Path(command[command.index("--socket-path") + 1])
    backing = DeviceConfig(name=socket.stem, socket_path=socket).resolved_backing_dir()

    def in_a_volume(path: Path) -> bool:
        return any(path.is_relative_to(volume) for volume in volumes)

    assert in_a_volume(socket), f"{socket} is not under a VOLUME"
    assert in_a_volume(backing), f"default backing dir {backing} is not under a VOLUME"
    assert _containerfile_instruction("ENTRYPOINT") == ["vgpud"]


def test_multi_device_service_serves_before_libvirt_starts_domains() -> None:
    """Autostarted libvirt domains (domain from ``qemu-args --libvirt``) connect to the GPU
    sockets as libvirt's daemon starts; the monolithic and the modular daemon both."""
    unit = (SYSTEMD / "vgpud.service").read_text()
    before = [line for line in unit.splitlines() if line.startswith("Before=")]
    assert before and {"libvirtd.service", "virtqemud.service", "libvirt-guests.service"} <= set(
        before[0].removeprefix("Before=").split()
    )
