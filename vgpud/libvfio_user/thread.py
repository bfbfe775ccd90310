"""Each libvfio-user device on a thread of its own, with a trio loop of its own.

Inside ``vfu_run_ctx`` libvfio-user reads message bodies and sends replies with blocking
calls (:mod:`vgpud.libvfio_user.watchdog`). With every device on the daemon's one trio
thread, a client that stalled mid-message held up every other device of the daemon until
the watchdog cut it off (5 s), and a VMM that reconnected and stalled again, over and over,
could keep them held up for good. On a thread of its own a device blocks only itself: the
library keeps its contexts independent (its one piece of global state, the fd cache, takes
a mutex: lib/fd_cache.c) and cffi releases the GIL around each call into it.

A device's thread runs ``serve_device`` (:mod:`vgpud.libvfio_user.engine`) unchanged in its
own ``trio.run``. The two loops hand each other work through trio tokens
(``run_sync_soon`` is the thread-safe way into a loop): the child reports that its socket
listens, and the parent cancels it when the daemon stops. Otherwise only the watchdog's cut
(thread-safe by design) and the status line's reads of plain attributes cross threads. A
client blocking the library when the daemon stops is cut off at once
(:meth:`StallWatchdog.cut_all`) rather than after the stall limit, so a stop is not held up
either.

A device's thread blocks the daemon's signals (:func:`vgpud.signals.quiet_thread`), and so
do the threads it starts (its watchdog). The kernel hands a process-directed signal to any
thread that does not block it, and one taken while libvfio-user was sending a reply larger
than the socket buffer made its blocking ``sendmsg`` return short, which the library takes
for a broken connection: it reset the context, and the VM lost its GPU over a ``kill -USR1``
for the status line.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import structlog
import trio

from vgpud.devices import BuiltDevice
from vgpud.libvfio_user.engine import LibvfioUserServer, serve_device
from vgpud.signals import quiet_thread

_Serve = Callable[..., Awaitable[None]]
# Seconds a stopping device's thread gets before it is abandoned. A stop takes milliseconds
# (the cut ends any wait on the client's socket); only a thread blocked elsewhere -- in
# libvfio-user's plain eventfd_write to an interrupt fd the VMM made blocking and full, say
# (docs/libvfio-user-engine.md) -- takes longer, and would otherwise hold the stop forever.
STOP_GRACE = 5.0


class DeviceThread:
    """The daemon's handle on one device served on its own thread (a ``ServedDevice``)."""

    def __init__(self, name: str, serve: _Serve) -> None:
        self.name = name
        self.server: LibvfioUserServer | None = None  # once the child's socket listens
        self._serve = serve
        self._lock = threading.Lock()  # guards the child's token and nursery against stop()
        self._token: trio.lowlevel.TrioToken | None = None
        self._nursery: trio.Nursery | None = None
        self._stopping = False
        self.thread_done = threading.Event()  # the thread has left the library for good

    @property
    def connections(self) -> int:
        return 0 if self.server is None else self.server.connections

    @property
    def socket_path(self) -> Path | None:
        return None if self.server is None else self.server.socket_path

    def status(self) -> dict[str, Any]:
        # The daemon lists a device once it listens, when server is set.
        return {} if self.server is None else self.server.status()

    async def wait_idle(self) -> None:
        """Until no client is attached or negotiating, or the device's loop is stopping
        (its client is then cut off): the server's own wait, run in the device's loop;
        used by tests."""
        server, token, nursery = self.server, self._token, self._nursery
        if server is None or token is None or nursery is None:
            return
        parent = trio.lowlevel.current_trio_token()
        idle = trio.Event()

        async def wait_in_child() -> None:
            try:
                await server.wait_idle()
            finally:  # cancelled too: the device stops, and nothing else would tell us
                parent.run_sync_soon(idle.set)

        def start_in_child() -> None:
            try:
                nursery.start_soon(wait_in_child)
            except RuntimeError:
                # The nursery has closed: the loop is ending. (Raised from a run_sync_soon
                # callback, it would crash that loop.)
                parent.run_sync_soon(idle.set)

        try:
            token.run_sync_soon(start_in_child)
        except trio.RunFinishedError:
            return  # the device's loop has ended: nobody is attached
        await idle.wait()

    async def retire(self, *, only_if_idle: bool = False) -> bool:
        """The server's :meth:`~vgpud.libvfio_user.engine.LibvfioUserServer.retire`, run in
        the device's loop (its state is that thread's); then :meth:`run` returns once the
        device's client has been served. True too when the device's loop has ended."""
        server, token = self.server, self._token
        assert server is not None and token is not None, "retire() a device that listens"
        parent = trio.lowlevel.current_trio_token()
        answered = trio.Event()
        retired = [True]

        def in_child() -> None:
            try:
                retired[0] = server.retire(only_if_idle=only_if_idle)
            finally:
                with contextlib.suppress(trio.RunFinishedError):
                    parent.run_sync_soon(answered.set)

        try:
            token.run_sync_soon(in_child)  # if it does not raise, it runs (trio's promise)
        except trio.RunFinishedError:
            return True  # the device's loop has ended: there is nothing left to serve
        await answered.wait()
        return retired[0]

    async def run(self, task_status: trio.TaskStatus[DeviceThread]) -> None:
        """Serve on a new thread until :meth:`stop`; ``task_status`` once it listens.

        Start-up errors (``EngineUnavailable``, ``ListenerError``) come out as themselves."""
        parent = trio.lowlevel.current_trio_token()

        def started(server: LibvfioUserServer) -> None:  # in the parent's loop
            self.server = server
            if self._stopping:
                # stop() came before this news and had no server to cut, while the device's
                # loop went on serving: a client may have it blocked in the library already.
                # (stop() sets the flag before it looks at the server: no gap, as in cut_all.)
                server.watchdog.cut_all()
            task_status.started(self)

        finished = trio.Event()

        def body() -> None:
            try:
                self._thread_main(parent, started)
            except BaseException:
                if self._stopping:  # run() has been cancelled: nobody will see it raised
                    self._log().exception("device thread failed while stopping")
                raise
            finally:
                self.thread_done.set()
                with contextlib.suppress(trio.RunFinishedError):
                    parent.run_sync_soon(finished.set)

        try:
            with _single_error_unwrapped():
                await trio.to_thread.run_sync(
                    quiet_thread(body),
                    thread_name=f"vgpud-{self.name}",
                    limiter=trio.CapacityLimiter(1),  # not the default limiter's 40 threads
                    abandon_on_cancel=True,  # the wait below decides
                )
        except trio.Cancelled:
            if not self.stop():
                # No loop yet (the cancel may even have come before the thread started):
                # one that starts now sees the stop and returns before serving anything.
                raise
            with trio.CancelScope(shield=True):
                with trio.move_on_after(STOP_GRACE):
                    await finished.wait()
                if not finished.is_set():
                    self._abandon()
            raise

    def _abandon(self) -> None:
        """The device's thread is stuck where no cut reaches: leave it to die with the
        process, and remove what its context would have removed on the way out."""
        self._log().error(
            "device did not stop, abandoning its thread",
            grace_seconds=STOP_GRACE,
            likely_cause="blocked writing to an interrupt fd the VMM passed (a blocking "
            "eventfd at its maximum count, a full pipe)",
        )
        if self.server is not None:
            self.server.forsake()

    def _log(self) -> Any:
        return structlog.get_logger("vgpud").bind(device=self.name, engine="libvfio-user")

    def stop(self) -> bool:
        """Cancel the device's loop (from any thread); it removes its socket and returns.
        Whether there was a loop to cancel (none: it will not serve, should it start)."""
        with self._lock:
            self._stopping = True
            token, nursery = self._token, self._nursery
        if token is not None and nursery is not None:
            try:
                token.run_sync_soon(nursery.cancel_scope.cancel)
            except trio.RunFinishedError:
                pass
        if self.server is not None:
            # The loop sees the cancel only once vfu_run_ctx returns. (No server yet: the
            # news that the device listens is on its way, and run()'s started() cuts.)
            self.server.watchdog.cut_all()
        return token is not None

    def _thread_main(
        self,
        parent: trio.lowlevel.TrioToken,
        started: Callable[[LibvfioUserServer], None],
    ) -> None:
        with _single_error_unwrapped():
            trio.run(self._child_main, parent, started)

    async def _child_main(
        self,
        parent: trio.lowlevel.TrioToken,
        started: Callable[[LibvfioUserServer], None],
    ) -> None:
        async with trio.open_nursery() as nursery:
            with self._lock:
                if self._stopping:
                    return
                self._token = trio.lowlevel.current_trio_token()
                self._nursery = nursery
            server = await nursery.start(self._serve)
            try:
                parent.run_sync_soon(started, server)
            except trio.RunFinishedError:
                nursery.cancel_scope.cancel()


async def serve_device_on_thread(
    built: BuiltDevice,
    socket_path: Path,
    *,
    task_status: trio.TaskStatus[DeviceThread] = trio.TASK_STATUS_IGNORED,
    **options: Any,
) -> None:
    """:func:`~vgpud.libvfio_user.engine.serve_device` (same ``options``) on a thread of its
    own, until cancelled; ``task_status.started`` gets the :class:`DeviceThread`."""
    device_thread = DeviceThread(
        built.name, functools.partial(serve_device, built, socket_path, **options)
    )
    await device_thread.run(task_status)


@contextlib.contextmanager
def _single_error_unwrapped() -> Iterator[None]:
    """A nursery wraps what fails in it in an exception group; a start-up error that is all
    the group holds is handed on as itself (the daemon reports it in one line)."""
    try:
        yield
    except BaseExceptionGroup as group:
        leaves = list(_leaves(group))
        if len(leaves) != 1 or isinstance(leaves[0], trio.Cancelled):
            raise
        raise leaves[0] from None


def _leaves(group: BaseExceptionGroup[BaseException]) -> Iterator[BaseException]:
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            yield from _leaves(exc)
        else:
            yield exc
