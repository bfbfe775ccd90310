"""A ``vfio_device`` from configuration to the daemon: validated before anything starts, refused
where it makes no sense (the synthetic GPU's keys, ``layout``, the libvfio-user engine) and,
when the host has no such device, a one-line failure naming it.

Serving a real device is tests/e2e/test_vfio_backend.py's job.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import io
import json
import socket
import subprocess
from pathlib import Path
from typing import Any, cast

import pytest
import structlog
import trio

from backends.device import DeviceError
from backends.vfio import VfioPciDevice
from backends.vfio.device import SYSFS_PCI_DEVICES, bound_driver, sysfs_bars, sysfs_ids
from tests.daemon.test_qemu_args import build
from tests.serve_process import VGPUD, serve_args, start, stop
from vgpud import cli, daemon, devices, qemu_args
from vgpud.client import VfioUserClient
from vgpud.config import ConfigError, DaemonConfig, DeviceConfig, parse, single_device
from vgpud.daemon import StartupError, wait_ready
from vgpud.devices import BuiltDevice
from vgpud.fleet import Endpoint, Fleet, InUseError, LiveDevice, Prepare
from vgpud.memory_files import MemoryFiles
from vgpud.variant import make_device

ABSENT = "0000:99:00.0"  # a PCI address this host is assumed not to have


@pytest.fixture
def absent() -> str:
    if (SYSFS_PCI_DEVICES / ABSENT).exists():
        pytest.skip(f"this host has a PCI device {ABSENT}")
    return ABSENT


def vfio(address: str = "01:00.0", **keys: Any) -> dict[str, Any]:
    return {"device": [{"name": "gpu0", "vfio_device": address, **keys}]}


# -- the key ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "normalised"),
    [
        ("0009:01:00.0", "0009:01:00.0"),
        ("01:00.0", "0000:01:00.0"),
        ("000A:BC:1f.3", "000a:bc:1f.3"),
    ],
)
def test_vfio_device_is_normalised(address: str, normalised: str) -> None:
    assert parse(vfio(address)).devices[0].vfio_device == normalised
    assert single_device(socket_path=None, vfio_device=address).vfio_device == normalised


def test_no_vfio_device_by_default() -> None:
    assert parse({"device": [{}]}).devices[0].vfio_device is None
    assert single_device(socket_path=None).vfio_device is None


def test_vfio_device_keeps_the_socket_keys() -> None:
    (device,) = parse(
        vfio(socket_path="/run/g.sock", socket_mode="0660", socket_group="kvm", no_mmap=True)
    ).devices
    assert (device.socket_path, device.socket_mode, device.socket_group, device.no_mmap) == (
        Path("/run/g.sock"),
        0o660,
        "kvm",
        True,
    )
    device = single_device(
        socket_path=Path("/s"), vfio_device="01:00.0", socket_group="kvm", socket_mode="0660"
    )
    assert (device.socket_mode, device.socket_group) == (0o660, "kvm")


# Valid values for each synthetic-GPU key: the refusal must come from vfio_device alone.
SYNTHETIC: dict[str, dict[str, Any]] = {
    "profile": {"profile": "gh200"},
    "memory_size": {"memory_size": "8GiB"},
    "memphys": {"memphys": "0x400000000000"},
    "backing_dir": {"backing_dir": "/tmp/m"},
    "ready_delay": {"ready_delay": 0.0},
    "cxl_dvsec": {"cxl_dvsec": False},
    "prealloc": {"prealloc": False},
    "cxl_mem_active_timeout": {"cxl_dvsec": True, "cxl_mem_active_timeout": 3},
}


@pytest.mark.parametrize("key", sorted(SYNTHETIC))
def test_synthetic_keys_are_refused_next_to_vfio_device(key: str) -> None:
    keys = SYNTHETIC[key]
    parse({"device": [keys]})  # valid on their own
    with pytest.raises(ConfigError, match=r"cannot be combined with vfio_device") as caught:
        parse(vfio(**keys), source="tray.toml")
    message = str(caught.value)
    assert message.startswith("tray.toml: device #1: ")
    named = message.removeprefix("tray.toml: device #1: ").split(" describe(s) ")[0]
    assert key in named.split(", ")


def test_every_synthetic_key_is_named_at_once() -> None:
    with pytest.raises(ConfigError, match=r": profile, memory_size, backing_dir describe"):
        parse(vfio(backing_dir="/m", memory_size="8GiB", profile="gb200"))


@pytest.mark.parametrize(
    ("flags", "key"),
    [
        ({"profile": "gb200"}, "profile"),
        ({"memory_size": "8GiB"}, "memory_size"),
        ({"backing_dir": Path("/tmp/m")}, "backing_dir"),
        ({"ready_delay": 2.0}, "ready_delay"),
        ({"cxl_dvsec": True}, "cxl_dvsec"),
        ({"prealloc": True}, "prealloc"),
    ],
)
def test_synthetic_flags_are_refused_next_to_vfio_device(flags: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError, match=f"^command line: {key} describe"):
        single_device(socket_path=None, vfio_device="01:00.0", **flags)


@pytest.mark.parametrize("address", ["01:00", "0000:01:00.8", "eth0", "", "0000:1:00.0"])
def test_bad_address_is_refused(address: str) -> None:
    with pytest.raises(ConfigError, match=r"^config: device #1: vfio_device: .* not a PCI addr"):
        parse(vfio(address))
    with pytest.raises(ConfigError, match=r"^command line: vfio_device: "):
        single_device(socket_path=None, vfio_device=address)


@pytest.mark.parametrize("value", [1, True, ["01:00.0"], {"bus": 1}])
def test_non_string_address_is_refused(value: object) -> None:
    with pytest.raises(ConfigError, match=r"vfio_device must be a PCI address"):
        parse(vfio(value))  # type: ignore[arg-type]


def test_the_same_device_twice_is_refused() -> None:
    raw = {
        "device": [
            {"name": "a", "vfio_device": "01:00.0"},
            {"name": "b", "vfio_device": "0000:01:00.0"},  # the same, spelt out
        ]
    }
    with pytest.raises(ConfigError, match=r"two devices are vfio_device 0000:01:00\.0"):
        parse(raw)


def test_vfio_devices_have_no_backing_dir_to_share() -> None:
    config = parse(
        {
            "device": [
                {"name": "a", "vfio_device": "01:00.0"},
                {"name": "b", "vfio_device": "02:00.0"},
                # A synthetic GPU whose memory is where device a's would be, had it any.
                {"name": "c", "backing_dir": "/dev/shm/vgpud/a"},
            ]
        }
    )
    assert [d.vfio_device for d in config.devices] == ["0000:01:00.0", "0000:02:00.0", None]
    # ... while two synthetic GPUs still may not share one.
    with pytest.raises(ConfigError, match="share backing_dir /dev/shm/vgpud/a"):
        parse({"device": [{"name": "a"}, {"name": "c", "backing_dir": "/dev/shm/vgpud/a"}]})


def test_names_and_sockets_stay_unique_for_vfio_devices() -> None:
    with pytest.raises(ConfigError, match="two devices are named 'a'"):
        parse(
            {"device": [{"name": "a", "vfio_device": "01:00.0"}, {"name": "a", "profile": "gh200"}]}
        )
    with pytest.raises(ConfigError, match="two devices use socket /s"):
        parse(
            {
                "device": [
                    {"name": "a", "vfio_device": "01:00.0", "socket_path": "/s"},
                    {"name": "b", "vfio_device": "02:00.0", "socket_path": "/s"},
                ]
            }
        )


# -- layout and qemu-args ---------------------------------------------------------------------


def test_layout_refuses_a_vfio_device() -> None:
    config = single_device(socket_path=None, vfio_device="01:00.0")
    with pytest.raises(ValueError, match="a vfio_device has its own BARs"):
        devices.layout_report(config)


@pytest.fixture
def fake_sysfs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """0000:01:00.0 with a 16 MiB BAR0 and a 1 TiB 64-bit BAR2, as sysfs lists them."""
    sysfs = tmp_path / "sysfs"
    sysfs_device(
        sysfs,
        (0x00000000FD000000, 16 << 20, 0x40200),
        (0, 0, 0),
        (0x0000400000000000, 1 << 40, 0x14220C),
    )
    monkeypatch.setattr(devices, "sysfs_bars", functools.partial(sysfs_bars, sysfs=sysfs))
    return sysfs


def sysfs_device(sysfs: Path, *bars: tuple[int, int, int]) -> Path:
    """0000:01:00.0 in ``sysfs``, its ``resource`` file listing ``bars`` (start, size, flags;
    size 0 for an unused BAR) as the kernel writes them."""
    device = sysfs / "0000:01:00.0"
    device.mkdir(parents=True)
    lines = (
        f"{start:#018x} {start + size - 1 if size else 0:#018x} {flags:#018x}\n"
        for start, size, flags in bars
    )
    (device / "resource").write_text("".join(lines))
    return device


def test_guest_bars_of_a_vfio_device_come_from_sysfs(fake_sysfs: Path) -> None:
    config = single_device(socket_path=None, vfio_device="01:00.0")
    # Unused BARs left out; prefetchable as sysfs flags it (0x2000).
    assert devices.guest_bars(config) == [
        qemu_args.GuestBar(16 << 20, prefetchable=False),
        qemu_args.GuestBar(1 << 40, prefetchable=True),
    ]


def test_guest_bars_of_a_vfio_device_leave_io_bars_out(fake_sysfs: Path) -> None:
    resource = fake_sysfs / "0000:01:00.0" / "resource"
    io_bar = "0x000000000000c000 0x000000000000c07f 0x0000000000040101\n"
    resource.write_text(resource.read_text() + io_bar)
    config = single_device(socket_path=None, vfio_device="01:00.0")
    assert [bar.size for bar in devices.guest_bars(config)] == [16 << 20, 1 << 40]


def test_qemu_args_for_a_vfio_device_size_the_window_from_sysfs(
    fake_sysfs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sock = tmp_path / "gpu0.sock"
    argv = ["qemu-args", "--vfio-device", "01:00.0", "--socket-path", str(sock), "--json"]
    assert cli.main(argv) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == build(
        [
            qemu_args.GuestDevice(
                socket_path=str(sock),
                bars=[qemu_args.GuestBar(16 << 20, False), qemu_args.GuestBar(1 << 40)],
                id="gpu0",
            )
        ],
        arch="x86_64",
        ram="1G",
        smp=1,
        accel="tcg",
        numa=False,
    )
    # The synthetic gh200's window would be far smaller than this device's 1 TiB BAR.
    default = ["qemu-args", "--socket-path", str(sock), "--json"]
    assert cli.main(default) == 0
    assert json.loads(capsys.readouterr().out) != printed


def test_qemu_args_for_an_absent_vfio_device(
    absent: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["qemu-args", "--vfio-device", absent]) == cli.EXIT_USAGE
    assert f"PCI device {absent}: cannot read its BARs" in capsys.readouterr().err


def test_qemu_args_refuses_synthetic_flags_next_to_vfio_device(
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = ["qemu-args", "--vfio-device", "01:00.0", "--memory-size", "8GiB"]
    assert cli.main(argv) == cli.EXIT_USAGE
    assert "memory_size describe(s) the synthetic GPU" in capsys.readouterr().err


def test_qemu_args_vfio_device_and_config_are_exclusive(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as caught:
        cli.main(["qemu-args", "--vfio-device", "01:00.0", "--config", str(tmp_path / "c")])
    assert caught.value.code == cli.EXIT_USAGE


@pytest.fixture
def nvgrace_sysfs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """0000:01:00.0, a GH200 (10de:2342) bound to nvgrace_gpu_vfio_pci, with sysfs listing the
    physical BARs: none of them the fake BAR4 of device memory the driver presents."""
    sysfs = tmp_path / "sysfs"
    device = sysfs_device(
        sysfs,
        (0x0000661002000000, 16 << 20, 0x14220C),
        (0, 0, 0),
        (0x0000650000000000, 64 << 20, 0x14220C),
    )
    (device / "vendor").write_text("0x10de\n")
    (device / "device").write_text("0x2342\n")
    driver = sysfs / "drivers" / devices.NVGRACE_DRIVER
    driver.mkdir(parents=True)
    (device / "driver").symlink_to(driver)
    for name, function in (
        ("sysfs_bars", sysfs_bars),
        ("bound_driver", bound_driver),
        ("sysfs_ids", sysfs_ids),
    ):
        monkeypatch.setattr(devices, name, functools.partial(function, sysfs=sysfs))
    return sysfs


def qemu_args_json(*argv: str) -> tuple[int, Any, str]:
    """``vgpud qemu-args ARGV --json`` in-process: exit status, parsed output, stderr."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = cli.main(["qemu-args", *argv, "--json"])
    return status, json.loads(out.getvalue()) if status == 0 else None, err.getvalue()


