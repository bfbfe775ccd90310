"""Device memory its filesystem could not provide in full (vgpud/capacity.py).

The backing files are sparse, so a device may be larger than the free space under it; the
guest writing past that free space gets its VM killed by SIGBUS (docs/operations.md, "Device
memory"). The daemon says so at start-up, summing the devices that share a filesystem, and
with ``prealloc`` allocates the memory before it serves, or refuses to start.
"""

from __future__ import annotations

import functools
import os
import shutil
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any

import pytest
import structlog.testing
import trio

from backends.synthetic.profiles import GIB
from vgpud import daemon
from vgpud.config import DaemonConfig, DeviceConfig, single_device
from vgpud.daemon import StartupError

WARNING = "device memory is larger than its filesystem has free"


def device(
    tmp_path: Path, name: str, memory_gib: int, profile: str = "gh200", prealloc: bool = False
) -> DeviceConfig:
    return single_device(
        socket_path=tmp_path / f"{name}.sock",
        name=name,
        profile=profile,
        memory_size=f"{memory_gib}GiB",
        backing_dir=tmp_path / f"mem-{name}",
        prealloc=prealloc,
    )


async def startup_lines(*devices: DeviceConfig) -> list[MutableMapping[str, Any]]:
    with structlog.testing.capture_logs() as logs:
        async with trio.open_nursery() as nursery:
            await nursery.start(functools.partial(daemon.run, DaemonConfig(devices=devices)))
            nursery.cancel_scope.cancel()
    return logs


def free_gib(path: Path) -> int:
    vfs = os.statvfs(path)
    free = vfs.f_bavail * vfs.f_frsize // GIB
    if not 8 <= free <= 4096:
        # Sparse files larger than a few TiB are refused by some filesystems (EFBIG), and a
        # nearly full one leaves no room for the margins below.
        pytest.skip(f"needs 8 GiB to 4 TiB free under {path}, has {free} GiB")
    return free


async def test_devices_that_together_exceed_the_free_space_are_named_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("LISTEN_FDS", raising=False)
    free = free_gib(tmp_path)
    # Each fits alone (a margin of a quarter for whatever else writes meanwhile); the two do not.
    each = free * 3 // 4
    logs = await startup_lines(device(tmp_path, "a", each), device(tmp_path, "b", each))
    (warning,) = [line for line in logs if str(line["event"]).startswith(WARNING)]
    assert warning["log_level"] == "warning"
    assert warning["devices"] == ["a", "b"]
    assert warning["backing_dirs"] == [str(tmp_path / "mem-a"), str(tmp_path / "mem-b")]
    assert warning["unbacked"] == 2 * each * GIB  # nothing written yet
    assert 0 < int(str(warning["free"])) < 2 * each * GIB
    # ... and the daemon served anyway: a warning, not a refusal.
    assert [line["device"] for line in logs if line["event"] == "serving"] == ["a", "b"]


async def test_devices_that_fit_are_not_warned_about(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("LISTEN_FDS", raising=False)
    free = free_gib(tmp_path)
    logs = await startup_lines(device(tmp_path, "a", free // 4), device(tmp_path, "b", free // 4))
    assert not [line for line in logs if str(line["event"]).startswith(WARNING)]
    assert [line["device"] for line in logs if line["event"] == "serving"] == ["a", "b"]


def allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


@pytest.mark.parametrize(
    ("profile", "files"),
    [
        ("gh200", {"usemem": GIB, "resmem": GIB}),  # 2 GiB: 1 GiB carved out as resmem
        ("gb200", {"usemem": 2 * GIB, "bar1": 64 << 20}),  # BAR2 is the real BAR1 (a file)
    ],
)
async def test_prealloc_allocates_every_mappable_page_and_keeps_contents(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, profile: str, files: dict[str, int]
) -> None:
    monkeypatch.delenv("LISTEN_FDS", raising=False)
    memory = tmp_path / "mem-a"
    memory.mkdir()
    with (memory / "usemem").open("wb") as usemem:  # memory from an earlier run
        usemem.truncate(files["usemem"])
        usemem.seek(0x1000)
        usemem.write(b"keep")
    try:
        logs = await startup_lines(device(tmp_path, "a", 2, profile=profile, prealloc=True))
        for name, size in files.items():
            assert allocated(memory / name) >= size, name
        with (memory / "usemem").open("rb") as usemem:
            usemem.seek(0x1000)
            assert usemem.read(4) == b"keep"
        (line,) = [line for line in logs if line["event"] == "device memory allocated"]
        assert line["device"] == "a"
        assert sum(files.values()) - 2 * 4096 <= int(str(line["allocated"])) < sum(files.values())
        assert not [line for line in logs if str(line["event"]).startswith(WARNING)]
    finally:
        shutil.rmtree(memory)  # a kept tmp_path must not hold gigabytes (tmpfs /tmp: RAM)


async def test_prealloc_refuses_a_device_larger_than_the_free_space_allocating_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("LISTEN_FDS", raising=False)
    too_big = free_gib(tmp_path) * 5 // 4
    with pytest.raises(StartupError, match=r"device a: cannot preallocate its memory in .*mem-a"):
        await daemon.run(DaemonConfig(devices=(device(tmp_path, "a", too_big, prealloc=True),)))
    assert allocated(tmp_path / "mem-a" / "usemem") == 0
    assert not (tmp_path / "a.sock").exists()
