"""How many DMA mappings one client may hold: an equal share of the process's limits.

Every live fd-backed DMA mapping costs the daemon two file descriptors (the client's, kept for
a live upgrade, and the duplicate Python's ``mmap`` keeps: :mod:`vgpud.server.dma`) and a
memory map (a VMA; libvfio-user's own mappings
too). Both are limits of the whole process, shared by every device it serves:
``RLIMIT_NOFILE`` (raised to the hard limit at start-up) and ``vm.max_map_count``. A client
allowed the usual 65535 mappings (the kernel's type1 default) can use either up; then
another device's accept, SET_IRQS or fds, or the interpreter's own allocations, fail. An
adversarial run showed both: 19 984 mappings of one client made a second device's client
lose its eventfds, and 65 215 left the libvfio-user engine unable to serve anyone.

So each device gets an equal share of both limits, after a reserve for the daemon itself
and for each device's own descriptors (its interrupt eventfds counted twice: the
libvfio-user engine holds a proxy next to each), and advertises it as ``max_dma_maps``.
A QEMU guest without a vIOMMU needs 40-73 mappings over its whole life (the captures).
"""

from __future__ import annotations

import resource
from collections.abc import Sequence
from pathlib import Path

from backends.device import VfioDevice

MAX_DMA_MAPS = 65535  # never more than this, however high the limits
MIN_DMA_MAPS = 128  # below this a guest may not boot: refuse to start instead
RESERVED_FDS = 256  # the daemon's own: interpreter, logging, trio, listeners' spares
FDS_PER_DEVICE = 64  # a device's own: listener, client, refusals, memory files, watchers
FDS_PER_DMA_MAP = 2  # the client's fd and the mmap's duplicate (vgpud.server.dma)
RESERVED_MAPS = 8192  # the interpreter, libraries, heap arenas, thread stacks
MAX_MAP_COUNT = Path("/proc/sys/vm/max_map_count")
DEFAULT_MAX_MAP_COUNT = 65530  # the kernel's default, when the sysctl cannot be read


class BudgetError(Exception):
    """The process limits leave too little for the configured devices (message for the user)."""


def dma_map_limit(devices: Sequence[VfioDevice]) -> int:
    """The ``max_dma_maps`` each device's client gets (see the module docstring)."""
    count = max(len(devices), 1)
    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if nofile == resource.RLIM_INFINITY:
        nofile = 1 << 30
    max_map_count = _max_map_count()
    irq_fds = max((_irq_fds(device) for device in devices), default=0)
    per_device_fds = FDS_PER_DEVICE + 2 * irq_fds
    fd_share = ((nofile - RESERVED_FDS) // count - per_device_fds) // FDS_PER_DMA_MAP
    map_share = (max_map_count - RESERVED_MAPS) // count
    limit = min(MAX_DMA_MAPS, fd_share, map_share)
    if limit < MIN_DMA_MAPS:
        need_fds = RESERVED_FDS + count * (per_device_fds + FDS_PER_DMA_MAP * MIN_DMA_MAPS)
        need_maps = RESERVED_MAPS + count * MIN_DMA_MAPS
        raise BudgetError(
            f"{count} device(s) need at least {MIN_DMA_MAPS} DMA mappings each: that takes "
            f"{need_fds} file descriptors (RLIMIT_NOFILE is {nofile}; raise it with "
            f"LimitNOFILE= or ulimit -n) and vm.max_map_count {need_maps} "
            f"(it is {max_map_count})"
        )
    return limit


def _irq_fds(device: VfioDevice) -> int:
    # One eventfd per vector a client may wire, for every interrupt index, plus the INTx
    # resample (unmask) eventfd.
    info = device.device_info()
    return sum(device.irq_info(index).count for index in range(info.num_irqs)) + 1


def _max_map_count() -> int:
    try:
        return int(MAX_MAP_COUNT.read_text())
    except (OSError, ValueError):
        return DEFAULT_MAX_MAP_COUNT