async def test_qemu_args_asks_the_daemon_for_the_fake_bars_of_an_nvgrace_device(
    nvgrace_sysfs: Path, tmp_path: Path, notify_socket: socket.socket
) -> None:
    """Under nvgrace_gpu_vfio_pci the window is sized for the BARs the daemon serves, the
    fake 8 GiB BAR4 among them, not for the 64 MiB sysfs lists. The synthetic gh200 stands
    in for the vgpud serving the real device: it presents exactly what the driver presents."""
    sock = str(tmp_path / "gpu0.sock")
    proc = start(serve_args(tmp_path, "--memory-size", "8448MiB"), tmp_path)
    try:
        assert notify_socket.recv(64) == b"READY=1"
        asked = functools.partial(qemu_args_json, "--vfio-device", "01:00.0", "--socket-path", sock)
        status, printed, err = await trio.to_thread.run_sync(asked)
        assert status == 0, err
        synthetic = functools.partial(
            qemu_args_json, "--socket-path", sock, "--memory-size", "8448MiB"
        )
        assert await trio.to_thread.run_sync(synthetic) == (0, printed, "")
        served = functools.partial(devices.served_guest_bars, "0000:01:00.0", sock)
        assert await trio.to_thread.run_sync(served) == [
            qemu_args.GuestBar(16 << 20, prefetchable=False),
            qemu_args.GuestBar(2 << 30),  # resmem: 1.25 GiB, rounded up to a power of two
            qemu_args.GuestBar(8 << 30),  # usemem: 7.25 GiB before the 512 MiB round-down
        ]
        # Asked while a client (its VM) is attached: refused, and the client is untouched.
        async with await VfioUserClient.connect(sock) as client:
            status, _, err = await trio.to_thread.run_sync(asked)
            assert status == cli.EXIT_FAILURE
            assert err.count("\n") == 1, err
            assert "bound to nvgrace_gpu_vfio_pci" in err and "has a client already" in err
            assert (await client.device_info()).num_regions == 9
        # Another device's vgpud on that path: the window would be for the wrong BARs.
        (nvgrace_sysfs / "0000:01:00.0" / "device").write_text("0x2345\n")
        status, _, err = await trio.to_thread.run_sync(asked)
        assert status == cli.EXIT_FAILURE
        assert "serves a 10de:2342, not this 10de:2345" in err
    finally:
        stop(proc)


