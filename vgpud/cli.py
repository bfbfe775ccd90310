"""The ``vgpud`` command line.

``serve`` follows the vfio-user/vhost-user "backend program conventions": ``--socket-path``
or ``--fd``, no daemonizing, SIGTERM stops cleanly. Bad configuration is reported in one line
and exit status 2 before anything starts.
"""

from __future__ import annotations

import argparse
import errno
import functools
import json
import os
import signal
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import structlog
import trio

from protocol import ProtocolError
from vgpud import __version__, daemon, devices, libvirt_domain, log, probe, qemu_args, upgrade
from vgpud.client import MisbehavingServerError, VfioUserError
from vgpud.config import (
    DEFAULT_DEVICE_NAME,
    DEFAULT_PROFILE,
    ENGINES,
    ConfigError,
    DaemonConfig,
    DeviceConfig,
    default_socket_path,
    load_file,
    single_device,
)
from vgpud.entry import INTERRUPTED
from vgpud.signals import DEFERRED_SIGNALS, EarlySignals

EXIT_USAGE = 2
EXIT_FAILURE = 1

# Flags that describe one device. A --config file describes the devices itself, so next to it
# these would be silently outvoted: they are refused instead. Each flag's dest is also its
# [[device]] key. Only typed flags count, which is why they default to None (or False).
SERVE_DEVICE_FLAGS = (
    "--profile",
    "--memory-size",
    "--name",
    "--backing-dir",
    "--socket-group",
    "--socket-mode",
    "--ready-delay",
    "--no-mmap",
    "--no-msix",
    "--prealloc",
    "--vfio-device",
    "--cxl-dvsec",
    "--cxl-mem-active-timeout",
)
QEMU_ARGS_DEVICE_FLAGS = ("--socket-path", "--profile", "--memory-size", "--name")


def _device_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--profile", help=f"device profile (default {DEFAULT_PROFILE})")
    parser.add_argument("--memory-size", help="device memory size, e.g. 96GiB")
    parser.add_argument("--name", help=f"device name (default {DEFAULT_DEVICE_NAME})")


def _refuse_device_flags(args: argparse.Namespace, flags: Sequence[str]) -> None:
    """With --config, a typed device flag is a usage error rather than silently ignored."""
    # Identity, not ==: a typed --ready-delay 0 counts (0.0 == False).
    given = [
        flag
        for flag in flags
        if (value := getattr(args, _dest(flag))) is not None and value is not False
    ]
    if given:
        keys = ", ".join(_dest(flag) for flag in given)
        raise ConfigError(
            f"{', '.join(given)} cannot be combined with --config: the file describes the "
            f"devices, put {keys} in its [[device]] table(s)"
        )


def _fill_device_defaults(args: argparse.Namespace) -> None:
    # The device flags default to None so that --config can tell they were not typed.
    if args.profile is None:
        args.profile = DEFAULT_PROFILE
    if args.name is None:
        args.name = DEFAULT_DEVICE_NAME


def _dest(flag: str) -> str:
    return flag.removeprefix("--").replace("-", "_")


