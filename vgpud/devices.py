"""From a DeviceConfig to a served device: a backend (the synthetic GPU, or a real device
through /dev/vfio) with the variant over it.

This is the only place that knows how configuration maps onto backends, so the daemon, the
``layout`` and ``qemu-args`` commands and the tests all agree on what a device looks like.
"""

from __future__ import annotations

import errno
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import trio

from backends.backend import Backend
from backends.device import HandsOver, VfioDevice
from backends.synthetic import PROFILES, Profile, SyntheticGpu, get_profile
from backends.synthetic.config_space import (
    PCI_BASE_ADDRESS_MEM_PREFETCH,
    PCI_BASE_ADDRESS_SPACE_IO,
)
from backends.vfio import VfioPciDevice
from backends.vfio.device import (
    IORESOURCE_IO,
    IORESOURCE_PREFETCH,
    bound_driver,
    sysfs_bars,
    sysfs_ids,
)
from protocol import ProtocolError
from vgpud import probe
from vgpud.client import MisbehavingServerError, VfioUserError
from vgpud.config import ConfigError, DeviceConfig, default_socket_path
from vgpud.qemu_args import GuestBar
from vgpud.variant import (
    NvgraceLayout,
    compute_layout,
    device_ready,
    format_layout,
    layout_as_dict,
    make_device,
)

BAR0_SIZE = 16 << 20
# The kernel's nvgrace-gpu variant driver as sysfs names it: its pci_driver is named after
# the module (KBUILD_MODNAME), so with underscores; driver_override takes the same spelling
# (spec nvgrace-gpu.md §1).
NVGRACE_DRIVER = "nvgrace_gpu_vfio_pci"


class ServedBarsError(Exception):
    """A device's BARs are known only to the vgpud serving it, and it could not be asked."""


def profile_names() -> list[str]:
    """Names accepted by ``--profile``."""
    return sorted(PROFILES)


def profile_for(config: DeviceConfig) -> Profile:
    """The profile with the config's overrides applied."""
    profile = get_profile(config.profile)
    overrides: dict[str, Any] = {}
    if config.memory_size is not None:
        overrides["memory_size"] = config.memory_size
    if config.memphys is not None:
        overrides["memphys"] = config.memphys
    if config.cxl_dvsec:
        # The CXL Device DVSEC and the Memory_Active_Timeout it advertises (spec
        # nvgrace-gpu.md §2.3, §7.3). Without the key the profile's own setting stands.
        overrides["cxl_dvsec"] = True
        overrides["cxl_mem_active_timeout"] = config.cxl_mem_active_timeout
    if config.no_msix:
        overrides["msix_vectors"] = 0
    return profile.with_overrides(**overrides) if overrides else profile


def layout_for(config: DeviceConfig) -> NvgraceLayout:
    """The kernel-exact layout (spec nvgrace-gpu.md §3.2) the device will present."""
    profile = profile_for(config)
    return compute_layout(profile.memphys, profile.memory_size, profile.has_mig_hw_bug)


def check_layouts(devices: Sequence[DeviceConfig]) -> None:
    """Refuse, naming the device, a synthetic GPU whose memory the kernel would not probe.

    Done with the rest of the configuration checks, before any device is built: a bad
    memory size in the second device of a tray must not leave the first one's backing
    files behind, and is the user's input (a usage error), not a start-up failure.
    """
    for config in devices:
        if config.vfio_device is not None:
            continue
        try:
            layout_for(config)
        except ValueError as exc:  # LayoutError, or a profile override out of range
            raise ConfigError(f"device {config.name}: {exc}") from exc


def guest_bars(config: DeviceConfig) -> list[GuestBar]:
    """Every memory BAR the guest will have to place (for the MMIO windows of ``qemu-args``).

    For a VFIO device: its BARs as the host's sysfs lists them (the device is not opened);
    I/O BARs take no MMIO. Except under ``nvgrace_gpu_vfio_pci``: its BAR4 (and Hopper's
    BAR2) are the driver's fake BARs of device memory, in no sysfs file, so they are asked of
    the vgpud serving the device (:func:`served_guest_bars`). The synthetic GPU: BAR0
    non-prefetchable, BAR2 and BAR4 64-bit prefetchable (backends/synthetic/device.py, spec
    nvgrace-gpu.md §3.4).
    """
    if config.vfio_device is not None:
        if bound_driver(config.vfio_device) == NVGRACE_DRIVER:
            socket_path = config.socket_path or default_socket_path(config.name)
            return served_guest_bars(config.vfio_device, str(socket_path))
        return [
            GuestBar(size, bool(flags & IORESOURCE_PREFETCH))
            for size, flags in sysfs_bars(config.vfio_device)
            if size and not flags & IORESOURCE_IO
        ]
    profile = profile_for(config)
    layout = layout_for(config)
    bar2 = layout.resmem.bar_size if layout.resmem is not None else profile.bar1_size
    return [
        GuestBar(BAR0_SIZE, prefetchable=False),
        GuestBar(bar2),
        GuestBar(layout.usemem.bar_size),
    ]


