"""Loading the library: clear errors when it is absent or not one we can drive.

These run everywhere (they need no libvfio-user).
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from vgpud.libvfio_user import ENV_LIBRARY, EngineUnavailable, ffi, load_library
from vgpud.libvfio_user.ffi import DEFAULT_LIBRARY, library_name


def test_missing_library_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(EngineUnavailable, match=r"cannot load .*libvfio-user") as info:
        load_library(tmp_path / "libvfio-user.so.0")
    assert "check the path" in str(info.value)


def test_missing_soname_explains_how_to_point_at_a_build(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(ENV_LIBRARY, raising=False)
    with pytest.raises(EngineUnavailable, match=ENV_LIBRARY):
        load_library("libvfio-user-surely-not-installed.so.0")


def test_a_library_without_the_api_is_refused() -> None:
    with pytest.raises(EngineUnavailable, match="lacks vfu_create_ctx"):
        load_library("libc.so.6")


def test_library_name_precedence(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_LIBRARY, raising=False)
    assert library_name() == DEFAULT_LIBRARY
    monkeypatch.setenv(ENV_LIBRARY, "/opt/lib/libvfio-user.so.0")
    assert library_name() == "/opt/lib/libvfio-user.so.0"
    assert library_name("/explicit.so") == "/explicit.so"


# A seccomp filter that fails kcmp(2) with EPERM, as Docker's and podman's default profiles
# do without CAP_SYS_PTRACE, then runs the rest of argv. x86_64 only (its syscall number and
# audit arch are in the program).
_BLOCK_KCMP = """
import ctypes, os, struct, sys
libc = ctypes.CDLL(None, use_errno=True)
def ins(code, jt, jf, k):
    return struct.pack("<HBBI", code, jt, jf, k)
program = b"".join([
    ins(0x20, 0, 0, 4), ins(0x15, 1, 0, 0xC000003E), ins(0x06, 0, 0, 0x7FFF0000),
    ins(0x20, 0, 0, 0), ins(0x15, 0, 1, 312), ins(0x06, 0, 0, 0x00050001),
    ins(0x06, 0, 0, 0x7FFF0000),
])
buf = ctypes.create_string_buffer(program)
class Fprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]
fprog = Fprog(len(program) // 8, ctypes.addressof(buf))
assert libc.prctl(38, 1, 0, 0, 0) == 0  # PR_SET_NO_NEW_PRIVS
assert libc.prctl(22, 2, ctypes.byref(fprog), 0, 0) == 0  # PR_SET_SECCOMP, FILTER
from vgpud.libvfio_user.ffi import kcmp_works
print(kcmp_works())
"""


@pytest.mark.skipif(platform.machine() != "x86_64", reason="the seccomp program is x86_64's")
def test_kcmp_blocked_by_seccomp_is_detected() -> None:
    """libvfio-user aborts the daemon on a client's fcntl without kcmp (an adversarial run),
    so the probe must see a blocked kcmp as the seccomp profiles block it."""
    probe = "from vgpud.libvfio_user.ffi import kcmp_works; print(kcmp_works())"
    for code, expected in ((probe, "True"), (_BLOCK_KCMP, "False")):
        result = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
        )
        assert result.stdout.strip() == expected, result.stderr


@pytest.mark.skipif(
    not os.environ.get(ENV_LIBRARY), reason=f"{ENV_LIBRARY} is not set: needs a local build"
)
def test_without_kcmp_the_engine_refuses_to_start(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ffi, "kcmp_works", lambda: False)
    with pytest.raises(EngineUnavailable, match=r"kcmp\(2\) is not permitted here"):
        load_library()