def test_qemu_args_for_an_nvgrace_device_nobody_serves(nvgrace_sysfs: Path, tmp_path: Path) -> None:
    sock = str(tmp_path / "gpu0.sock")
    status, _, err = qemu_args_json("--vfio-device", "01:00.0", "--socket-path", sock)
    assert status == cli.EXIT_FAILURE
    assert err.count("\n") == 1, err
    assert f"qemu-args asks the vgpud serving it on {sock}" in err
    assert f"start `vgpud serve --vfio-device 0000:01:00.0 --socket-path {sock}` first" in err


def test_guest_bars_of_an_absent_device(absent: str) -> None:
    config = single_device(socket_path=None, vfio_device=absent)
    with pytest.raises(ValueError, match=f"PCI device {absent}: cannot read its BARs"):
        devices.guest_bars(config)


# -- the daemon ------------------------------------------------------------------------------


def test_build_device_of_an_absent_device(absent: str) -> None:
    with pytest.raises(DeviceError) as caught:
        devices.build_device(single_device(socket_path=None, vfio_device=absent))
    assert caught.value.errno == errno.ENODEV
    assert f"no PCI device {absent}" in caught.value.message


async def test_run_fails_to_start_naming_the_device(absent: str, tmp_path: Path) -> None:
    sock = tmp_path / "gpu0.sock"
    config = DaemonConfig((single_device(socket_path=sock, vfio_device=absent),))
    with pytest.raises(StartupError, match=f"no PCI device {absent}"):
        await daemon.run(config)
    assert not sock.exists()


