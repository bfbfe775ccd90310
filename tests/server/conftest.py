"""The daemon in-process on a real UNIX socket, and helpers to talk to it."""

from __future__ import annotations

import functools
import os
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import structlog.testing
import trio

from vgpud import daemon
from vgpud.client import VfioUserClient
from vgpud.config import DaemonConfig, DeviceConfig, single_device
from vgpud.log_limit import BURST, PER_SECOND
from vgpud.server.listener import DeviceServer

# 4 GiB gh200: usemem 3 GiB in a 4 GiB BAR4 (a 1 GiB trapped tail), resmem 1 GiB in BAR2.
MEMORY_SIZE = "4GiB"
USEMEM_LENGTH = 3 << 30
USEMEM_BAR_SIZE = 4 << 30
RESMEM_LENGTH = 1 << 30


def open_fds() -> set[int]:
    """This process's open descriptors (the daemon runs in-process)."""
    return {int(name) for name in os.listdir("/proc/self/fd")}


def tray_devices(tmp_path: Path, devices: int = 2) -> tuple[DeviceConfig, ...]:
    """``devices`` 4 GiB GPUs gpu<i> at tmp_path/gpu<i>.sock, memory in tmp_path/mem<i>."""
    return tuple(
        single_device(
            socket_path=tmp_path / f"gpu{i}.sock",
            name=f"gpu{i}",
            memory_size="4GiB",
            backing_dir=tmp_path / f"mem{i}",
        )
        for i in range(devices)
    )


def tray_config(tmp_path: Path, devices: int = 2) -> Path:
    """A config file for ``devices`` default 4 GiB GPUs, gpu<i> at tmp_path/gpu<i>.sock with
    its memory in tmp_path/mem<i>."""
    config = tmp_path / "tray.toml"
    config.write_text(
        "".join(
            f'[[device]]\nname = "gpu{i}"\nsocket_path = "{tmp_path}/gpu{i}.sock"\n'
            f'memory_size = "4GiB"\nbacking_dir = "{tmp_path}/mem{i}"\n'
            for i in range(devices)
        )
    )
    return config


@dataclass
class Daemon:
    socket_path: Path
    backing_dir: Path
    server: DeviceServer

    async def connect(self) -> VfioUserClient:
        return await VfioUserClient.connect(self.socket_path)

    async def idle(self) -> None:
        """Wait until the daemon has finished with every client (its cleanup has run)."""
        await self.server.wait_idle()


async def start_daemon(
    nursery: trio.Nursery, tmp_path: Path, profile: str = "gh200", memory_size: str = MEMORY_SIZE
) -> Daemon:
    socket_path = tmp_path / "gpu0.sock"
    device = single_device(
        socket_path=socket_path,
        profile=profile,
        memory_size=memory_size,
        backing_dir=tmp_path / "mem",
    )
    servers = await nursery.start(functools.partial(daemon.run, DaemonConfig(devices=(device,))))
    return Daemon(socket_path, tmp_path / "mem", servers[0])


@pytest.fixture
async def vgpud(tmp_path: Path) -> AsyncIterator[Daemon]:
    async with trio.open_nursery() as nursery:
        yield await start_daemon(nursery, tmp_path)
        nursery.cancel_scope.cancel()


async def reset_flood(
    connect: Callable[[], Awaitable[VfioUserClient]], idle: Callable[[], Awaitable[None]]
) -> tuple[list[MutableMapping[str, Any]], float]:
    """200 DEVICE_RESETs back to back over two connections; the lines logged meanwhile, and
    the most lines of one kind the device's rate limit (vgpud/log_limit.py) lets through in
    the time it took."""
    start = trio.current_time()
    with structlog.testing.capture_logs() as logs:
        for _ in range(2):
            async with await connect() as client:
                for _ in range(100):
                    await client.reset()
            await idle()
    return logs, BURST + PER_SECOND * (trio.current_time() - start) + 1
