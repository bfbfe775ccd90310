"""From a DeviceConfig to a served device: the synthetic GPU with the variant over it.

This is the only place that knows how configuration maps onto backends, so the daemon, the
``layout`` and ``qemu-args`` commands and the tests all agree on what a device looks like.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from backends.device import VfioDevice
from backends.synthetic import PROFILES, Profile, SyntheticGpu, get_profile
from vgpud.config import DeviceConfig
from vgpud.variant import (
    NvgraceLayout,
    compute_layout,
    device_ready,
    format_layout,
    layout_as_dict,
    make_device,
)

BAR0_SIZE = 16 << 20


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
    return profile.with_overrides(**overrides) if overrides else profile


def layout_for(config: DeviceConfig) -> NvgraceLayout:
    """The kernel-exact layout (spec nvgrace-gpu.md §3.2) the device will present."""
    profile = profile_for(config)
    return compute_layout(profile.memphys, profile.memory_size, profile.has_mig_hw_bug)


def guest_bar_sizes(config: DeviceConfig) -> list[int]:
    """Every BAR the guest will have to place (for the MMIO window of ``qemu-args``)."""
    profile = profile_for(config)
    layout = layout_for(config)
    bar2 = layout.resmem.bar_size if layout.resmem is not None else profile.bar1_size
    return [BAR0_SIZE, bar2, layout.usemem.bar_size]


@dataclass(frozen=True, slots=True)
class LayoutReport:
    """What ``vgpud layout`` prints."""

    text: str
    as_dict: dict[str, Any]


def layout_report(config: DeviceConfig) -> LayoutReport:
    """The layout of ``config`` with the backing-file names it maps to."""
    profile = profile_for(config)
    layout = layout_for(config)
    title = (
        f"profile {profile.name}: device {profile.device_id:#06x} ({profile.architecture.value})"
    )
    files = {"usemem": "usemem", "resmem": "resmem" if layout.resmem is not None else None}
    return LayoutReport(
        text=format_layout(layout, title=title),
        as_dict=layout_as_dict(
            layout,
            profile=profile.name,
            device_id=profile.device_id,
            bar_sizes={
                "bar0": BAR0_SIZE,
                "bar2": guest_bar_sizes(config)[1],
                "bar4": layout.usemem.bar_size,
            },
            backing_files=files,
        ),
    )


@dataclass
class BuiltDevice:
    """A device ready to be served, and what owns its resources."""

    name: str
    backend: SyntheticGpu
    device: VfioDevice
    config: DeviceConfig

    def ready_now(self) -> bool:
        """The readiness registers read ready (spec nvgrace-gpu.md §7.1)."""
        return device_ready(self.backend)

    def summary(self) -> dict[str, Any]:
        """Facts for the "serving" log line."""
        profile = self.backend.profile
        layout = getattr(self.device, "layout", None)
        facts: dict[str, Any] = {
            "profile": profile.name,
            "device_id": f"{profile.device_id:#06x}",
            "memory": profile.memory_size,
            "backing_dir": str(self.backend.backing_dir),
        }
        if layout is not None:
            facts["usemem_bar_size"] = layout.usemem.bar_size
            facts["resmem_bar_size"] = layout.resmem.bar_size if layout.resmem else 0
        return facts

    def release(self) -> None:
        """Unmap and close everything; the memory files keep their contents."""
        # The variant's shutdown releases its windows and then shuts the backend down.
        shutdown = getattr(self.device, "shutdown", self.backend.shutdown)
        shutdown()


def build_device(config: DeviceConfig) -> BuiltDevice:
    """Create the backend and the variant over it."""
    backend = SyntheticGpu(
        profile_for(config), config.resolved_backing_dir(), ready_delay=config.ready_delay
    )
    return BuiltDevice(config.name, backend, make_device(backend), config)
