"""Interrupts of the synthetic GPU: irq_info, SET_IRQS validation, eventfd ownership, delivery."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from backends.device import (
    BAR0_REGION_INDEX,
    ERR_IRQ_INDEX,
    INTX_IRQ_INDEX,
    MSI_IRQ_INDEX,
    MSIX_IRQ_INDEX,
    REQ_IRQ_INDEX,
    DeviceError,
    IrqAction,
    IrqInfoFlags,
)
from backends.irq import EventfdTable
from backends.synthetic import SyntheticGpu, get_profile
from backends.synthetic.bar0 import DOORBELL, INTX_STATUS
from backends.synthetic.capabilities import (
    MSI_OFFSET,
    MSIX_OFFSET,
    PCI_CAP_ID_EXP,
    PCI_CAP_ID_MSI,
    PCI_CAP_ID_PM,
)
from backends.synthetic.config_space import PCI_CAPABILITY_LIST
from backends.synthetic.profiles import GIB
from tests.backends.helpers import (
    FakeClock,
    cfg_read,
    cfg_write,
    eventfd_count,
    new_eventfd,
    open_fds,
)

E = IrqInfoFlags


@pytest.mark.parametrize(
    ("index", "flags", "count"),
    [
        (INTX_IRQ_INDEX, E.EVENTFD | E.MASKABLE | E.AUTOMASKED, 1),
        (MSI_IRQ_INDEX, E.EVENTFD | E.NORESIZE, 16),
        (MSIX_IRQ_INDEX, E.EVENTFD, 16),  # no NORESIZE (spec vfio-user.md §5.6)
        # NORESIZE as vfio_pci_ioctl_get_irq_info sets it for every index but MSI-X.
        (ERR_IRQ_INDEX, E.EVENTFD | E.NORESIZE, 1),
        (REQ_IRQ_INDEX, E.EVENTFD | E.NORESIZE, 1),
    ],
)
def test_irq_info(gpu: SyntheticGpu, index: int, flags: IrqInfoFlags, count: int) -> None:
    info = gpu.irq_info(index)
    assert (info.index, info.flags, info.count) == (index, flags, count)


def test_irq_info_out_of_range(gpu: SyntheticGpu) -> None:
    with pytest.raises(DeviceError):
        gpu.irq_info(5)


def doorbell(gpu: SyntheticGpu, vector: int) -> None:
    gpu.region_write(BAR0_REGION_INDEX, DOORBELL, vector.to_bytes(4, "little"))


# (index, action, start, count, n_eventfds or None, bools or None)
BAD_SET_IRQS: list[tuple[int, IrqAction, int, int, int | None, list[bool] | None]] = [
    (MSIX_IRQ_INDEX, IrqAction.TRIGGER, 16, 1, 1, None),  # start out of range
    (MSIX_IRQ_INDEX, IrqAction.TRIGGER, 15, 2, 2, None),  # start+count out of range
    (MSIX_IRQ_INDEX, IrqAction.TRIGGER, 0, 2, 1, None),  # fd count != count
    (MSIX_IRQ_INDEX, IrqAction.TRIGGER, 0, 0, 1, None),  # count 0 with fds
    (MSIX_IRQ_INDEX, IrqAction.TRIGGER, 1, 0, None, None),  # count 0 needs start 0
    (MSIX_IRQ_INDEX, IrqAction.MASK, 0, 0, None, None),  # count 0 needs TRIGGER
    (MSIX_IRQ_INDEX, IrqAction.MASK, 0, 1, None, None),  # MSI-X is not maskable
    (ERR_IRQ_INDEX, IrqAction.UNMASK, 0, 1, 1, None),  # ERR is TRIGGER only
    (ERR_IRQ_INDEX, IrqAction.TRIGGER, 0, 2, 2, None),
    (REQ_IRQ_INDEX, IrqAction.MASK, 0, 1, None, None),
    (INTX_IRQ_INDEX, IrqAction.MASK, 0, 1, 1, None),  # MASK takes no eventfd
    (INTX_IRQ_INDEX, IrqAction.TRIGGER, 0, 1, None, [True, False]),  # bools != count
    (7, IrqAction.TRIGGER, 0, 1, 1, None),  # no such index
]


BadCase = tuple[int, IrqAction, int, int, int | None, Sequence[bool] | None]


@pytest.mark.parametrize("case", BAD_SET_IRQS)
def test_bad_set_irqs_is_einval_and_closes_fds(gpu: SyntheticGpu, case: BadCase) -> None:
    index, action, start, count, nfds, bools = case
    before = open_fds()
    fds = [os.eventfd(0, os.EFD_NONBLOCK) for _ in range(nfds)] if nfds is not None else None
    with pytest.raises(DeviceError) as err:
        gpu.set_irqs(index, action, start, count, eventfds=fds, data_bool=bools)
    assert err.value.errno == errno.EINVAL
    assert open_fds() == before


def test_eventfds_are_owned_replaced_and_closed(gpu: SyntheticGpu) -> None:
    before = open_fds()
    fds = [os.eventfd(0, os.EFD_NONBLOCK) for _ in range(4)]
    gpu.set_irqs(MSIX_IRQ_INDEX, IrqAction.TRIGGER, 0, 4, eventfds=fds)
    assert len(open_fds() - before) == 4
    replacement = os.eventfd(0, os.EFD_NONBLOCK)
    gpu.set_irqs(MSIX_IRQ_INDEX, IrqAction.TRIGGER, 1, 1, eventfds=[replacement])
    assert len(open_fds() - before) == 4  # the old vector-1 fd was closed
    gpu.set_irqs(MSIX_IRQ_INDEX, IrqAction.TRIGGER, 2, 2, eventfds=[-1, -1])  # de-assign
    assert len(open_fds() - before) == 2
    gpu.set_irqs(MSIX_IRQ_INDEX, IrqAction.TRIGGER, 0, 0)  # disable all
    assert open_fds() == before


def test_close_releases_every_eventfd(gpu: SyntheticGpu) -> None:
    before = open_fds()
    gpu.set_irqs(INTX_IRQ_INDEX, IrqAction.TRIGGER, 0, 1, eventfds=[os.eventfd(0)])
    gpu.set_irqs(INTX_IRQ_INDEX, IrqAction.UNMASK, 0, 1, eventfds=[os.eventfd(0)])
    gpu.set_irqs(ERR_IRQ_INDEX, IrqAction.TRIGGER, 0, 1, eventfds=[os.eventfd(0)])
    gpu.set_irqs(MSI_IRQ_INDEX, IrqAction.TRIGGER, 0, 2, eventfds=[os.eventfd(0), os.eventfd(0)])
    gpu.close()
    assert open_fds() == before


def test_eventfd_table_signal_and_clear() -> None:
    table = EventfdTable(2)
    fd, observer = new_eventfd()
    table.assign(1, [fd])
    assert table.assigned() == [1]
    assert not table.signal(0)
    assert table.signal(1)
    assert eventfd_count(observer) == 1
    table.clear()
    assert table.get(1) == -1
    os.close(observer)


def test_msix_doorbell_signals_vector(gpu: SyntheticGpu) -> None:
    fd, observer = new_eventfd()
    cfg_write(gpu, MSIX_OFFSET + 2, 2, 0x8000)  # MSI-X enable
    gpu.set_irqs(MSIX_IRQ_INDEX, IrqAction.TRIGGER, 3, 1, eventfds=[fd])
    doorbell(gpu, 3)
    doorbell(gpu, 3)
    assert eventfd_count(observer) == 2
    assert gpu.region_read(BAR0_REGION_INDEX, 0x3000, 8) == bytes(8)
    os.close(observer)


def test_msix_pending_until_unmasked_or_assigned(gpu: SyntheticGpu) -> None:
    fd, observer = new_eventfd()
    cfg_write(gpu, MSIX_OFFSET + 2, 2, 0xC000)  # enable + function mask
    gpu.set_irqs(MSIX_IRQ_INDEX, IrqAction.TRIGGER, 0, 1, eventfds=[fd])
    doorbell(gpu, 0)
    doorbell(gpu, 5)  # no eventfd for vector 5
    assert eventfd_count(observer) == 0
    assert int.from_bytes(gpu.region_read(BAR0_REGION_INDEX, 0x3000, 4), "little") == 0x21
    cfg_write(gpu, MSIX_OFFSET + 2, 2, 0x8000)  # function mask cleared: vector 0 delivered
    assert eventfd_count(observer) == 1
    assert int.from_bytes(gpu.region_read(BAR0_REGION_INDEX, 0x3000, 4), "little") == 0x20
    fd5, observer5 = new_eventfd()
    gpu.set_irqs(MSIX_IRQ_INDEX, IrqAction.TRIGGER, 5, 1, eventfds=[fd5])
    assert eventfd_count(observer5) == 1
    assert gpu.region_read(BAR0_REGION_INDEX, 0x3000, 4) == bytes(4)
    os.close(observer)
    os.close(observer5)


def test_msix_table_entry_mask(gpu: SyntheticGpu) -> None:
    fd, observer = new_eventfd()
    cfg_write(gpu, MSIX_OFFSET + 2, 2, 0x8000)
    gpu.set_irqs(MSIX_IRQ_INDEX, IrqAction.TRIGGER, 1, 1, eventfds=[fd])
    ctrl = 0x2000 + 16 * 1 + 12
    gpu.region_write(BAR0_REGION_INDEX, ctrl, (1).to_bytes(4, "little"))
    doorbell(gpu, 1)
    assert eventfd_count(observer) == 0
    gpu.region_write(BAR0_REGION_INDEX, ctrl, (0).to_bytes(4, "little"))
    assert eventfd_count(observer) == 1
    os.close(observer)


def test_msi_doorbell(gpu: SyntheticGpu) -> None:
    fds = [new_eventfd() for _ in range(2)]
    cfg_write(gpu, MSI_OFFSET + 2, 2, 0x0011)  # enable, 2 vectors
    gpu.set_irqs(MSI_IRQ_INDEX, IrqAction.TRIGGER, 0, 2, eventfds=[f for f, _ in fds])
    doorbell(gpu, 1)
    assert [eventfd_count(o) for _, o in fds] == [0, 1]
    doorbell(gpu, 4)  # beyond the enabled vectors: ignored
    cfg_write(gpu, MSI_OFFSET + 16, 4, 0x1)  # mask vector 0
    doorbell(gpu, 0)
    assert eventfd_count(fds[0][1]) == 0
    assert cfg_read(gpu, MSI_OFFSET + 20, 4) == 1  # pending
    cfg_write(gpu, MSI_OFFSET + 16, 4, 0x0)
    assert eventfd_count(fds[0][1]) == 1
    assert cfg_read(gpu, MSI_OFFSET + 20, 4) == 0
    for _, observer in fds:
        os.close(observer)


def test_intx_level_automask_unmask_ack(gpu: SyntheticGpu) -> None:
    fd, observer = new_eventfd()
    gpu.set_irqs(INTX_IRQ_INDEX, IrqAction.TRIGGER, 0, 1, eventfds=[fd])
    doorbell(gpu, 0)
    assert eventfd_count(observer) == 1
    assert cfg_read(gpu, 0x06, 2) & 0x08  # STATUS.INTx
    doorbell(gpu, 0)  # automasked: no second signal
    assert eventfd_count(observer) == 0
    gpu.set_irqs(INTX_IRQ_INDEX, IrqAction.UNMASK, 0, 1)  # still asserted: fires again
    assert eventfd_count(observer) == 1
    gpu.region_write(BAR0_REGION_INDEX, INTX_STATUS, (1).to_bytes(4, "little"))  # ack
    assert not cfg_read(gpu, 0x06, 2) & 0x08
    gpu.set_irqs(INTX_IRQ_INDEX, IrqAction.UNMASK, 0, 1)
    assert eventfd_count(observer) == 0
    os.close(observer)


def test_intx_disable_and_mask(gpu: SyntheticGpu) -> None:
    fd, observer = new_eventfd()
    gpu.set_irqs(INTX_IRQ_INDEX, IrqAction.TRIGGER, 0, 1, eventfds=[fd])
    cfg_write(gpu, 0x04, 2, 0x0402)  # INTX_DISABLE (and MEM, for the doorbell in BAR0)
    doorbell(gpu, 0)
    assert eventfd_count(observer) == 0
    assert cfg_read(gpu, 0x06, 2) & 0x08  # status still reports the interrupt
    gpu.set_irqs(INTX_IRQ_INDEX, IrqAction.MASK, 0, 1)
    cfg_write(gpu, 0x04, 2, 0x0002)
    assert eventfd_count(observer) == 0  # masked
    gpu.set_irqs(INTX_IRQ_INDEX, IrqAction.UNMASK, 0, 1, data_bool=[True])
    assert eventfd_count(observer) == 1
    os.close(observer)


def test_trigger_without_eventfd_data_fires_from_client(gpu: SyntheticGpu) -> None:
    fd, observer = new_eventfd()
    gpu.set_irqs(ERR_IRQ_INDEX, IrqAction.TRIGGER, 0, 1, eventfds=[fd])
    gpu.set_irqs(ERR_IRQ_INDEX, IrqAction.TRIGGER, 0, 1)
    gpu.set_irqs(ERR_IRQ_INDEX, IrqAction.TRIGGER, 0, 1, data_bool=[False])
    assert eventfd_count(observer) == 1
    os.close(observer)


def test_reset_keeps_eventfds_and_clears_state(gpu: SyntheticGpu) -> None:
    fd, observer = new_eventfd()
    gpu.set_irqs(MSIX_IRQ_INDEX, IrqAction.TRIGGER, 0, 1, eventfds=[fd])
    cfg_write(gpu, MSIX_OFFSET + 2, 2, 0xC000)
    doorbell(gpu, 0)
    gpu.reset()
    assert gpu.region_read(BAR0_REGION_INDEX, 0x3000, 8) == bytes(8)
    assert gpu.irqs.eventfd(MSIX_IRQ_INDEX, 0) == fd
    cfg_write(gpu, MSIX_OFFSET + 2, 2, 0x8000)
    doorbell(gpu, 0)
    assert eventfd_count(observer) == 1
    os.close(observer)


def test_intx_status_is_rw1c_writing_0_keeps_the_line(gpu: SyntheticGpu) -> None:
    doorbell(gpu, 0)  # MSI and MSI-X off: INTx asserted
    gpu.region_write(BAR0_REGION_INDEX, INTX_STATUS, (0).to_bytes(4, "little"))
    assert gpu.region_read(BAR0_REGION_INDEX, INTX_STATUS, 4) == (1).to_bytes(4, "little")
    assert cfg_read(gpu, 0x06, 2) & 0x08


def test_doorbell_past_the_msix_vectors_is_ignored(gpu: SyntheticGpu) -> None:
    cfg_write(gpu, MSIX_OFFSET + 2, 2, 0x8000)  # MSI-X enable, 16 vectors
    doorbell(gpu, 16)
    assert gpu.region_read(BAR0_REGION_INDEX, 0x3000, 8) == bytes(8)  # no phantom PBA bit


def test_intx_mask_with_a_false_bool_does_nothing(gpu: SyntheticGpu) -> None:
    fd, observer = new_eventfd()
    gpu.set_irqs(INTX_IRQ_INDEX, IrqAction.TRIGGER, 0, 1, eventfds=[fd])
    gpu.set_irqs(INTX_IRQ_INDEX, IrqAction.MASK, 0, 1, data_bool=[False])
    doorbell(gpu, 0)
    assert eventfd_count(observer) == 1  # the line was not masked
    os.close(observer)


@pytest.mark.parametrize("first", [IrqAction.TRIGGER, IrqAction.UNMASK])
def test_intx_trigger_and_resampler_must_be_two_eventfds(
    gpu: SyntheticGpu, first: IrqAction
) -> None:
    """One eventfd as both would make each interrupt unmask itself and re-signal, in a loop
    for as long as the line is asserted (the daemon spun at 100% CPU). Either order of the
    two SET_IRQS is refused at the second, whose fd is closed; the first stays wired."""
    before = open_fds()
    fd, observer = new_eventfd()
    second = os.dup(fd)  # the same eventfd, as a second fd (what the VMM would send)
    gpu.set_irqs(INTX_IRQ_INDEX, first, 0, 1, eventfds=[fd])
    then = IrqAction.UNMASK if first is IrqAction.TRIGGER else IrqAction.TRIGGER
    with pytest.raises(DeviceError, match="one eventfd") as caught:
        gpu.set_irqs(INTX_IRQ_INDEX, then, 0, 1, eventfds=[second])
    assert caught.value.errno == errno.EINVAL
    with pytest.raises(OSError):
        os.fstat(second)  # owned by the device, closed on refusal
    other, other_observer = new_eventfd()
    gpu.set_irqs(INTX_IRQ_INDEX, then, 0, 1, eventfds=[other])  # two eventfds: fine
    gpu.set_irqs(INTX_IRQ_INDEX, IrqAction.TRIGGER, 0, 0)  # disable: closes both
    os.close(observer)
    os.close(other_observer)
    assert open_fds() == before


# -- no MSI-X (``no_msix``: what QEMU 11.1.3 can hot-unplug) -------------------------------


@pytest.fixture
def gpu_without_msix(tmp_path: Path, clock: FakeClock) -> Iterator[SyntheticGpu]:
    profile = get_profile("gh200").with_overrides(memory_size=4 * GIB, msix_vectors=0)
    device = SyntheticGpu(profile, tmp_path / "mem", clock=clock)
    yield device
    device.shutdown()


def test_without_msix_the_capability_list_ends_at_pcie(gpu_without_msix: SyntheticGpu) -> None:
    found = []
    cap = cfg_read(gpu_without_msix, PCI_CAPABILITY_LIST, 1)
    while cap:
        found.append(cfg_read(gpu_without_msix, cap, 1))
        cap = cfg_read(gpu_without_msix, cap + 1, 1)
    assert found == [PCI_CAP_ID_PM, PCI_CAP_ID_MSI, PCI_CAP_ID_EXP]
    # Where the capability was, nothing: zeros, and a write does not stick.
    cfg_write(gpu_without_msix, MSIX_OFFSET + 2, 2, 0xC000)
    assert cfg_read(gpu_without_msix, MSIX_OFFSET, 12) == 0


def test_without_msix_the_irq_index_is_empty(gpu_without_msix: SyntheticGpu) -> None:
    info = gpu_without_msix.irq_info(MSIX_IRQ_INDEX)
    # As vfio-pci-core reports a device with no MSI-X capability: no dynamic MSI-X either.
    assert (info.count, info.flags) == (0, IrqInfoFlags.EVENTFD | IrqInfoFlags.NORESIZE)
    fd, observer = new_eventfd()
    with pytest.raises(DeviceError) as caught:
        gpu_without_msix.set_irqs(
            MSIX_IRQ_INDEX, IrqAction.TRIGGER, 0, 1, eventfds=[fd], data_bool=None
        )
    assert caught.value.errno == errno.EINVAL
    os.close(observer)
    assert gpu_without_msix.irq_info(MSI_IRQ_INDEX).count == 16  # MSI stays


def test_intx_resampler_above_fd_1024_unmasks(gpu: SyntheticGpu) -> None:
    """The daemon raises RLIMIT_NOFILE and holds two fds per DMA mapping, so with a few
    VMs attached the resample eventfd a VMM sends gets a number past 1023, where
    select(2) cannot go (Python raises ValueError). Draining it must still work: the
    watcher gave up on the fd, and INTx stayed masked for good."""
    fd, observer = new_eventfd()
    trigger, trigger_observer = new_eventfd()
    high = os.dup2(fd, 1500)
    os.close(fd)
    gpu.set_irqs(INTX_IRQ_INDEX, IrqAction.TRIGGER, 0, 1, eventfds=[trigger])
    gpu.set_irqs(INTX_IRQ_INDEX, IrqAction.UNMASK, 0, 1, eventfds=[high])
    doorbell(gpu, 0)
    assert eventfd_count(trigger_observer) == 1  # asserted, now automasked
    os.eventfd_write(observer, 1)  # KVM: the guest EOI'd the line
    gpu.fd_readable(high)  # unmasked; still asserted, so it fires (and automasks) again
    assert eventfd_count(trigger_observer) == 1
    assert eventfd_count(observer) == 0  # the resampler was drained
    gpu.set_irqs(INTX_IRQ_INDEX, IrqAction.TRIGGER, 0, 0)
    os.close(observer)
    os.close(trigger_observer)
