"""Layering (DESIGN.md "Layers"): nothing in backends imports vgpud."""

from __future__ import annotations

import subprocess
import sys


def test_backends_do_not_import_vgpud() -> None:
    code = (
        "import sys, backends.synthetic, backends.backend, backends.irq, backends.vfio;"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('vgpud', 'trio')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
