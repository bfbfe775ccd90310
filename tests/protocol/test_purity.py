"""``protocol`` is sans-IO: stdlib only, nothing that does I/O (DESIGN.md layout rules)."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import protocol

PACKAGE = Path(protocol.__file__).parent
FORBIDDEN = {
    "trio", "socket", "_socket", "select", "selectors", "mmap", "asyncio", "subprocess",
    "fcntl", "signal", "threading", "ssl", "io", "os", "pathlib", "shutil", "tempfile",
}  # fmt: skip
ALLOWED_IMPORTS = {
    "__future__", "collections", "contextlib", "dataclasses", "enum", "errno", "json",
    "struct", "types", "typing", "protocol",
}  # fmt: skip


def test_import_pulls_in_no_io_module() -> None:
    code = (
        "import json, sys\n"
        "before = set(sys.modules)\n"
        "import protocol\n"
        "print(json.dumps(sorted(set(sys.modules) - before)))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True
    ).stdout
    loaded = set(json.loads(out))
    assert "protocol" in loaded
    # os itself arrives through dataclasses -> inspect -> linecache; what matters is that no
    # socket/event-loop/mmap module does, and that protocol never imports os (next test).
    assert not (loaded & (FORBIDDEN - {"os", "io"})), loaded & FORBIDDEN


def test_protocol_sources_import_only_pure_stdlib() -> None:
    for path in sorted(PACKAGE.glob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                roots = {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                roots = {(node.module or "").split(".")[0]}
            else:
                continue
            assert roots <= ALLOWED_IMPORTS, f"{path.name}: imports {roots - ALLOWED_IMPORTS}"


def test_every_module_is_small_and_typed() -> None:
    assert (PACKAGE / "py.typed").exists()
    for path in PACKAGE.glob("*.py"):
        assert len(path.read_text().splitlines()) < 450, path.name
