"""Replay real QEMU 11.1.3 client traffic (tests/captures) against the daemon.

Every request QEMU sent over whole guest lifetimes goes to vgpud byte for byte, with fresh
memfds/eventfds standing in for the ones QEMU passed. Each reply must match its request and
fit the buffer QEMU sized for it (spec vfio-user.md §1 "Reply buffer limit", R5, R7): a reply
one byte too large desyncs QEMU's stream.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest
import trio

from tests.server.conftest import open_fds, start_daemon
from tests.server.rawclient import CAPTURES, RawConn, load_capture

FILES = sorted(path.name.removesuffix(".gz") for path in CAPTURES.glob("*.jsonl.gz"))
# The captures' device had 7 GiB usemem + 1 GiB resmem, which is what 8 GiB gh200 gives.
MEMORY_SIZE = "8GiB"


def reply_limit(record: dict[str, object], request_size: int) -> int:
    """The largest reply QEMU accepts for this request (spec vfio-user.md §1)."""
    command = record["cmd"]
    decoded = record.get("decoded") or {}
    assert isinstance(decoded, dict)
    limits = {
        1: request_size,
        2: 48,
        3: 40,
        4: 32,
        7: 32,
        8: request_size,
        10: request_size,
        13: 16,
    }
    if command == 5:
        return 16 + int(decoded["argsz"])
    if command == 9:
        return 32 + int(decoded["count"])
    assert isinstance(command, int)
    return limits[command]


def make_fd(description: dict[str, object]) -> int:
    if description["kind"] == "eventfd":
        return os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    fd = os.memfd_create(str(description.get("name", "ram")), os.MFD_CLOEXEC)
    size = description.get("size")
    assert isinstance(size, int)
    os.ftruncate(fd, size)
    return fd


@pytest.mark.parametrize("capture", FILES)
async def test_replay(capture: str, tmp_path: Path) -> None:
    records = [r for r in load_capture(capture) if r["dir"] == "c2s"]
    assert records, "empty capture"
    before = open_fds()
    async with trio.open_nursery() as nursery:
        daemon = await start_daemon(nursery, tmp_path, memory_size=MEMORY_SIZE)
        conn = await RawConn.open(daemon.socket_path, negotiate=False)
        errors: list[str] = []
        for record in records:
            payload = bytes.fromhex(str(record["payload"]))
            header = struct.pack(
                "<HHIII", record["msg_id"], record["cmd"], record["size"], record["flags"], 0
            )
            fds = [make_fd(d) for d in record.get("fds", [])]
            await conn.send(header + payload, fds)
            for fd in fds:
                os.close(fd)
            if record["no_reply"]:
                continue
            reply = await conn.receive()
            assert reply is not None, f"daemon closed after {record['cmd_name']} #{record['seq']}"
            assert (reply.msg_id, reply.command) == (record["msg_id"], record["cmd"])
            assert reply.flags & 0xF == 1
            limit = reply_limit(record, int(str(record["size"])))
            assert reply.size <= limit, f"{record['cmd_name']} reply {reply.size} > {limit}"
            if reply.fds:
                assert record["cmd"] == 5 and len(reply.fds) == 1
                for fd in reply.fds:
                    os.close(fd)
            if reply.is_error:
                errors.append(f"{record['cmd_name']} seq {record['seq']}: errno {reply.error}")
        conn.close()
        await daemon.idle()
        nursery.cancel_scope.cancel()
    # libvfio-user refused the Linux HDA quirk's write to 0x488; vgpud accepts it
    # (spec vfio-user.md §11), so QEMU's whole traffic must succeed.
    assert errors == []
    assert open_fds() == before
