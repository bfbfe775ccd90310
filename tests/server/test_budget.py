"""One client's DMA mappings cannot take another device's descriptors (vgpud/budget.py).

Each fd-backed mapping holds a descriptor in the daemon, and the descriptor limit is the
whole process's. The daemon runs here under ``ulimit -n 1024`` with two devices: gpu0's
client maps as much as it is allowed and more, and gpu1's client must still get its
eventfds wired and its requests answered.
"""

from __future__ import annotations

import errno
import os
import resource
import shlex
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from backends.synthetic import get_profile
from tests.serve_process import VGPUD, read_log_until, stop
from tests.server.conftest import tray_config, tray_devices
from vgpud import budget
from vgpud.client import VfioUserClient, VfioUserError
from vgpud.devices import BuiltDevice, build_device

FD_LIMIT = 1536
PAGE = 4096
MSIX_IRQ, SET_IRQS_EVENTFD_TRIGGER = 2, 0x4 | 0x20


@pytest.fixture
def tray(tmp_path: Path) -> Iterator[subprocess.Popen[str]]:
    config = tray_config(tmp_path)
    serve = shlex.join([*VGPUD, "serve", "--config", str(config), "--log-format", "json"])
    proc = subprocess.Popen(
        ["bash", "-c", f"ulimit -n {FD_LIMIT} && exec {serve}"],
        stderr=subprocess.PIPE,
        text=True,
    )
    yield proc
    if proc.poll() is None:
        stop(proc, check=False)


def expected_limit() -> int:
    """vgpud/budget.py's arithmetic for two default devices under FD_LIMIT (the VMA share
    is far larger here)."""
    profile = get_profile("gh200")
    # INTx 1 + MSI + MSI-X + ERR 1 + REQ 1 vectors, and the INTx resample eventfd.
    irq_fds = 1 + profile.msi_vectors + profile.msix_vectors + 1 + 1 + 1
    per_device = (FD_LIMIT - budget.RESERVED_FDS) // 2 - budget.FDS_PER_DEVICE - 2 * irq_fds
    return per_device // budget.FDS_PER_DMA_MAP  # the client's fd and the mmap's dup


async def test_a_client_mapping_all_it_may_leaves_another_device_its_descriptors(
    tray: subprocess.Popen[str], tmp_path: Path
) -> None:
    ready, _ = read_log_until(tray, "ready")
    limit = ready["max_dma_maps"]
    assert limit == expected_limit()
    ram = os.memfd_create("guest-ram", os.MFD_CLOEXEC)
    eventfds = [os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK) for _ in range(16)]
    try:
        os.ftruncate(ram, PAGE)
        with trio.fail_after(60):
            async with (
                await VfioUserClient.connect(tmp_path / "gpu0.sock") as greedy,
                await VfioUserClient.connect(tmp_path / "gpu1.sock") as other,
            ):
                refused = []
                for page in range(limit + 20):
                    try:
                        await greedy.dma_map((1 << 32) + page * PAGE, PAGE, fd=ram)
                    except VfioUserError as exc:
                        refused.append((page, exc.errno))
                assert refused == [(page, errno.ENOSPC) for page in range(limit, limit + 20)]
                # gpu1's client wires every MSI-X vector while gpu0's holds all it may.
                await other.set_irqs(MSIX_IRQ, SET_IRQS_EVENTFD_TRIGGER, 0, 16, eventfds)
                assert (await other.device_info()).num_regions == 9
                assert (await greedy.device_info()).num_regions == 9
    finally:
        os.close(ram)
        for fd in eventfds:
            os.close(fd)
    log = stop(tray)
    assert '"level": "error"' not in log, log


@pytest.fixture
def devices(tmp_path: Path) -> Iterator[list[BuiltDevice]]:
    built = [build_device(config) for config in tray_devices(tmp_path, 4)]
    yield built
    for device in built:
        device.release()


def test_the_map_count_limits_the_share_too(
    devices: list[BuiltDevice], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sysctl = tmp_path / "max_map_count"
    sysctl.write_text("12288\n")
    monkeypatch.setattr(budget, "MAX_MAP_COUNT", sysctl)
    monkeypatch.setattr(resource, "getrlimit", lambda _: (1 << 20, 1 << 20))
    share = (12288 - budget.RESERVED_MAPS) // 4
    assert budget.dma_map_limit([d.device for d in devices]) == share
    assert budget.dma_map_limit([devices[0].device]) == 12288 - budget.RESERVED_MAPS


def test_too_few_descriptors_for_the_devices_is_a_clear_startup_error(
    devices: list[BuiltDevice], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(resource, "getrlimit", lambda _: (1024, 1024))
    assert budget.dma_map_limit([devices[0].device]) >= budget.MIN_DMA_MAPS
    with pytest.raises(budget.BudgetError, match=r"4 device\(s\) need .*\(RLIMIT_NOFILE is 1024;"):
        budget.dma_map_limit([d.device for d in devices])
