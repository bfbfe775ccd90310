"""What a reload (SIGHUP, ``systemctl reload``) asks for: the config file read again, set
against what the daemon serves.

Devices are matched by name. One only in the file is *added*; one only running is
*removed*; one in both whose settings differ is *changed* (served again with the new
settings: its memory files stay, as across a restart). The ``[daemon]`` table's settings
(engine, library, log level and format, fast config reads) are the process's own: a reload
cannot change them, and says which differ.

A removed or changed device may have a VM attached. Removing it stops it taking clients
at once, and its VM keeps the GPU until it detaches; a change waits for that (the daemon
applies it at the next reload after the VM has gone), since its VM would otherwise lose
the GPU under it and QEMU does not reconnect (docs/operations.md, "The VM's life cycle").
That is the daemon's side (vgpud/fleet.py); this module only compares.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from vgpud.config import DaemonConfig, DeviceConfig


@dataclass(frozen=True, slots=True)
class ReloadPlan:
    """The difference between the running configuration and the one wanted."""

    added: tuple[DeviceConfig, ...] = ()
    removed: tuple[DeviceConfig, ...] = ()
    changed: tuple[tuple[DeviceConfig, DeviceConfig], ...] = ()  # (running, wanted)
    daemon_keys: tuple[str, ...] = ()  # [daemon] settings that differ: need a restart

    @property
    def empty(self) -> bool:
        """Nothing a reload can apply (``daemon_keys`` may still differ)."""
        return not (self.added or self.removed or self.changed)


def plan(running: DaemonConfig, wanted: DaemonConfig) -> ReloadPlan:
    """Compare ``running`` (what is served now) with ``wanted`` (the file, read again);
    both in their files' device order."""
    running_by_name = {device.name: device for device in running.devices}
    wanted_names = {device.name for device in wanted.devices}
    added = tuple(d for d in wanted.devices if d.name not in running_by_name)
    removed = tuple(d for d in running.devices if d.name not in wanted_names)
    changed = tuple(
        (running_by_name[d.name], d)
        for d in wanted.devices
        if d.name in running_by_name and running_by_name[d.name] != d
    )
    daemon_keys = tuple(
        field.name
        for field in dataclasses.fields(DaemonConfig)
        if field.name != "devices" and getattr(running, field.name) != getattr(wanted, field.name)
    )
    return ReloadPlan(added, removed, changed, daemon_keys)


def settings_changed(running: DeviceConfig, wanted: DeviceConfig) -> list[str]:
    """The keys of a changed device whose values differ (for the log)."""
    return [
        field.name
        for field in dataclasses.fields(DeviceConfig)
        if getattr(running, field.name) != getattr(wanted, field.name)
    ]
