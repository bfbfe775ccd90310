"""Several devices from one config file: independent sockets, memory and clients."""

from __future__ import annotations

import functools
import struct
from pathlib import Path

import pytest
import trio

from tests.server.conftest import tray_config
from vgpud import daemon
from vgpud.client import VfioUserClient, VfioUserError
from vgpud.config import load_file

BAR4, CONFIG = 4, 7
REGION_WRITE, NO_REPLY = 10, 0x10


async def test_two_gpu_tray(tmp_path: Path) -> None:
    config = tmp_path / "tray.toml"
    config.write_text(
        "".join(
            f'[[device]]\nname = "gpu{i}"\nsocket_path = "{tmp_path}/gpu{i}.sock"\n'
            f'profile = "{profile}"\nmemory_size = "4GiB"\nbacking_dir = "{tmp_path}/mem{i}"\n'
            for i, profile in enumerate(("gh200", "gb200"))
        )
    )
    async with trio.open_nursery() as nursery:
        servers = await nursery.start(functools.partial(daemon.run, load_file(config)))
        assert [s.name for s in servers] == ["gpu0", "gpu1"]
        async with (
            await VfioUserClient.connect(tmp_path / "gpu0.sock") as gpu0,
            await VfioUserClient.connect(tmp_path / "gpu1.sock") as gpu1,
        ):
            ids = [struct.unpack("<HH", await c.region_read(CONFIG, 0, 4)) for c in (gpu0, gpu1)]
            assert ids == [(0x10DE, 0x2342), (0x10DE, 0x2941)]
            # gh200 carves resmem out of BAR2; gb200's BAR2 is its own 64 MiB BAR1.
            assert (await gpu0.region_info(2)).info.size == 1 << 30
            assert (await gpu1.region_info(2)).info.size == 64 << 20
            for client, value in ((gpu0, b"gpu0!!!!"), (gpu1, b"gpu1!!!!")):
                await client.region_write(CONFIG, 0x04, struct.pack("<H", 2))
                await client.region_write(BAR4, 0x100, value)
            # A second client of gpu0 is refused; gpu1's client is not disturbed.
            with pytest.raises(VfioUserError, match="VERSION failed: Device or resource busy"):
                await VfioUserClient.connect(tmp_path / "gpu0.sock")
            assert await gpu1.region_read(BAR4, 0x100, 8) == b"gpu1!!!!"
            assert await gpu0.region_read(BAR4, 0x100, 8) == b"gpu0!!!!"
        nursery.cancel_scope.cancel()
    for i in range(2):
        with (tmp_path / f"mem{i}" / "usemem").open("rb") as handle:
            handle.seek(0x100)
            assert handle.read(8) == f"gpu{i}!!!!".encode()
        assert not (tmp_path / f"gpu{i}.sock").exists()


async def test_a_client_that_never_pauses_does_not_hold_up_another_device(
    tmp_path: Path,
) -> None:
    """gpu0's client has 2000 posted writes queued before the daemon runs, so its session
    never has to wait for the socket; gpu1's request still gets its reply long before that
    queue is through (the transport yields every FAIRNESS_BUDGET socket operations)."""
    flood = 2000
    config = tray_config(tmp_path)
    async with trio.open_nursery() as nursery:
        servers = await nursery.start(functools.partial(daemon.run, load_file(config)))
        async with (
            await VfioUserClient.connect(tmp_path / "gpu0.sock") as gpu0,
            await VfioUserClient.connect(tmp_path / "gpu1.sock") as gpu1,
        ):
            posted = struct.pack("<HHIII", 0, REGION_WRITE, 36, NO_REPLY, 0)
            posted += struct.pack("<QII", 0x3C, CONFIG, 4) + b"\x0b\x00\x00\x00"
            # Plain writes, no checkpoint: all of it is queued before the daemon runs.
            gpu0.stream.socket.sendall(posted * flood)
            session = servers[0].current_session
            assert session is not None
            start = session.messages  # VERSION
            await gpu1.region_read(CONFIG, 0, 4)
            assert session.messages - start < flood // 4, session.messages - start
            await gpu0.device_info()  # after the whole queue, in order
            assert session.messages - start == flood + 1
        nursery.cancel_scope.cancel()
