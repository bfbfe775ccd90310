"""The shipped systemd units and Containerfile are well-formed."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

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


def test_containerfile_copies_what_exists() -> None:
    for line in (ROOT / "Containerfile").read_text().splitlines():
        if line.startswith("COPY ") and "--from" not in line:
            for source in line.split()[1:-1]:
                assert (ROOT / source).exists(), f"Containerfile copies missing {source}"
