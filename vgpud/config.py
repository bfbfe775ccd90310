"""Configuration: a TOML file (or command-line flags) into frozen, validated objects.

Everything is checked before anything starts: unknown keys, bad sizes, duplicate sockets or
names are reported with the key that is wrong. Example (one file can describe a 4-GPU tray)::

    [daemon]
    log_level = "info"          # debug | info | warning | error
    log_format = "auto"         # auto (console on a tty, JSON otherwise) | console | json
    engine = "python"           # python | libvfio-user (optional, needs libvfio-user.so.0)
    libvfio_user = "/usr/lib/x86_64-linux-gnu/libvfio-user.so.0"   # default: the loader's
    fast_config_reads = true    # python engine: answer plain config reads in C when built

    [[device]]
    name = "gpu0"
    socket_path = "/run/vgpud/gpu0.sock"
    profile = "gh200"           # gh200 | gh200-480g | gh200-sku | gb200 | gb300
    memory_size = "96GiB"       # overrides the profile's device memory size
    memphys = "0x400000000000"  # device memory's host physical base, as firmware reports it
                                # (the default; each GPU of a real tray has its own)
    backing_dir = "/dev/shm/vgpud/gpu0"
    socket_group = "kvm"        # default: none (the daemon's own group)
    socket_mode = "0660"        # default 0600, or 0660 with socket_group
    ready_delay = 0.0           # seconds the GPU reads not-ready after each reset (testing aid)
    no_mmap = false             # true: trap every access (no mmap)
    no_msix = false             # true: no MSI-X (MSI and INTx remain), so that QEMU 11.1.3
                                # can hot-unplug the GPU (it aborts with MSI-X)
    prealloc = false            # true: allocate the memory files in full at start-up, so a
                                # filesystem too small fails the start, not the VM later
    cxl_dvsec = false           # true: add a CXL Device DVSEC, the v7.2 driver's readiness
                                # path (spec nvgrace-gpu.md §2.3, §7.3) instead of BAR0's
    # cxl_mem_active_timeout = 3  # with cxl_dvsec = true only: its Memory_Active_Timeout
                                  # code t, 0..7, meaning 1 s * 4^min(t, 4) (default 3 = 64 s)

    [[device]]                  # a real device instead of the synthetic GPU
    name = "gpu1"
    vfio_device = "0009:01:00.0"   # host PCI address, bound to vfio-pci or nvgrace_gpu_vfio_pci
                                   # (the synthetic-GPU keys above do not apply)
"""

from __future__ import annotations

import dataclasses
import math
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from backends.synthetic import PROFILES, Profile
from backends.vfio.device import normalize_pci_address
from vgpud.log import LEVELS, LogFormat
from vgpud.units import parse_size

DEFAULT_PROFILE = "gh200"
MEMORY_GRANULE = 64 << 10
DEFAULT_DEVICE_NAME = "gpu0"
MAX_SOCKET_PATH = 107  # bytes of a UNIX socket path: sun_path[108] ends in a NUL
# The Memory_Active_Timeout code a CXL Device DVSEC advertises unless configured: the
# profile's default (3 = 64 s, spec nvgrace-gpu.md §7.3), so the two cannot drift apart.
DEFAULT_CXL_MEM_ACTIVE_TIMEOUT = cast(
    int, next(f.default for f in dataclasses.fields(Profile) if f.name == "cxl_mem_active_timeout")
)
# Memory_Active_Timeout is a 3-bit field: 0..7 (the driver clamps 5-7 to 4, i.e. 256 s).
CXL_MEM_ACTIVE_TIMEOUT_MAX = 7


class ConfigError(Exception):
    """The configuration is invalid; the message says where and why."""


_PATH_FIELDS = ("socket_path", "backing_dir")