def served_guest_bars(address: str, socket_path: str) -> list[GuestBar]:
    """The memory BARs of PCI device ``address`` as the vgpud on ``socket_path`` serves them:
    what its VMM will be given, fake BARs included."""
    why = (
        f"PCI device {address} is bound to {NVGRACE_DRIVER}, whose BAR4 (and on Hopper BAR2) "
        f"is a fake BAR of device memory that sysfs does not list; qemu-args asks the vgpud "
        f"serving it on {socket_path}"
    )
    start = (
        f"start `vgpud serve --vfio-device {address} --socket-path {socket_path}` first, "
        "and run qemu-args before the VM attaches"
    )
    try:
        served = trio.run(probe.served_device, socket_path)
    except trio.TooSlowError:
        raise ServedBarsError(
            f"{why}, which did not answer within {probe.PROBE_TIMEOUT:g} s"
        ) from None
    except VfioUserError as exc:
        if exc.errno == errno.EBUSY:
            # One client per device (vgpud/server/refusal.py): its VM is attached.
            raise ServedBarsError(f"{why}, which has a client already; {start}") from None
        raise ServedBarsError(f"{why}, which refused: {exc}") from None
    except (OSError, EOFError, MisbehavingServerError, ProtocolError) as exc:
        raise ServedBarsError(f"{why}, and could not reach it ({exc}); {start}") from None
    ids, expected = (served.vendor_id, served.device_id), sysfs_ids(address)
    if ids != expected:
        # Another device's vgpud on that path would size the window for the wrong BARs.
        raise ServedBarsError(
            f"{why}, which serves a {ids[0]:04x}:{ids[1]:04x}, not this "
            f"{expected[0]:04x}:{expected[1]:04x}: is the socket path the one of the daemon "
            "serving it?"
        )
    return [
        GuestBar(bar.size, bool(bar.register & PCI_BASE_ADDRESS_MEM_PREFETCH))
        for bar in served.bars
        # The upper half of a 64-bit BAR is a region of size 0; I/O BARs take no MMIO.
        if bar.size and not bar.register & PCI_BASE_ADDRESS_SPACE_IO
    ]


@dataclass(frozen=True, slots=True)
class LayoutReport:
    """What ``vgpud layout`` prints."""

    text: str
    as_dict: dict[str, Any]


def layout_report(config: DeviceConfig) -> LayoutReport:
    """The layout of ``config`` and where each region lives in the backing files."""
    if config.vfio_device is not None:
        raise ValueError("layout describes the synthetic GPU; a vfio_device has its own BARs")
    profile = profile_for(config)
    layout = layout_for(config)
    backing_dir = config.resolved_backing_dir()
    title = (
        f"profile {profile.name}: device {profile.device_id:#06x} ({profile.architecture.value})"
    )
    # Each region has a file of its own, mapped from offset 0: the mmap offset QEMU gets in
    # the region-info reply is 0 and the file's size is the region's memlength.
    files: dict[str, dict[str, Any]] = {
        "usemem": {
            "path": str(backing_dir / "usemem"),
            "offset": 0,
            "size": layout.usemem.memlength,
        },
    }
    if layout.resmem is not None:
        files["resmem"] = {
            "path": str(backing_dir / "resmem"),
            "offset": 0,
            "size": layout.resmem.memlength,
        }
    else:
        files["bar1"] = {"path": str(backing_dir / "bar1"), "offset": 0, "size": profile.bar1_size}
    lines = [format_layout(layout, title=title).rstrip("\n"), "backing files (mmap offset 0):"]
    lines += [f"  {name:<7} {f['path']}  {f['size']:#x} bytes" for name, f in files.items()]
    bar_sizes = [bar.size for bar in guest_bars(config)]
    return LayoutReport(
        text="\n".join(lines) + "\n",
        as_dict=layout_as_dict(
            layout,
            profile=profile.name,
            device_id=profile.device_id,
            bar_sizes={"bar0": bar_sizes[0], "bar2": bar_sizes[1], "bar4": bar_sizes[2]},
            backing_files=files,
        ),
    )


