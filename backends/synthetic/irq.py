"""Interrupt delivery of the synthetic GPU: INTx, MSI, MSI-X, ERR and REQ over eventfds.

Which mechanism fires is decided the way a PCI function decides it, from its own config
space (QEMU forwards every guest config write, spec vfio-user.md §5.3): MSI-X when its enable
bit is set, else MSI when enabled, else the INTx line unless COMMAND.INTX_DISABLE is set.

* MSI-X: a vector that is function-masked, masked in the device's copy of the table, or has
  no eventfd yet gets its PBA bit set instead; the pending interrupt is delivered as soon as
  that changes (unmask, or QEMU assigning the eventfd -- which is how QEMU tells a server a
  guest unmasked a vector, spec vfio-user.md §5.6).
* INTx is level-triggered and automasked (spec vfio-user.md §5.6): signalling masks the line
  until an UNMASK; an UNMASK while the device still asserts signals again. STATUS.INTx
  mirrors the line. The line drops when the driver acknowledges (BAR0 INTX_STATUS).

QEMU emulates the MSI-X table itself and never forwards table writes, so the device's copy
starts with every vector *unmasked* (the PCI reset value is masked). Otherwise doorbells
could never fire under QEMU; region reads/writes of the table still behave like a table.
"""

from __future__ import annotations

import errno
from collections.abc import Mapping, Sequence
from typing import Any

from backends.device import (
    ERR_IRQ_INDEX,
    INTX_IRQ_INDEX,
    MSI_IRQ_INDEX,
    MSIX_IRQ_INDEX,
    NUM_PCI_IRQS,
    REQ_IRQ_INDEX,
    DeviceError,
    IrqAction,
    IrqInfo,
    IrqInfoFlags,
)
from backends.irq import (
    EventfdTable,
    adopt_eventfds,
    close_fds,
    drain_eventfd,
    same_eventfd,
    signal_eventfd,
    validate_set_irqs,
)
from backends.synthetic.capabilities import (
    MSI_FLAGS,
    MSI_FLAGS_ENABLE,
    MSI_MASK,
    MSI_OFFSET,
    MSI_PENDING,
    MSIX_ENTRY_SIZE,
    MSIX_FLAGS,
    MSIX_FLAGS_ENABLE,
    MSIX_FLAGS_MASKALL,
    MSIX_OFFSET,
)
from backends.synthetic.config_space import (
    PCI_COMMAND,
    PCI_COMMAND_INTX_DISABLE,
    PCI_STATUS,
    PCI_STATUS_INTERRUPT,
    ConfigSpace,
)

MSIX_VECTOR_CTRL = 12
MSIX_VECTOR_MASKED = 1


