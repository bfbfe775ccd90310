"""Command-line flags that would otherwise be silently ignored or passed to QEMU unchecked.

``serve`` never starts a daemon here: ``daemon.run`` is replaced by one that records the
configuration it was given.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import Served
from vgpud import cli


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "vgpud.toml"
    path.write_text(
        f'[[device]]\nname = "tray0"\nsocket_path = "{tmp_path / "tray0.sock"}"\n'
        'profile = "gh200"\n'
    )
    return path


def _usage_error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    assert cli.main(argv) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    return err


# -- device flags next to --config ------------------------------------------------------------


@pytest.mark.parametrize(
    "flags",
    [
        ["--memory-size", "8GiB"],
        ["--profile", "gb200"],
        # Typed, even though it is the default: still not what the file says.
        ["--profile", "gh200"],
        ["--name", "gpu0"],
        ["--backing-dir", "/somewhere"],
        ["--socket-group", "kvm"],
        ["--socket-mode", "0660"],
        ["--ready-delay", "0"],
        ["--no-mmap"],
        ["--no-msix"],
        ["--prealloc"],
        ["--vfio-device", "0009:01:00.0"],
        ["--cxl-dvsec"],
        ["--cxl-mem-active-timeout", "2"],
    ],
)
def test_serve_refuses_device_flags_next_to_config(
    flags: list[str], config_file: Path, served: Served, capsys: pytest.CaptureFixture[str]
) -> None:
    err = _usage_error(capsys, ["serve", "--config", str(config_file), *flags])
    assert f"{flags[0]} cannot be combined with --config" in err
    assert flags[0].removeprefix("--").replace("-", "_") in err
    assert served == []


def test_serve_names_every_device_flag_given(
    config_file: Path, served: Served, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["serve", "--config", str(config_file), "--memory-size", "8GiB", "--profile", "gb200"]
    err = _usage_error(capsys, [*argv, "--backing-dir", "X"])
    assert err.startswith("vgpud: --profile, --memory-size, --backing-dir cannot be combined")
    assert served == []


def test_serve_config_takes_daemon_wide_flags(config_file: Path, served: Served) -> None:
    argv = ["serve", "--config", str(config_file), "--log-level", "debug", "--log-format", "json"]
    argv += ["--engine", "libvfio-user", "--libvfio-user", "/opt/libvfio-user.so.0"]
    argv += ["--no-fast-config-reads"]
    assert cli.main(argv) == 0
    [config] = served
    assert (config.log_level, config.log_format) == ("debug", "json")
    assert (config.engine, config.libvfio_user) == ("libvfio-user", "/opt/libvfio-user.so.0")
    assert not config.fast_config_reads
    assert [d.name for d in config.devices] == ["tray0"]


def test_serve_flags_alone_still_default(tmp_path: Path, served: Served) -> None:
    assert cli.main(["serve", "--socket-path", str(tmp_path / "s")]) == 0
    [device] = served[0].devices
    assert (device.name, device.profile, device.ready_delay) == ("gpu0", "gh200", 0.0)
    assert not device.prealloc
    assert served[0].fast_config_reads


def test_serve_no_msix_flag_reaches_the_device(tmp_path: Path, served: Served) -> None:
    assert cli.main(["serve", "--socket-path", str(tmp_path / "s"), "--no-msix"]) == 0
    [device] = served[0].devices
    assert device.no_msix


def test_serve_prealloc_flag_reaches_the_device(tmp_path: Path, served: Served) -> None:
    assert cli.main(["serve", "--socket-path", str(tmp_path / "s"), "--prealloc"]) == 0
    [device] = served[0].devices
    assert device.prealloc


def test_qemu_args_refuses_device_flags_next_to_config(
    config_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for flags in (["--profile", "gb200"], ["--memory-size", "8GiB"], ["--name", "x"]):
        err = _usage_error(capsys, ["qemu-args", "--config", str(config_file), *flags])
        assert f"{flags[0]} cannot be combined with --config" in err
    err = _usage_error(capsys, ["qemu-args", "--config", str(config_file), "--socket-path", "/s"])
    assert "--socket-path cannot be combined with --config" in err


# -- qemu-args guest RAM, huge pages and CPUs --------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--hugepages", "abc"], "--hugepages 'abc': not a supported huge page size (2M or 1G)"),
        (["--hugepages", "3M"], "--hugepages '3M': not a supported huge page size"),
        (["--hugepages=-2M"], "--hugepages '-2M': not a supported huge page size"),
        (["--hugepages", "2MB"], "--hugepages '2MB': not a supported huge page size"),
        (["--ram", "abc"], "--ram 'abc': not a size"),
        (["--ram=-1G"], "--ram '-1G': not a size"),
        (["--ram", "0"], "--ram '0': the guest needs some RAM"),
        (["--ram", "0G"], "--ram '0G': the guest needs some RAM"),
        (["--ram", "1024"], "--ram '1024': give a unit, e.g. 1024M"),
        (["--ram", "1GB"], "--ram '1GB': must be a whole number of MiB"),
        (["--ram", "512M", "--hugepages", "1G"], "--ram 512M is not a whole number of 1G huge"),
        (["--smp=-4"], "--smp -4: must be a positive number of CPUs"),
        (["--smp", "0"], "--smp 0: must be a positive number of CPUs"),
    ],
)
def test_qemu_args_refuses_bad_guest_sizes(
    flags: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    err = _usage_error(capsys, ["qemu-args", "--socket-path", "/s", *flags])
    assert err.startswith(f"vgpud: {message}")
    assert capsys.readouterr().out == ""


def test_qemu_args_writes_sizes_as_qemu_spells_them(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["qemu-args", "--socket-path", "/s", "--ram", "1.5GiB", "--hugepages", "2MiB"]
    assert cli.main([*argv, "--smp", "4", "--json"]) == 0
    args = json.loads(capsys.readouterr().out)
    assert args[args.index("-m") + 1] == "1536M"
    assert args[args.index("-smp") + 1] == "4"
    assert "memory-backend-memfd,id=ram0,size=1536M,share=on,hugetlb=on,hugetlbsize=2M" in args


# -- qemu-args --hotplug -----------------------------------------------------------------------


def test_qemu_args_hotplug_prints_the_device_add_next_to_the_command(
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = ["qemu-args", "--socket-path", "/s", "--memory-size", "8448MiB", "--hotplug"]
    assert cli.main([*argv, "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert set(printed) == {"args", "qmp"}
    assert not [a for a in printed["args"] if "vfio-user-pci" in a]
    assert "mem-reserve=32M,pref64-reserve=32G" in printed["args"][-1]
    assert printed["qmp"] == [
        {
            "execute": "device_add",
            "arguments": {
                "driver": "vfio-user-pci",
                "id": "gpu0",
                "bus": "rp0",
                "socket": {"type": "unix", "path": "/s"},
            },
        }
    ]
    # The shell form: the same command line, then the same QMP command, ready to paste.
    assert cli.main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    qmp = [json.loads(line) for line in lines if line.startswith("{")]
    assert qmp == printed["qmp"]
    assert lines[0] == "qemu-system-x86_64 \\"
    assert any(line.startswith("# device_del aborts QEMU 11.1.3") for line in lines)


def test_qemu_args_hotplug_refuses_numa(capsys: pytest.CaptureFixture[str]) -> None:
    err = _usage_error(capsys, ["qemu-args", "--socket-path", "/s", "--hotplug", "--numa"])
    assert err.startswith("vgpud: --numa needs the GPU present at start-up")
    assert capsys.readouterr().out == ""