async def test_libvfio_user_engine_refuses_a_vfio_device(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("LISTEN_FDS", raising=False)
    monkeypatch.delenv("LISTEN_PID", raising=False)
    config = DaemonConfig(
        (
            single_device(
                socket_path=tmp_path / "a.sock",
                name="a",
                memory_size="4GiB",
                backing_dir=tmp_path / "mem",
            ),
            single_device(socket_path=tmp_path / "b.sock", name="b", vfio_device="01:00.0"),
        ),
        engine="libvfio-user",
        # Never loaded: the refusal comes before the library is (daemon._load_engine), and
        # before any device is built (device a would create its memory files).
        libvfio_user=str(tmp_path / "no-such-libvfio-user.so.0"),
    )
    with pytest.raises(StartupError, match=r"cannot serve a vfio_device \(b\); use the python"):
        await daemon.run(config)
    assert list(await trio.Path(tmp_path).iterdir()) == []


async def test_wait_ready_skips_a_vfio_device() -> None:
    # Never opened: the wait must not touch it (the host driver probed the real device).
    backend = VfioPciDevice.__new__(VfioPciDevice)
    backend.address, backend.driver, backend.group = "0000:01:00.0", "vfio-pci", 7
    config = DeviceConfig("gpu0", None, vfio_device="0000:01:00.0")
    built = BuiltDevice("gpu0", backend, make_device(backend), config)
    assert not built.probes_readiness
    assert built.summary() == {
        "vfio_device": "0000:01:00.0",
        "driver": "vfio-pci",
        "iommu_group": 7,
    }

    class Log:
        def info(self, event: str, **fields: Any) -> None:
            raise AssertionError(f"wait_ready logged {event!r} for a vfio device")

    await wait_ready(built, Log())


# -- the command line ------------------------------------------------------------------------


def test_serve_an_absent_device_is_one_line_naming_it(absent: str, tmp_path: Path) -> None:
    sock = tmp_path / "gpu0.sock"
    result = subprocess.run(
        [*VGPUD, "serve", "--vfio-device", absent, "--socket-path", str(sock)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == 1, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("vgpud: ")]
    assert len(lines) == 1, result.stderr
    assert f"no PCI device {absent}" in lines[0]
    assert "Traceback" not in result.stderr
    assert not sock.exists()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--memory-size", "8GiB"], "memory_size describe(s) the synthetic GPU"),
        (["--backing-dir", "/tmp/m"], "backing_dir describe(s) the synthetic GPU"),
        (["--profile", "gb200"], "profile describe(s) the synthetic GPU"),
        (["--cxl-dvsec"], "cxl_dvsec describe(s) the synthetic GPU"),
        (["--no-msix"], "no_msix describe(s) the synthetic GPU"),
    ],
)
def test_serve_refuses_synthetic_flags_next_to_vfio_device(
    flags: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sock = tmp_path / "gpu0.sock"
    argv = ["serve", "--vfio-device", "01:00.0", "--socket-path", str(sock), *flags]
    assert cli.main(argv) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert err.startswith("vgpud: command line: ") and message in err
    assert not sock.exists()


def test_serve_refuses_a_bad_address(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["serve", "--vfio-device", "01:00", "--socket-path", str(tmp_path / "s")]
    assert cli.main(argv) == cli.EXIT_USAGE
    assert "'01:00' is not a PCI address" in capsys.readouterr().err


def test_a_reload_cannot_give_a_draining_devices_pci_device_to_another(tmp_path: Path) -> None:
    """Device a was removed from the file while its VM is attached, and device b names its
    PCI device: b fails with the reason, not the kernel's "Device or resource busy" from
    opening a's IOMMU group a second time (docs/operations.md, "A real device")."""
    address = "0000:00:04.0"
    draining = single_device(socket_path=tmp_path / "a.sock", name="a", vfio_device=address)
    fleet = Fleet(
        DaemonConfig(devices=(draining,)),
        cast(trio.Nursery, None),
        None,
        [],
        structlog.get_logger(),
        prepare=cast(Prepare, None),
        stop_daemon=lambda: None,
    )
    fleet.devices.append(
        LiveDevice(
            draining,
            cast(BuiltDevice, None),
            Endpoint(tmp_path / "a.sock", None),
            cast(MemoryFiles, None),
            retiring=True,
        )
    )
    added = single_device(socket_path=tmp_path / "b.sock", name="b", vfio_device=address)
    with pytest.raises(InUseError, match=f"PCI device {address} is still device a's"):
        fleet._check_free(added)
    fleet._check_free(
        single_device(socket_path=tmp_path / "c.sock", name="c", vfio_device="0000:00:05.0")
    )
