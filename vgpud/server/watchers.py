"""Waiting, for a synchronous device, on the eventfds the VMM signals to it.

Under KVM, QEMU wires INTx as an irqfd plus a *resample* eventfd that KVM signals when the
guest EOIs the line (spec vfio-user.md §3.8, §5.6): the device must then unmask and, if it
still asserts the line, interrupt again. A ``VfioDevice`` is synchronous and cannot wait, so
the engine does it for devices that implement ``backends.device.WatchesFds``.

The fds are the device's: it may close one (and the kernel reuse its number) inside
``set_irqs``/``reset``/``close``. So around those calls every watcher is stopped first --
``notify_closing`` tells trio the fd is going away, which it requires before a close -- and
restarted after for whatever the device then lists.
"""

from __future__ import annotations

from typing import Any

import trio

from backends.device import VfioDevice, WatchesFds


class FdWatchers:
    """One watcher task per fd the device wants watched, in the session's nursery."""

    def __init__(self, nursery: trio.Nursery | None, device: VfioDevice, log: Any) -> None:
        # Without a nursery (a session driven synchronously, e.g. benchmarks/codec.py)
        # nothing is watched.
        self._nursery = nursery
        self._device = device if isinstance(device, WatchesFds) else None
        self._log = log
        self._scopes: dict[int, trio.CancelScope] = {}

    def start(self) -> None:
        """Watch what the device lists now."""
        if self._device is None or self._nursery is None:
            return
        for fd in self._device.watched_fds():
            if fd >= 0 and fd not in self._scopes:
                scope = trio.CancelScope()
                self._scopes[fd] = scope
                self._nursery.start_soon(self._watch, self._device, fd, scope)

    def stop(self) -> None:
        """Stop every watcher before the device may close its fds."""
        for fd, scope in self._scopes.items():
            scope.cancel()
            trio.lowlevel.notify_closing(fd)
        self._scopes.clear()

    async def _watch(self, device: WatchesFds, fd: int, scope: trio.CancelScope) -> None:
        with scope:
            while True:
                try:
                    await trio.lowlevel.wait_readable(fd)
                except (trio.ClosedResourceError, OSError):
                    return
                try:
                    device.fd_readable(fd)
                except Exception:
                    self._log.exception("device failed handling a signalled eventfd", fd=fd)
                    return
