"""Loading the library: clear errors when it is absent or not one we can drive.

These run everywhere (they need no libvfio-user).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from vgpud.libvfio_user import ENV_LIBRARY, EngineUnavailable, load_library
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