@dataclass
class BuiltDevice:
    """A device ready to be served, and what owns its resources."""

    name: str
    backend: Backend
    device: VfioDevice
    config: DeviceConfig

    @property
    def probes_readiness(self) -> bool:
        """Whether the daemon waits for the GPU at start-up (spec nvgrace-gpu.md §7.2).

        A VFIO device was probed by the host kernel's driver already (nvgrace-gpu-vfio-pci
        waits itself), and any other device has no readiness registers to poll.
        """
        return isinstance(self.backend, SyntheticGpu)

    def ready_now(self) -> bool:
        """The readiness registers read ready: BAR0 (spec nvgrace-gpu.md §7.1), or the CXL
        DVSEC when the device has one (§7.3)."""
        return device_ready(self.backend)

    def summary(self) -> dict[str, Any]:
        """Facts for the "serving" log line."""
        if isinstance(self.backend, VfioPciDevice):
            return {
                "vfio_device": self.backend.address,
                "driver": self.backend.driver,
                "iommu_group": self.backend.group,
            }
        assert isinstance(self.backend, SyntheticGpu)
        profile = self.backend.profile
        layout = getattr(self.device, "layout", None)
        facts: dict[str, Any] = {
            "profile": profile.name,
            "device_id": f"{profile.device_id:#06x}",
            "memory": profile.memory_size,
            "backing_dir": str(self.backend.backing_dir),
        }
        if profile.cxl_dvsec:
            facts["cxl_mem_active_timeout"] = profile.cxl_mem_active_timeout
        if layout is not None:
            facts["usemem_bar_size"] = layout.usemem.bar_size
            facts["resmem_bar_size"] = layout.resmem.bar_size if layout.resmem else 0
        return facts

    def release(self) -> None:
        """Unmap and close everything; the memory files keep their contents."""
        # The variant's shutdown releases its windows and then shuts the backend down.
        shutdown = getattr(self.device, "shutdown", self.backend.shutdown)
        shutdown()


def take_over_device(config: DeviceConfig, state: Mapping[str, Any]) -> BuiltDevice:
    """The device of ``config`` carrying on from ``state`` (``handover()``'s, in the process
    before a live upgrade: vgpud/upgrade.py). A passthrough device is made from it (its VFIO
    fds are in it); a synthetic one is made afresh, then takes it over. Raises for a state
    that does not fit, its fds closed or untaken."""
    if config.vfio_device is not None:
        backend = VfioPciDevice(config.vfio_device, handed=state)
        return BuiltDevice(config.name, backend, make_device(backend), config)
    built = build_device(config, directory_lock=_directory_lock(state))
    try:
        if not isinstance(built.device, HandsOver):
            raise TypeError(f"device {config.name} cannot take a handover over")
        built.device.take_over(state)
    except BaseException:
        built.release()
        raise
    return built


def _directory_lock(state: Mapping[str, Any]) -> int | None:
    """The locked backing directory's fd in a synthetic device's state: the variant's
    handover carries the backend's under "backend" (none from an older process)."""
    backend = state.get("backend")
    lock = backend.get("directory_lock") if isinstance(backend, Mapping) else None
    if lock is not None and (type(lock) is not int or lock < 0):
        raise ValueError(f"directory_lock {lock!r} is not an fd")
    return lock


def build_device(config: DeviceConfig, *, directory_lock: int | None = None) -> BuiltDevice:
    """Create the backend and the variant over it; ``directory_lock`` is the locked
    backing directory handed over by a live upgrade (:class:`SyntheticGpu`)."""
    backend: Backend
    if config.vfio_device is not None:
        backend = VfioPciDevice(config.vfio_device)
    else:
        backend = SyntheticGpu(
            profile_for(config),
            config.resolved_backing_dir(),
            ready_delay=config.ready_delay,
            directory_lock=directory_lock,
        )
    return BuiltDevice(config.name, backend, make_device(backend), config)