class InterruptController:
    """Eventfds, line state, MSI-X table/PBA and the delivery rules of one device."""

    def __init__(self, cfg: ConfigSpace, msi_vectors: int, msix_vectors: int) -> None:
        self._cfg = cfg
        self._msi_vectors = msi_vectors
        self._msix_vectors = msix_vectors
        self._counts = {
            INTX_IRQ_INDEX: 1,  # interrupt pin 1
            MSI_IRQ_INDEX: msi_vectors,
            MSIX_IRQ_INDEX: msix_vectors,
            ERR_IRQ_INDEX: 1,
            REQ_IRQ_INDEX: 1,
        }
        self._tables = {index: EventfdTable(n) for index, n in self._counts.items()}
        self._intx_unmask_fd = -1
        self.msix_table = bytearray(msix_vectors * MSIX_ENTRY_SIZE)
        self.msix_pending = 0
        self.intx_asserted = False
        self.intx_masked = False

    # -- VFIO irq interface --------------------------------------------------------------

    def irq_info(self, index: int) -> IrqInfo:
        """Flags and counts as vfio-pci-core's ``VFIO_DEVICE_GET_IRQ_INFO`` gives them (spec
        vfio-user.md §3.7): INTx maskable and automasked; every other index NORESIZE except
        MSI-X, which can grow while enabled (dynamic MSI-X, §5.6)."""
        if index == INTX_IRQ_INDEX:
            flags = IrqInfoFlags.EVENTFD | IrqInfoFlags.MASKABLE | IrqInfoFlags.AUTOMASKED
        elif index in (MSI_IRQ_INDEX, ERR_IRQ_INDEX, REQ_IRQ_INDEX):
            # ERR and REQ too: the kernel's "index != MSI-X || !has_dyn_msix" branch (found
            # by an audit against vfio_pci_ioctl_get_irq_info; they had EVENTFD only).
            flags = IrqInfoFlags.EVENTFD | IrqInfoFlags.NORESIZE
        elif index == MSIX_IRQ_INDEX:
            flags = IrqInfoFlags.EVENTFD
            if not self._msix_vectors:  # no MSI-X, so no dynamic MSI-X: has_dyn_msix false
                flags |= IrqInfoFlags.NORESIZE
        else:
            raise DeviceError(errno.EINVAL, f"irq index {index} out of range 0..{NUM_PCI_IRQS}")
        return IrqInfo(index=index, flags=flags, count=self._counts[index])

    def set_irqs(
        self,
        index: int,
        action: IrqAction,
        start: int,
        count: int,
        *,
        eventfds: Sequence[int] | None,
        data_bool: Sequence[bool] | None,
    ) -> None:
        """``VFIO_DEVICE_SET_IRQS``; owns every fd in ``eventfds`` from the first line on."""
        try:
            validate_set_irqs(
                index,
                action,
                start,
                count,
                self._counts.get(index, 0),
                eventfds=eventfds,
                data_bool=data_bool,
            )
            if action is not IrqAction.TRIGGER and index != INTX_IRQ_INDEX:
                # Only INTx is MASKABLE (irq_info); the kernel has no MSI/MSI-X masking
                # through SET_IRQS either.
                raise DeviceError(errno.EINVAL, f"irq index {index} cannot be (un)masked")
            if action is IrqAction.MASK and eventfds is not None:
                raise DeviceError(errno.EINVAL, "INTx MASK takes no eventfd")
            adopt_eventfds(eventfds or ())
            if index == INTX_IRQ_INDEX and eventfds:
                self._check_intx_pair(action, eventfds[0])
        except DeviceError:
            close_fds(eventfds or ())
            raise
        if count == 0:
            self._disable(index)
        elif action is IrqAction.TRIGGER:
            self._trigger(index, start, count, eventfds, data_bool)
        else:
            self._intx_mask(action, eventfds, data_bool)

    def _check_intx_pair(self, action: IrqAction, fd: int) -> None:
        """The INTx trigger and its resampler must be two eventfds: with one, every
        interrupt would unmask itself and re-signal at once, for as long as the line is
        asserted, and the daemon would spin (found by an adversarial run)."""
        if action is IrqAction.TRIGGER:
            other = self._intx_unmask_fd
        elif action is IrqAction.UNMASK:
            other = self._tables[INTX_IRQ_INDEX].get(0)
        else:
            return
        if fd >= 0 and other >= 0 and same_eventfd(fd, other):
            raise DeviceError(
                errno.EINVAL, "the INTx trigger and unmask (resample) eventfds are one eventfd"
            )

    def _disable(self, index: int) -> None:
        self._tables[index].clear()
        if index == INTX_IRQ_INDEX:
            close_fds((self._intx_unmask_fd,))
            self._intx_unmask_fd = -1
            self.intx_masked = False

    def _trigger(
        self,
        index: int,
        start: int,
        count: int,
        eventfds: Sequence[int] | None,
        data_bool: Sequence[bool] | None,
    ) -> None:
        table = self._tables[index]
        if eventfds is not None:
            table.assign(start, list(eventfds) if eventfds else [-1] * count)
            self._update()
            return
        # DATA_NONE / DATA_BOOL: the client fires the interrupt (spec vfio-user.md §3.8),
        # which the kernel implements as signalling the trigger eventfd directly.
        for i in range(count):
            if data_bool is not None and not data_bool[i]:
                continue
            if table.signal(start + i) and index == INTX_IRQ_INDEX:
                self.intx_masked = True

    def _intx_mask(
        self,
        action: IrqAction,
        eventfds: Sequence[int] | None,
        data_bool: Sequence[bool] | None,
    ) -> None:
        if eventfds is not None:
            # UNMASK with an eventfd: the resampler KVM signals when the guest EOIs the line
            # (irqfd resample). The device owns it and lists it in watched_fds(); the engine
            # waits on it and calls fd_readable(), which unmasks like an UNMASK message.
            fd = eventfds[0] if eventfds else -1
            if self._intx_unmask_fd >= 0 and self._intx_unmask_fd != fd:
                close_fds((self._intx_unmask_fd,))
            self._intx_unmask_fd = fd
            return
        if data_bool is not None and not data_bool[0]:
            return
        self.intx_masked = action is IrqAction.MASK
        self._update()

    def watched_fds(self) -> tuple[int, ...]:
        """Eventfds the VMM signals *to* the device: the INTx resampler, if installed."""
        return (self._intx_unmask_fd,) if self._intx_unmask_fd >= 0 else ()

    def fd_readable(self, fd: int) -> None:
        """The VMM signalled ``fd``: drain it and act (INTx resample = unmask)."""
        if fd != self._intx_unmask_fd or fd < 0:
            return
        if drain_eventfd(fd):
            self.intx_masked = False
            self._update()  # re-signals while the device still asserts the line

    # -- the device side ------------------------------------------------------------------

    def raise_vector(self, vector: int) -> None:
        """The device wants to interrupt with ``vector`` (a doorbell write)."""
        if self._msix_enabled:
            if not 0 <= vector < self._msix_vectors:
                return
            self.msix_pending |= 1 << vector
        elif self._msi_enabled:
            if not 0 <= vector < self._msi_enabled_vectors:
                return
            self._cfg.set_bits(MSI_OFFSET + MSI_PENDING, 4, 1 << vector, True)
        else:
            self.intx_asserted = True
        self._update()

    def intx_ack(self) -> None:
        """The driver acknowledged: the INTx line drops."""
        self.intx_asserted = False
        self._update()

    def config_written(self) -> None:
        """Config space changed (enable/mask bits, INTX_DISABLE): deliver what is now due."""
        self._update()

    def reset(self) -> None:
        """Function reset: interrupt state cleared, eventfds stay (the VMM's wiring)."""
        self.msix_table[:] = bytes(len(self.msix_table))
        self.msix_pending = 0
        self.intx_asserted = False
        self.intx_masked = False
        self._update()

    def close(self) -> None:
        """The client went away: every eventfd is closed; the line state is forgotten."""
        for index in self._tables:
            self._disable(index)
        self.intx_asserted = False
        self._update()

    def handover(self) -> tuple[dict[str, Any], list[int]]:
        """The interrupt state and the client's eventfds (backends.device.HandsOver)."""
        eventfds = {str(index): table.fds() for index, table in self._tables.items()}
        state = {
            "eventfds": eventfds,
            "intx_unmask_fd": self._intx_unmask_fd,
            "msix_table": self.msix_table.hex(),
            "msix_pending": self.msix_pending,
            "intx_asserted": self.intx_asserted,
            "intx_masked": self.intx_masked,
        }
        fds = [fd for table in self._tables.values() for fd in table.fds() if fd >= 0]
        if self._intx_unmask_fd >= 0:
            fds.append(self._intx_unmask_fd)
        return state, fds

    def take_over(self, state: Mapping[str, Any]) -> None:
        """Carry on from :meth:`handover`'s state (another process's); checked whole before
        anything is taken (ValueError, KeyError, TypeError)."""
        eventfds = {int(index): [int(fd) for fd in fds] for index, fds in state["eventfds"].items()}
        msix_table = bytes.fromhex(state["msix_table"])
        if {i: len(fds) for i, fds in eventfds.items()} != self._counts or len(msix_table) != len(
            self.msix_table
        ):
            raise ValueError("interrupt state of another device shape")
        unmask_fd, pending = int(state["intx_unmask_fd"]), int(state["msix_pending"])
        asserted, masked = bool(state["intx_asserted"]), bool(state["intx_masked"])
        for index, fds in eventfds.items():
            self._tables[index].assign(0, fds)
        self._intx_unmask_fd = unmask_fd
        self.msix_table[:] = msix_table
        self.msix_pending = pending
        self.intx_asserted, self.intx_masked = asserted, masked

    def eventfd(self, index: int, vector: int) -> int:
        """The trigger eventfd installed for ``vector`` of ``index`` (-1 if none)."""
        return self._tables[index].get(vector)

    # -- delivery ------------------------------------------------------------------------

    @property
    def _msix_enabled(self) -> bool:
        if not self._msix_vectors:  # no capability: those config bytes are not its flags
            return False
        return bool(self._cfg.u16(MSIX_OFFSET + MSIX_FLAGS) & MSIX_FLAGS_ENABLE)

    @property
    def _msi_enabled(self) -> bool:
        return bool(self._cfg.u16(MSI_OFFSET + MSI_FLAGS) & MSI_FLAGS_ENABLE)

    @property
    def _msi_enabled_vectors(self) -> int:
        mme = (self._cfg.u16(MSI_OFFSET + MSI_FLAGS) >> 4) & 0x7
        return min(1 << mme, self._msi_vectors)

    def _msix_masked(self, vector: int) -> bool:
        if self._cfg.u16(MSIX_OFFSET + MSIX_FLAGS) & MSIX_FLAGS_MASKALL:
            return True
        ctrl = self.msix_table[vector * MSIX_ENTRY_SIZE + MSIX_VECTOR_CTRL]
        return bool(ctrl & MSIX_VECTOR_MASKED)

    def _update(self) -> None:
        """Deliver every pending interrupt whose path is open; keep STATUS.INTx current."""
        if self._msix_enabled and self.msix_pending:
            table = self._tables[MSIX_IRQ_INDEX]
            for vector in range(self._msix_vectors):
                bit = 1 << vector
                due = self.msix_pending & bit and not self._msix_masked(vector)
                if due and table.signal(vector):
                    self.msix_pending &= ~bit
        if self._msi_enabled:
            pending = self._cfg.u32(MSI_OFFSET + MSI_PENDING)
            masked = self._cfg.u32(MSI_OFFSET + MSI_MASK)
            table = self._tables[MSI_IRQ_INDEX]
            for vector in range(self._msi_enabled_vectors):
                bit = 1 << vector
                if pending & bit and not masked & bit and table.signal(vector):
                    self._cfg.set_bits(MSI_OFFSET + MSI_PENDING, 4, bit, False)
        self._cfg.set_bits(PCI_STATUS, 2, PCI_STATUS_INTERRUPT, self.intx_asserted)
        disabled = self._cfg.u16(PCI_COMMAND) & PCI_COMMAND_INTX_DISABLE
        if self.intx_asserted and not self.intx_masked and not disabled:
            fd = self._tables[INTX_IRQ_INDEX].get(0)
            if fd >= 0:
                signal_eventfd(fd)
                self.intx_masked = True  # AUTOMASKED
