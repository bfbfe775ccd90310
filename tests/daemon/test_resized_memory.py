"""A VMM that resizes the device memory files it was handed cannot take the daemon down.

QEMU gets writable fds of ``usemem``/``resmem`` in the region-info replies (it mmaps them), so
it can ``ftruncate`` them. Were the daemon to touch the files through a mapping of its own,
the next trapped access would be a SIGBUS for the whole process, every device included
(docs/security.md). These run the real ``vgpud serve`` in a process of its own, so that such a
crash shows up as a dead daemon rather than a dead test run.
"""

from __future__ import annotations

import errno
import json
import os
import socket
from pathlib import Path

import pytest
import trio

from tests.serve_process import read_log_until, serve_args, start, stop
from vgpud.client import VfioUserClient, VfioUserError
from vgpud.libvfio_user import EngineUnavailable, load_library

CONFIG, BAR2, BAR4 = 7, 2, 4
# 4 GiB gh200: usemem 3 GiB in a 4 GiB BAR4, resmem 1 GiB in BAR2.
LENGTHS = {BAR4: 3 << 30, BAR2: 1 << 30}


def engines() -> list[object]:
    try:
        load_library()
        libvfio_user: object = "libvfio-user"
    except EngineUnavailable as exc:
        libvfio_user = pytest.param(
            "libvfio-user", marks=pytest.mark.skip(reason=f"needs libvfio-user ({exc})")
        )
    return ["python", libvfio_user]


async def truncate_under_the_daemon(sock: Path, region: int) -> None:
    length = LENGTHS[region]
    async with await VfioUserClient.connect(sock) as vmm:
        await vmm.region_write(CONFIG, 0x04, b"\x06\x00")  # COMMAND: memory + bus master
        await vmm.region_write(region, 0x1000, b"kept")
        await vmm.region_write(region, 0x5000, b"lost")
        info = await vmm.region_info(region)
        assert info.fd is not None
        try:
            os.ftruncate(info.fd, 0x2000)
            # The access that meets the missing pages gets an error reply; the daemon lives.
            with pytest.raises(VfioUserError) as err:
                await vmm.region_read(region, 0x4FFE, 8)
            assert err.value.errno == errno.EIO
            # ... and has given the file its size back: what was cut off reads as zeros.
            assert os.fstat(info.fd).st_size == length
            assert await vmm.region_read(region, 0x1000, 4) == b"kept"
            assert await vmm.region_read(region, 0x5000, 4) == bytes(4)
            if region == BAR4:
                assert await vmm.region_read(region, length, 4) == b"\xff" * 4  # the tail
            # Shrunk again and left that way: the next client finds the device whole.
            await vmm.region_write(region, length - 4, b"tail")
            os.ftruncate(info.fd, 0x2000)
        finally:
            os.close(info.fd)


async def next_client_finds_the_device_whole(sock: Path, region: int) -> None:
    length = LENGTHS[region]
    async with await VfioUserClient.connect(sock) as next_vmm:
        await next_vmm.region_write(CONFIG, 0x04, b"\x06\x00")
        assert await next_vmm.region_read(region, 0x1000, 4) == b"kept"
        assert await next_vmm.region_read(region, length - 4, 4) == bytes(4)


@pytest.mark.parametrize("region", [BAR4, BAR2], ids=["usemem", "resmem"])
@pytest.mark.parametrize("engine", engines())
def test_vmm_truncating_device_memory_gets_eio_not_a_dead_daemon(
    tmp_path: Path, notify_socket: socket.socket, engine: str, region: int
) -> None:
    sock = tmp_path / "gpu0.sock"
    args = serve_args(tmp_path, "--memory-size", "4GiB", "--engine", engine, "--log-format", "json")
    proc = start(args, tmp_path)
    try:
        assert notify_socket.recv(64) == b"READY=1"
        trio.run(truncate_under_the_daemon, sock, region)
        # One client at a time: the next may connect once the daemon has seen this one go.
        _, log = read_log_until(proc, "client disconnected")
        trio.run(next_client_finds_the_device_whole, sock, region)
        assert proc.poll() is None, "the daemon died"
    finally:
        rest = stop(proc, check=False)
    stderr = log + rest
    assert proc.returncode == 0, stderr
    name = "usemem" if region == BAR4 else "resmem"
    events = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    restored = [e for e in events if "resized behind" in e["event"] and name in e["path"]]
    # The short read and the detach after the second truncation, each attributed to the
    # device and the connection that was being served.
    assert [(e["device"], e["connection"]) for e in restored] == [("gpu0", 1)] * 2, stderr
    assert (tmp_path / "mem" / name).stat().st_size == LENGTHS[region]
