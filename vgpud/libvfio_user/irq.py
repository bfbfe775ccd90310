"""Interrupts under libvfio-user: the device's eventfds forwarded to ``vfu_irq_trigger``.

The two models differ. ``VfioDevice.set_irqs`` hands the device the client's eventfds and the
device signals them (backends/irq.py). libvfio-user keeps the client's eventfds to itself (it
answers SET_IRQS TRIGGER without telling the device) and offers ``vfu_irq_trigger(subindex)``,
which signals whatever eventfd the client last wired to that vector -- INTx, MSI and MSI-X
share one array there, indexed by vector.

So each attached client gets a bridge: one eventfd of ours per vector ("proxy"), and the
device is given a dup of proxy *v* for vector *v* of INTx, MSI and MSI-X (ownership of the
dups passes to the device, as the contract says). The device keeps deciding which mechanism
fires from its own config space; whenever a proxy counts up we call ``vfu_irq_trigger(v)``.
All proxies sit in one epoll set, so a single ``wait_readable`` serves every vector and a
real backend whose kernel signals the eventfds asynchronously works too.

A vector the client has not wired yet (``vfu_irq_trigger`` says ENOENT) stays pending here
and is retried after every request the client sends -- QEMU wires an MSI-X vector when the
guest unmasks it (spec vfio-user.md §5.6), and the device would have kept it pending in its
PBA under the Python engine. libvfio-user logs "no fd for interrupt" at LOG_ERR on each
ENOENT, so a retry runs with ``quiet`` set and the engine's log callback drops what the
library says meanwhile: one doorbell to an unwired vector made every later request log a
warning line (found by a device fuzz). A device reset drops what is pending (:meth:`reset`),
as it clears the device's own pending bits; so does an FLR the guest writes to config space
(:meth:`drop_pending`).
"""

from __future__ import annotations

import errno
import os
import select
from collections.abc import Callable
from typing import Any

from backends.device import INTX_IRQ_INDEX, MSI_IRQ_INDEX, MSIX_IRQ_INDEX, IrqAction, VfioDevice
from vgpud.log_limit import LogLimiter

FORWARDED_IRQS = (INTX_IRQ_INDEX, MSI_IRQ_INDEX, MSIX_IRQ_INDEX)


class IrqBridge:
    """Proxy eventfds between a ``VfioDevice`` and ``vfu_irq_trigger``."""

    def __init__(
        self,
        counts: dict[int, int],
        trigger: Callable[[int], int],
        log: Any,
        log_limit: LogLimiter,
    ) -> None:
        """``counts``: vectors per forwarded irq index; ``trigger(v)`` returns 0 or an errno."""
        self._counts = {index: counts.get(index, 0) for index in FORWARDED_IRQS}
        self._trigger = trigger
        self._log = log
        self._log_limit = log_limit
        self._proxies: list[int] = []
        self._epoll = select.epoll(flags=select.EPOLL_CLOEXEC)
        self.pending: set[int] = set()
        # True while a retry is in the library: its "no fd" complaint is expected.
        self.quiet = False
        try:
            for _ in range(max(self._counts.values(), default=0)):
                fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
                self._proxies.append(fd)
                self._epoll.register(fd, select.EPOLLIN)
        except BaseException:
            self.close()
            raise
        self._vector_of = {fd: vector for vector, fd in enumerate(self._proxies)}

    def fileno(self) -> int:
        """The epoll fd: readable when any proxy was signalled."""
        return self._epoll.fileno()

    def connect(self, device: VfioDevice) -> None:
        """Give ``device`` fresh dups of the proxies (a client has attached)."""
        self.reset()  # nothing of the previous client's is delivered to this one
        for index, count in self._counts.items():
            if count:
                dups = [os.dup(self._proxies[v]) for v in range(count)]
                # Ownership of the dups passes to the device on every path (even a refusal).
                device.set_irqs(index, IrqAction.TRIGGER, 0, count, eventfds=dups)

    def drain(self) -> None:
        """Forward every signalled proxy to the client, then retry what was pending."""
        for fd, _ in self._epoll.poll(0):
            if _drain_eventfd(fd):
                self._forward(self._vector_of[fd])
        self.retry_pending()

    def retry_pending(self) -> None:
        """Forward the vectors that were not wired yet; no syscall when there are none."""
        if self.pending:
            self.quiet = True
            try:
                for vector in sorted(self.pending):
                    self.pending.discard(vector)
                    self._forward(vector)
            finally:
                self.quiet = False

    def reset(self) -> None:
        """The device is about to be reset: interrupts it raised and the client has not got
        yet (pending, or still counted in a proxy) are dropped, as the reset drops them in
        the device (an interrupt raised before DEVICE_RESET used to arrive after it)."""
        self.pending.clear()
        for fd in self._proxies:
            _drain_eventfd(fd)

    def drop_pending(self) -> None:
        """The device reset itself (an FLR the guest wrote): the vectors still waiting for
        the client to wire them are dropped, as the reset dropped them in the device. What
        the proxies count now was raised by the reset itself, and is kept."""
        self.pending.clear()

    def _forward(self, vector: int) -> None:
        err = self._trigger(vector)
        if err == errno.ENOENT:
            self.pending.add(vector)  # not wired by the client yet: keep it
        elif err:
            self._log_limit.log(
                self._log, "warning", "vfu_irq_trigger failed", vector=vector, errno=err
            )

    def close(self) -> None:
        """Close the proxies and the epoll set (the device closes its own dups)."""
        for fd in self._proxies:
            os.close(fd)
        self._proxies = []
        self._epoll.close()


def _drain_eventfd(fd: int) -> bool:
    try:
        os.eventfd_read(fd)
    except BlockingIOError:
        return False
    return True