@dataclass(frozen=True, slots=True)
class DeviceConfig:
    """One served device."""

    name: str
    socket_path: Path | None
    profile: str = DEFAULT_PROFILE
    memory_size: int | None = None
    memphys: int | None = None
    backing_dir: Path | None = None
    socket_mode: int = 0o600
    socket_group: str | None = None
    # Seconds the synthetic GPU's readiness registers stay not-ready after each reset
    # (spec nvgrace-gpu.md §7): lets users exercise a guest's or the variant's wait path.
    ready_delay: float = 0.0
    # Serve every region as trapped (no MMAP, no fds): a debugging aid, and what the
    # captures' "nommap" scenario shows QEMU doing.
    no_mmap: bool = False
    # Leave MSI-X out of the synthetic GPU (capability, irq index, BAR0 table): QEMU 11.1.3
    # aborts when it hot-unplugs a device with MSI-X (captures README fact 14), and a GPU
    # without it unplugs cleanly. The real GPU has MSI-X; this is for hot-plug tests.
    no_msix: bool = False
    # Allocate every page of the memory files at start-up (QEMU's ``prealloc=on`` for the
    # device's memory): a filesystem that cannot hold the device then fails the start with
    # a message, instead of the VM with SIGBUS when its guest first touches the missing page.
    prealloc: bool = False
    # Give the synthetic GPU a CXL Device DVSEC (spec nvgrace-gpu.md §2.3): the v7.2 driver,
    # and the daemon's probe-time wait, then take readiness from its Range 1 Size Low
    # register (MEM_INFO_VALID, MEM_ACTIVE; §7.3) instead of the BAR0 registers (§7.1).
    cxl_dvsec: bool = False
    # The DVSEC's Memory_Active_Timeout code t: the wait allows 1 s * 4^min(t, 4) for
    # MEM_ACTIVE (§7.3). Only meaningful, and only accepted, with ``cxl_dvsec``.
    cxl_mem_active_timeout: int = DEFAULT_CXL_MEM_ACTIVE_TIMEOUT
    # Serve this host PCI device through /dev/vfio (backends.vfio) instead of the synthetic
    # GPU; normalised to DDDD:BB:DD.F.
    vfio_device: str | None = None

    def to_json(self) -> dict[str, Any]:
        """The settings as JSON-able data (a live upgrade carries them, vgpud/upgrade.py)."""
        raw = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for key in _PATH_FIELDS:
            raw[key] = None if raw[key] is None else str(raw[key])
        return raw

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> DeviceConfig:
        """The settings :meth:`to_json` gave; ValueError for anything else."""
        known = {f.name for f in dataclasses.fields(cls)}
        if not isinstance(raw, Mapping) or set(raw) - known or "name" not in raw:
            raise ValueError(f"not a device's settings: {raw!r}")
        values = dict(raw)
        for key in _PATH_FIELDS:
            if values.get(key) is not None:
                values[key] = Path(values[key])
        return cls(**values)

    def resolved_backing_dir(self) -> Path:
        """Where the device's memory files live."""
        if self.backing_dir is not None:
            return self.backing_dir
        return Path("/dev/shm/vgpud") / self.name


@dataclass(frozen=True, slots=True)
class DaemonConfig:
    """The whole daemon."""

    devices: tuple[DeviceConfig, ...]
    log_level: str = "info"
    log_format: LogFormat = "auto"
    # "python" (trio, the default) or "libvfio-user" (the C library through cffi).
    engine: str = "python"
    libvfio_user: str | None = None
    # The Python engine's C loop for config reads (vgpud/server/fast_reads.py), when built.
    fast_config_reads: bool = True


_DEVICE_KEYS = {
    "name",
    "socket_path",
    "profile",
    "memory_size",
    "memphys",
    "backing_dir",
    "socket_mode",
    "socket_group",
    "ready_delay",
    "no_mmap",
    "no_msix",
    "prealloc",
    "cxl_dvsec",
    "cxl_mem_active_timeout",
    "vfio_device",
}
# What only the synthetic GPU has: rejected next to vfio_device rather than silently unused.
_SYNTHETIC_KEYS = (
    "profile",
    "memory_size",
    "memphys",
    "backing_dir",
    "ready_delay",
    "no_msix",
    "prealloc",
    "cxl_dvsec",
    "cxl_mem_active_timeout",
)
_DAEMON_KEYS = {"log_level", "log_format", "engine", "libvfio_user", "fast_config_reads"}
ENGINES = ("python", "libvfio-user")


