"""tests/server/test_session_fuzz.py's sessions against the libvfio-user engine.

libvfio-user parses and answers most requests itself; what is vgpud's here are the
callbacks (region access, reset, DMA notifications, INTx masking) and the engine's handling
of how libvfio-user reports a client gone. The same properties must hold: every request
answered or the connection closed, no callback meeting a bug, no fd of the client left open,
the next client served. (This engine's known blocking cases -- a client stalling mid-message
-- are not generated: every frame is whole, and every reply is read.)

Needs a libvfio-user build (``VGPUD_LIBVFIO_USER``); skipped without one.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from tests.server.test_session_fuzz import fuzz_sessions
from vgpud.config import single_device
from vgpud.devices import build_device
from vgpud.libvfio_user import EngineUnavailable, LibvfioUserServer, load_library
from vgpud.libvfio_user.engine import serve_device

try:
    LIBRARY = load_library()
except EngineUnavailable as exc:
    pytest.skip(f"libvfio-user engine tests need the library ({exc})", allow_module_level=True)


@dataclass
class LibvfioUserEngine:
    socket_path: Path
    server: LibvfioUserServer

    @property
    def internal_errors(self) -> int:
        return self.server.internal_errors

    async def idle(self) -> None:
        await self.server.wait_idle()


async def test_any_request_sequence_is_answered_or_closed_and_leaks_nothing(
    tmp_path: Path,
) -> None:
    socket_path = tmp_path / "gpu0.sock"
    built = build_device(
        single_device(socket_path=socket_path, memory_size="4GiB", backing_dir=tmp_path / "mem")
    )

    async def run(task_status: trio.TaskStatus[LibvfioUserServer]) -> None:
        try:
            await serve_device(built, socket_path, library=LIBRARY, task_status=task_status)
        finally:
            built.release()

    async with trio.open_nursery() as nursery:
        server = await nursery.start(run)
        target = LibvfioUserEngine(socket_path, server)
        await trio.to_thread.run_sync(functools.partial(fuzz_sessions, target, tmp_path))
        nursery.cancel_scope.cancel()