def build_parser() -> argparse.ArgumentParser:
    """All subcommands."""
    parser = argparse.ArgumentParser(
        prog="vgpud",
        description="Serve an NVIDIA Grace GPU (nvgrace-gpu variant semantics) over vfio-user.",
    )
    parser.add_argument("--version", action="version", version=f"vgpud {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="serve devices to vfio-user clients (QEMU)")
    where = serve.add_mutually_exclusive_group()
    where.add_argument("--socket-path", type=Path, help="listen on this UNIX socket")
    where.add_argument(
        "--fd", type=int, help="serve on this inherited socket (listening or connected)"
    )
    where.add_argument("--config", type=Path, help="TOML file describing one or more devices")
    _device_flags(serve)
    serve.add_argument("--backing-dir", type=Path, help="directory for the memory files")
    serve.add_argument("--socket-group", help="group allowed to connect (mode 0660)")
    serve.add_argument(
        "--socket-mode", help="socket permissions, octal (default 0600, 0660 with --socket-group)"
    )
    serve.add_argument(
        "--ready-delay",
        type=float,
        help="seconds the GPU reports not-ready after each reset (testing aid, default 0)",
    )
    serve.add_argument("--no-mmap", action="store_true", help="trap every access (no mmap)")
    serve.add_argument(
        "--no-msix",
        action="store_true",
        help="leave MSI-X out (MSI and INTx remain): QEMU 11.1.3 can then hot-unplug the GPU, "
        "which it aborts on with MSI-X",
    )
    serve.add_argument(
        "--prealloc",
        action="store_true",
        help="allocate the memory files in full at start-up: a filesystem too small for the "
        "device then fails the start instead of the VM (SIGBUS) later",
    )
    serve.add_argument(
        "--vfio-device",
        metavar="PCI_ADDRESS",
        help="serve this host PCI device through /dev/vfio (bound to vfio-pci or "
        "nvgrace_gpu_vfio_pci) instead of the synthetic GPU",
    )
    serve.add_argument(
        "--cxl-dvsec",
        action="store_true",
        help="add a CXL Device DVSEC: readiness then comes from its MEM_INFO_VALID/MEM_ACTIVE "
        "bits, the v7.2 driver's CXL path, instead of the BAR0 registers",
    )
    serve.add_argument(
        "--cxl-mem-active-timeout",
        type=int,
        metavar="CODE",
        help="Memory_Active_Timeout the CXL DVSEC advertises (needs --cxl-dvsec): code t "
        "means 1 s * 4^min(t,4), 0..7 (default 3 = 64 s)",
    )
    serve.add_argument(
        "--engine",
        choices=ENGINES,
        default=None,
        help="python (default) or libvfio-user (the C library, see docs/libvfio-user-engine.md)",
    )
    serve.add_argument(
        "--no-fast-config-reads",
        action="store_true",
        help="answer every config read in Python, not in the C loop (for comparison, or to "
        "rule it out)",
    )
    serve.add_argument(
        "--libvfio-user",
        metavar="PATH",
        help="libvfio-user.so.0 to load (default: $VGPUD_LIBVFIO_USER, then the loader's)",
    )
    serve.add_argument(
        "--log-level",
        choices=log.LEVELS,
        default=None,
        help="info by default; debug adds every refused request with its errno",
    )
    serve.add_argument(
        "--log-format",
        choices=("auto", "console", "json"),
        default=None,
        help="auto (default): console on a terminal, JSON lines otherwise",
    )

    layout = sub.add_parser("layout", help="print the kernel-exact BAR layout of a profile")
    _device_flags(layout)
    layout.add_argument("--backing-dir", type=Path, help="where the memory files would live")
    layout.add_argument("--json", action="store_true", help="machine-readable output")

    qemu = sub.add_parser("qemu-args", help="print QEMU arguments that attach the device")
    _device_flags(qemu)
    qemu.add_argument("--socket-path", type=Path, help="the device's socket")
    source = qemu.add_mutually_exclusive_group()
    source.add_argument("--config", type=Path, help="attach every device of this config file")
    source.add_argument(
        "--vfio-device",
        metavar="PCI_ADDRESS",
        help="the device is this host PCI device (serve --vfio-device): size the MMIO window "
        "from its BARs in sysfs, or, bound to nvgrace_gpu_vfio_pci, as the daemon serving it "
        "on --socket-path presents them",
    )
    qemu.add_argument("--arch", choices=("x86_64", "aarch64"), default="x86_64")
    qemu.add_argument("--accel", choices=("tcg", "kvm"), default="tcg")
    qemu.add_argument("--ram", default="1G", help="guest RAM (default 1G)")
    qemu.add_argument(
        "--hugepages",
        metavar="SIZE",
        help="back guest RAM with huge pages of this size (e.g. 2M, 1G; reserve them first)",
    )
    qemu.add_argument("--smp", type=int, default=1)
    qemu.add_argument(
        "--numa",
        action="store_true",
        help="add 8 generic-initiator NUMA nodes per GPU (needed for MIG)",
    )
    qemu.add_argument(
        "--hotplug",
        action="store_true",
        help="leave the GPU out, with room reserved for its BARs on its root port, and print "
        "the QMP device_add that adds it to the running guest",
    )
    output = qemu.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true", help="print a JSON array")
    output.add_argument(
        "--libvirt",
        action="store_true",
        help="print the machine as a libvirt domain (XML) instead, the GPUs through "
        '<qemu:commandline> (docs/operations.md, "Under libvirt")',
    )
    qemu.add_argument(
        "--domain-name", default="vgpud", help="the libvirt domain's name (default vgpud)"
    )

    probe = sub.add_parser("probe", help="show what a vfio-user server exposes")
    probe.add_argument("socket", type=Path)
    probe.add_argument("--json", action="store_true")
    return parser


def _serve_config(args: argparse.Namespace) -> DaemonConfig:
    if args.config is not None:
        _refuse_device_flags(args, SERVE_DEVICE_FLAGS)
        config = load_file(args.config)
    else:
        _fill_device_defaults(args)
        socket_path = args.socket_path
        if socket_path is None and args.fd is None:
            socket_path = default_socket_path(args.name)
        device = single_device(
            socket_path=socket_path,
            profile=args.profile,
            memory_size=args.memory_size,
            backing_dir=args.backing_dir,
            name=args.name,
            socket_group=args.socket_group,
            socket_mode=args.socket_mode,
            ready_delay=args.ready_delay or 0.0,
            no_mmap=args.no_mmap,
            no_msix=args.no_msix,
            prealloc=args.prealloc,
            cxl_dvsec=args.cxl_dvsec,
            cxl_mem_active_timeout=args.cxl_mem_active_timeout,
            vfio_device=args.vfio_device,
        )
        config = DaemonConfig(devices=(device,))
    overrides = {}
    if args.log_level:
        overrides["log_level"] = args.log_level
    if args.log_format:
        overrides["log_format"] = args.log_format
    if args.engine:
        overrides["engine"] = args.engine
    if args.libvfio_user:
        overrides["libvfio_user"] = args.libvfio_user
    if args.no_fast_config_reads:
        overrides["fast_config_reads"] = False
    if overrides:
        config = replace(config, **overrides)
    devices.check_layouts(config.devices)
    return config


def _cmd_serve(args: argparse.Namespace) -> int:
    config = _serve_config(args)
    if os.environ.get(upgrade.CHECK_ENV):
        # A daemon about to upgrade runs its command line through this code first: it
        # parses, so say which handover formats it reads (vgpud/upgrade.py, step 2).
        print(upgrade.check_reply())
        return 0
    log.configure(config.log_level, config.log_format)
    try:
        handover = upgrade.read_handover()
    except ValueError as exc:
        structlog.get_logger("vgpud").error(
            "upgrade failed: the handover cannot be read; starting afresh", error=str(exc)
        )
        handover = None
    try:
        with EarlySignals() as early:
            # SIGHUP reads the file again, with the same command-line overrides.
            reload_config = None if args.config is None else functools.partial(_serve_config, args)
            trio.run(
                functools.partial(
                    daemon.run,
                    config,
                    inherited_fd=args.fd,
                    early=early,
                    reload_config=reload_config,
                    handover=handover,
                )
            )
    except daemon.RefusedConfigError as exc:
        print(f"vgpud: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except daemon.StartupError as exc:
        print(f"vgpud: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    return 0


def _cmd_layout(args: argparse.Namespace) -> int:
    _fill_device_defaults(args)
    device = single_device(
        socket_path=None,
        profile=args.profile,
        memory_size=args.memory_size,
        name=args.name,
        backing_dir=args.backing_dir,
    )
    report = devices.layout_report(device)
    if args.json:
        print(json.dumps(report.as_dict, indent=2))
    else:
        print(report.text, end="")
    return 0


def _cmd_qemu_args(args: argparse.Namespace) -> int:
    configs: Sequence[DeviceConfig]
    if args.config is not None:
        _refuse_device_flags(args, QEMU_ARGS_DEVICE_FLAGS)
        configs = load_file(args.config).devices
        devices.check_layouts(configs)
    else:
        _fill_device_defaults(args)
        configs = [
            single_device(
                socket_path=args.socket_path or default_socket_path(args.name),
                profile=args.profile,
                memory_size=args.memory_size,
                name=args.name,
                vfio_device=args.vfio_device,
            )
        ]
    guests = [
        qemu_args.GuestDevice(
            socket_path=str(c.socket_path or default_socket_path(c.name)),
            bars=devices.guest_bars(c),
            id=c.name,
        )
        for c in configs
    ]
    machine = qemu_args.plan(
        guests,
        arch=args.arch,
        ram=args.ram,
        smp=args.smp,
        accel=args.accel,
        numa=args.numa,
        hugepages=args.hugepages,
        hotplug=args.hotplug,
    )
    if args.libvirt:
        print(libvirt_domain.domain_xml(machine, name=args.domain_name), end="")
        return 0
    built = qemu_args.arguments(machine)
    if not args.hotplug:
        binary = f"qemu-system-{args.arch}"
        print(json.dumps(built) if args.json else qemu_args.render_shell(built, binary))
        return 0
    commands = qemu_args.device_add_commands(guests)
    if args.json:
        print(json.dumps({"args": built, "qmp": commands}))
        return 0
    print(qemu_args.render_shell(built, f"qemu-system-{args.arch}"))
    # QMP only: HMP's device_add cannot build the socket object (seen with QEMU 11.1.3).
    print("# then, with the guest running, on its QMP monitor (one per device; not HMP):")
    for command in commands:
        print(json.dumps(command, separators=(",", ":")))
    # Seen with QEMU 11.1.3: device_del of a device with MSI-X aborts QEMU (captures README).
    print("# device_del aborts QEMU 11.1.3 unless the GPU is served with --no-msix")
    return 0


def _cmd_probe(args: argparse.Namespace) -> int:
    try:
        result = trio.run(probe.probe, args.socket)
    except trio.TooSlowError:
        print(
            f"vgpud probe: {args.socket}: no complete answer within {probe.PROBE_TIMEOUT:g} s",
            file=sys.stderr,
        )
        return EXIT_FAILURE
    except (OSError, EOFError, VfioUserError, MisbehavingServerError, ProtocolError) as exc:
        # Whatever the server sends, one line: a probe is pointed at servers of any quality.
        print(f"vgpud probe: {args.socket}: {exc}{_probe_hint(exc)}", file=sys.stderr)
        return EXIT_FAILURE
    print(json.dumps(probe.as_dict(result), indent=2) if args.json else probe.render(result))
    return 0


def _probe_hint(exc: Exception) -> str:
    """What a refusal means, for the one refusal users meet in practice: a probe of a device
    whose VM is running (one client per device; vgpud/server/refusal.py)."""
    if isinstance(exc, VfioUserError) and exc.errno == errno.EBUSY:
        return " (the device has a client already, e.g. its VM: one client at a time)"
    return ""


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``vgpud`` script."""
    args = build_parser().parse_args(argv)
    if args.command != "serve":
        # Blocked by vgpud.entry for a daemon's start; any other command takes them as usual.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, DEFERRED_SIGNALS)
    handlers = {
        "serve": _cmd_serve,
        "layout": _cmd_layout,
        "qemu-args": _cmd_qemu_args,
        "probe": _cmd_probe,
    }
    try:
        return handlers[args.command](args)
    except (ConfigError, ValueError) as exc:
        # ValueError: LayoutError (the kernel would fail probe for this memory size) and
        # profile override errors; both are the user's input.
        print(f"vgpud: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except devices.ServedBarsError as exc:
        # qemu-args for a device only its daemon can describe, and the daemon is not there.
        print(f"vgpud: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return INTERRUPTED
    except BrokenPipeError:
        # Output piped into head(1) and the like: not an error worth a traceback.
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