def default_socket_path(name: str) -> Path:
    """``$XDG_RUNTIME_DIR/vgpud/<name>.sock``, or /run/vgpud for root."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    base = Path(runtime) if runtime else Path("/run" if os.geteuid() == 0 else "/tmp")
    return base / "vgpud" / f"{name}.sock"


def load_file(path: Path) -> DaemonConfig:
    """Read and validate a TOML config file."""
    try:
        with path.open("rb") as handle:
            raw = tomllib.load(handle)
    except OSError as exc:
        raise ConfigError(f"{path}: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    except RecursionError:
        # tomllib parses nested arrays and inline tables by recursion: a file deeper than the
        # stack is as unreadable as bad TOML (and a reload must say so, not die of it).
        raise ConfigError(f"{path}: not valid TOML: nested too deeply") from None
    return parse(raw, source=str(path))


def parse(raw: Mapping[str, Any], source: str = "config") -> DaemonConfig:
    """Validate a parsed TOML document."""
    unknown = set(raw) - {"daemon", "device"}
    if unknown:
        raise ConfigError(f"{source}: unknown top-level key(s): {', '.join(sorted(unknown))}")
    daemon = raw.get("daemon", {})
    if not isinstance(daemon, Mapping):
        raise ConfigError(f"{source}: [daemon] must be a table")
    _reject_unknown(daemon, _DAEMON_KEYS, f"{source}: [daemon]")
    devices_raw = raw.get("device", [])
    if not isinstance(devices_raw, list) or not devices_raw:
        raise ConfigError(f"{source}: at least one [[device]] table is required")
    devices = tuple(
        _parse_device(entry, f"{source}: device #{i + 1}") for i, entry in enumerate(devices_raw)
    )
    _check_unique(devices, source)
    level = _string(daemon, "log_level", "info", f"{source}: [daemon]")
    if level not in LEVELS:
        raise ConfigError(f"{source}: [daemon] log_level must be one of {', '.join(LEVELS)}")
    log_format = _string(daemon, "log_format", "auto", f"{source}: [daemon]")
    if log_format not in ("auto", "console", "json"):
        raise ConfigError(f"{source}: [daemon] log_format must be auto, console or json")
    engine = _string(daemon, "engine", "python", f"{source}: [daemon]")
    if engine not in ENGINES:
        raise ConfigError(f"{source}: [daemon] engine must be one of {', '.join(ENGINES)}")
    library = daemon.get("libvfio_user")
    if library is not None and not isinstance(library, str):
        raise ConfigError(f"{source}: [daemon] libvfio_user must be a path")
    fast = daemon.get("fast_config_reads", True)
    if not isinstance(fast, bool):
        raise ConfigError(f"{source}: [daemon] fast_config_reads must be true or false")
    return DaemonConfig(devices, level, cast(LogFormat, log_format), engine, library, fast)


def single_device(
    *,
    socket_path: Path | None,
    profile: str = DEFAULT_PROFILE,
    memory_size: str | None = None,
    backing_dir: Path | None = None,
    name: str = DEFAULT_DEVICE_NAME,
    socket_group: str | None = None,
    socket_mode: str | None = None,
    ready_delay: float = 0.0,
    no_mmap: bool = False,
    no_msix: bool = False,
    prealloc: bool = False,
    cxl_dvsec: bool = False,
    cxl_mem_active_timeout: int | None = None,
    vfio_device: str | None = None,
) -> DeviceConfig:
    """The device described by command-line flags (validated like a config entry).

    With ``vfio_device`` the synthetic-GPU flags must be left at their defaults.
    """
    raw: dict[str, Any] = {"name": name}
    if vfio_device is not None:
        raw["vfio_device"] = vfio_device
    if profile != DEFAULT_PROFILE or vfio_device is None:
        raw["profile"] = profile
    if ready_delay or vfio_device is None:
        raw["ready_delay"] = ready_delay
    if socket_path is not None:
        raw["socket_path"] = str(socket_path)
    if memory_size is not None:
        raw["memory_size"] = memory_size
    if backing_dir is not None:
        raw["backing_dir"] = str(backing_dir)
    if socket_group is not None:
        raw["socket_group"] = socket_group
    if socket_mode is not None:
        raw["socket_mode"] = socket_mode
    raw["no_mmap"] = no_mmap
    if no_msix or vfio_device is None:
        raw["no_msix"] = no_msix
    if prealloc or vfio_device is None:
        raw["prealloc"] = prealloc
    if cxl_dvsec or vfio_device is None:
        raw["cxl_dvsec"] = cxl_dvsec
    if cxl_mem_active_timeout is not None:
        raw["cxl_mem_active_timeout"] = cxl_mem_active_timeout
    return _parse_device(raw, "command line")


def _parse_device(raw: Any, where: str) -> DeviceConfig:
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where}: must be a table")
    _reject_unknown(raw, _DEVICE_KEYS, where)
    name = _string(raw, "name", DEFAULT_DEVICE_NAME, where)
    if not name or "/" in name or "\0" in name or name.startswith("."):
        raise ConfigError(f"{where}: name {name!r} must be a non-empty file-name-safe string")
    socket_path = _path(raw, "socket_path", where)
    # sun_path holds 108 bytes with the terminating NUL (unix(7)). A long name makes a long
    # default path too, which used to fail at bind, after the memory files were made.
    effective = socket_path or default_socket_path(name)
    if len(os.fsencode(effective)) > MAX_SOCKET_PATH:
        what = "socket_path" if socket_path is not None else f"the default socket path {effective}"
        raise ConfigError(
            f"{where}: {what} is {len(os.fsencode(effective))} bytes, more than a UNIX "
            f"socket address holds ({MAX_SOCKET_PATH})"
            + ("" if socket_path is not None else "; give a shorter name or a socket_path")
        )
    profile = _string(raw, "profile", DEFAULT_PROFILE, where)
    if profile not in PROFILES:
        raise ConfigError(
            f"{where}: unknown profile {profile!r} (known: {', '.join(sorted(PROFILES))})"
        )
    memory_size = _size(raw, "memory_size", where)
    if memory_size is not None and memory_size == 0:
        raise ConfigError(f"{where}: memory_size must not be 0")
    if memory_size is not None and memory_size % MEMORY_GRANULE:
        # The mmappable (sparse) areas QEMU maps must be host-page aligned (spec
        # vfio-user.md R14, §5.5; 64 KiB pages on some arm64 hosts), and resmem ends where
        # device memory ends.
        raise ConfigError(f"{where}: memory_size must be a multiple of 64 KiB")
    memphys = _size(raw, "memphys", where)
    backing_dir = _path(raw, "backing_dir", where)
    group = raw.get("socket_group")
    if group is not None and (not isinstance(group, str) or not group):
        raise ConfigError(f"{where}: socket_group must be a group name or number")
    # A group is named so that its members (the VMM) can connect: an owner-only socket of
    # that group would lock them out, so without a mode of its own the socket is 0660.
    mode = _socket_mode(raw.get("socket_mode", "0600" if group is None else "0660"), where)
    delay = raw.get("ready_delay", 0.0)
    if (
        isinstance(delay, bool)
        or not isinstance(delay, int | float)
        or not math.isfinite(delay)
        or delay < 0
    ):
        raise ConfigError(f"{where}: ready_delay must be a non-negative number of seconds")
    no_mmap = raw.get("no_mmap", False)
    if not isinstance(no_mmap, bool):
        raise ConfigError(f"{where}: no_mmap must be true or false")
    no_msix = raw.get("no_msix", False)
    if not isinstance(no_msix, bool):
        raise ConfigError(f"{where}: no_msix must be true or false")
    prealloc = raw.get("prealloc", False)
    if not isinstance(prealloc, bool):
        raise ConfigError(f"{where}: prealloc must be true or false")
    cxl_dvsec = raw.get("cxl_dvsec", False)
    if not isinstance(cxl_dvsec, bool):
        raise ConfigError(f"{where}: cxl_dvsec must be true or false")
    timeout = raw.get("cxl_mem_active_timeout", DEFAULT_CXL_MEM_ACTIVE_TIMEOUT)
    if (
        isinstance(timeout, bool)
        or not isinstance(timeout, int)
        or not 0 <= timeout <= CXL_MEM_ACTIVE_TIMEOUT_MAX
    ):
        raise ConfigError(
            f"{where}: cxl_mem_active_timeout must be an integer code 0..7 "
            "(Memory_Active_Timeout: 1 s * 4^min(code, 4))"
        )
    if "cxl_mem_active_timeout" in raw and not cxl_dvsec:
        raise ConfigError(f"{where}: cxl_mem_active_timeout needs cxl_dvsec = true")
    vfio_device = _vfio_device(raw, where)
    return DeviceConfig(
        name=name,
        socket_path=Path(socket_path) if socket_path is not None else None,
        profile=profile,
        memory_size=memory_size,
        memphys=memphys,
        backing_dir=Path(backing_dir) if backing_dir is not None else None,
        socket_mode=mode,
        socket_group=group,
        ready_delay=float(delay),
        no_mmap=no_mmap,
        no_msix=no_msix,
        prealloc=prealloc,
        cxl_dvsec=cxl_dvsec,
        cxl_mem_active_timeout=timeout,
        vfio_device=vfio_device,
    )


def _vfio_device(raw: Mapping[str, Any], where: str) -> str | None:
    value = raw.get("vfio_device")
    if value is None:
        return None
    if not isinstance(value, str):
        raise ConfigError(f'{where}: vfio_device must be a PCI address such as "0009:01:00.0"')
    try:
        address = normalize_pci_address(value)
    except ValueError as exc:
        raise ConfigError(f"{where}: vfio_device: {exc}") from None
    synthetic = [key for key in _SYNTHETIC_KEYS if key in raw]
    if synthetic:
        raise ConfigError(
            f"{where}: {', '.join(synthetic)} describe(s) the synthetic GPU and cannot be "
            "combined with vfio_device"
        )
    return address


def _check_unique(devices: tuple[DeviceConfig, ...], source: str) -> None:
    seen_names: set[str] = set()
    seen_sockets: set[Path] = set()
    seen_dirs: set[Path] = set()
    seen_vfio: set[str] = set()
    for device in devices:
        if device.name in seen_names:
            raise ConfigError(f"{source}: two devices are named {device.name!r}")
        seen_names.add(device.name)
        # Spelled differently ("x/../a.sock") is still one socket, and so is another device's
        # default path: it failed only once the memory files were made, as "another server
        # is already listening".
        socket_path = Path(os.path.abspath(device.socket_path or default_socket_path(device.name)))
        if socket_path in seen_sockets:
            raise ConfigError(
                f"{source}: two devices use socket {device.socket_path or socket_path}"
            )
        seen_sockets.add(socket_path)
        if device.vfio_device is not None:
            if device.vfio_device in seen_vfio:
                raise ConfigError(f"{source}: two devices are vfio_device {device.vfio_device}")
            seen_vfio.add(device.vfio_device)
            continue
        backing = Path(os.path.abspath(device.resolved_backing_dir()))
        if backing in seen_dirs:
            raise ConfigError(f"{source}: two devices share backing_dir {backing}")
        seen_dirs.add(backing)


def _path(raw: Mapping[str, Any], key: str, where: str) -> str | None:
    value = raw.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not value or "\0" in value:
        # An empty path would mean the current directory (an audit: memory files in cwd).
        raise ConfigError(f"{where}: {key} must be a non-empty path")
    return value


def _socket_mode(value: Any, where: str) -> int:
    # An octal string, or a TOML integer (0o660); not a bool or a float, which int() would
    # quietly turn into a mode (true became 0o001).
    if isinstance(value, str):
        try:
            mode = int(value, 8)
        except ValueError:
            mode = -1
    elif isinstance(value, int) and not isinstance(value, bool):
        mode = value
    else:
        mode = -1
    if mode < 0:
        raise ConfigError(f'{where}: socket_mode must be an octal string like "0660"')
    if mode & ~0o777:
        raise ConfigError(f"{where}: socket_mode {value!r} has bits outside 0777")
    return mode


def _reject_unknown(raw: Mapping[str, Any], allowed: set[str], where: str) -> None:
    unknown = set(raw) - allowed
    if unknown:
        raise ConfigError(
            f"{where}: unknown key(s) {', '.join(sorted(unknown))} "
            f"(allowed: {', '.join(sorted(allowed))})"
        )


def _string(raw: Mapping[str, Any], key: str, default: str, where: str) -> str:
    value = raw.get(key, default)
    if not isinstance(value, str):
        raise ConfigError(f"{where}: {key} must be a string")
    return value


def _size(raw: Mapping[str, Any], key: str, where: str) -> int | None:
    value = raw.get(key)
    if value is None:
        return None
    if not isinstance(value, str | int) or isinstance(value, bool):
        raise ConfigError(f'{where}: {key} must be a size such as "96GiB"')
    try:
        return parse_size(value)
    except ValueError as exc:
        raise ConfigError(f"{where}: {key}: {exc}") from None
