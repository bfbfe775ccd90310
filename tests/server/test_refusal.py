"""A second client is turned away with EBUSY in reply to its first request, then closed.

vgpud/server/refusal.py says why (QEMU 11.1.3 sometimes aborts when the socket just closes).
Each case: the refused client gets its answer, no fd stays open in the daemon, and the first
client is not disturbed.
"""

from __future__ import annotations

import errno
import os
import struct

import pytest
import trio
import trio.testing

from tests.server.conftest import Daemon, open_fds
from tests.server.rawclient import HEADER, QEMU_VERSION, RawConn
from vgpud.server import refusal

DEVICE_INFO = HEADER.pack(9, 4, 16 + 16, 0, 0) + struct.pack("<IIII", 16, 0, 0, 0)


@pytest.mark.parametrize(
    ("first_message", "with_fd"),
    [(QEMU_VERSION, False), (QEMU_VERSION, True), (DEVICE_INFO, False)],
    ids=["VERSION", "VERSION with an fd", "DEVICE_INFO before VERSION"],
)
async def test_refused_client_is_answered_ebusy(
    vgpud: Daemon, first_message: bytes, with_fd: bool
) -> None:
    async with await vgpud.connect() as first:
        before = open_fds()
        refused = await RawConn.open(vgpud.socket_path, negotiate=False)
        try:
            fds = [os.eventfd(0, os.EFD_CLOEXEC)] if with_fd else []
            await refused.send(first_message, fds)
            for fd in fds:
                os.close(fd)  # the daemon got its own copy, which it must close
            with trio.fail_after(10):
                reply = await refused.receive()
                assert reply is not None, "closed without an answer"
                assert reply.is_error and reply.error == errno.EBUSY
                assert reply.size == 16 and reply.msg_id == HEADER.unpack_from(first_message)[0]
                assert await refused.receive() is None  # then closed
        finally:
            refused.close()
        assert open_fds() == before, "an fd leaked"
        assert (await first.device_info()).num_regions == 9


async def test_a_silent_refused_client_is_closed_after_the_timeout(
    vgpud: Daemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(refusal, "REFUSAL_TIMEOUT", 0.2)
    async with await vgpud.connect() as first:
        refused = await RawConn.open(vgpud.socket_path, negotiate=False)
        try:
            with trio.fail_after(10):
                assert await refused.receive() is None
        finally:
            refused.close()
        assert (await first.device_info()).num_regions == 9


async def test_refusals_waiting_at_once_are_bounded(vgpud: Daemon) -> None:
    """Silent clients hold a refusal each for REFUSAL_TIMEOUT (2 s); past MAX_REFUSALS of them
    the next is closed at once rather than queued behind them."""
    async with await vgpud.connect() as first:
        silent = [
            await RawConn.open(vgpud.socket_path, negotiate=False)
            for _ in range(refusal.MAX_REFUSALS)
        ]
        try:
            await trio.testing.wait_all_tasks_blocked()  # the daemon has accepted them all
            assert vgpud.server.connections == 1 + refusal.MAX_REFUSALS
            extra = await RawConn.open(vgpud.socket_path, negotiate=False)
            try:
                with trio.fail_after(refusal.REFUSAL_TIMEOUT / 2):
                    assert await extra.receive() is None
            finally:
                extra.close()
            # ... while the ones already waiting still get their answer.
            await silent[0].send(QEMU_VERSION)
            reply = await silent[0].receive()
            assert reply is not None and reply.error == errno.EBUSY
        finally:
            for conn in silent:
                conn.close()
        assert (await first.device_info()).num_regions == 9
