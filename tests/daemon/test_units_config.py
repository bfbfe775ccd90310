"""Sizes and configuration: everything is validated before anything starts."""

from __future__ import annotations

from pathlib import Path

import pytest

from vgpud import config as config_module
from vgpud.config import ConfigError, load_file, parse, single_device
from vgpud.devices import profile_for
from vgpud.units import format_size, parse_size


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("96GiB", 96 << 30),
        ("96G", 96 << 30),
        ("512MiB", 512 << 20),
        ("1.5GiB", 3 << 29),
        ("4096", 4096),
        ("0x4000", 0x4000),
        ("1GB", 10**9),
        ("1.001GB", 1_001_000_000),
        ("0.5KiB", 512),
        (" 2 TiB ", 2 << 40),
        (123, 123),
    ],
)
def test_parse_size(text: str | int, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize(
    "text", ["", "GiB", "12XB", "-1", "1.3B", "0xZZ", "ninety", "16.0000000000000001GiB"]
)
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="size"):
        parse_size(text)


def test_format_size_round_trips() -> None:
    for size in (96 << 30, 1 << 40, 512 << 20, 4096, 1000):
        assert parse_size(format_size(size)) == size


def test_tray_config(tmp_path: Path) -> None:
    text = "\n".join(
        f'[[device]]\nname = "gpu{i}"\nsocket_path = "{tmp_path}/gpu{i}.sock"\n'
        f'profile = "gb200"\nmemory_size = "8GiB"\nbacking_dir = "{tmp_path}/m{i}"\n'
        for i in range(4)
    )
    path = tmp_path / "tray.toml"
    path.write_text('[daemon]\nlog_level = "debug"\nlog_format = "json"\n' + text)
    config = load_file(path)
    assert [d.name for d in config.devices] == ["gpu0", "gpu1", "gpu2", "gpu3"]
    assert config.devices[3].memory_size == 8 << 30
    assert config.log_level == "debug"


def test_every_key_is_in_the_module_docstring() -> None:
    """README and docs/operations.md send users to the top of vgpud/config.py for the keys
    (memphys was accepted but not listed there)."""
    doc = config_module.__doc__ or ""
    listed = {line.strip().lstrip("# ").split(" = ")[0] for line in doc.splitlines()}
    assert not (config_module._DEVICE_KEYS | config_module._DAEMON_KEYS) - listed


CXL_CODE_MESSAGE = r"cxl_mem_active_timeout must be an integer code 0\.\.7"


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"device": [{"name": "a", "colour": "red"}]}, "unknown key"),
        ({"device": [{"memory_size": "lots"}]}, "memory_size"),
        ({"device": [{"memory_size": "0"}]}, "must not be 0"),
        ({"device": [{"memory_size": "1000000000"}]}, "multiple of 64 KiB"),
        ({"device": [{"profile": "h100"}]}, "unknown profile"),
        ({"device": [{"name": "a"}, {"name": "a"}]}, "two devices are named"),
        (
            {"device": [{"name": "a", "socket_path": "/s"}, {"name": "b", "socket_path": "/s"}]},
            "two devices use socket",
        ),
        ({"device": []}, "at least one"),
        ({"devices": []}, "unknown top-level"),
        ({"daemon": {"log_level": "loud"}, "device": [{}]}, "log_level"),
        (
            {"daemon": {"fast_config_reads": "no"}, "device": [{}]},
            "fast_config_reads must be true or false",
        ),
        ({"device": [{"socket_mode": "999"}]}, "socket_mode"),
        ({"device": [{"ready_delay": -1}]}, "ready_delay"),
        ({"device": [{"name": "../x"}]}, "file-name-safe"),
        ({"device": [{"cxl_dvsec": "yes"}]}, "cxl_dvsec must be true or false"),
        ({"device": [{"cxl_dvsec": 1}]}, "cxl_dvsec must be true or false"),
        ({"device": [{"prealloc": "yes"}]}, "prealloc must be true or false"),
        ({"device": [{"no_msix": "yes"}]}, "no_msix must be true or false"),
        ({"device": [{"prealloc": 1}]}, "prealloc must be true or false"),
        # The timeout is the CXL DVSEC's field: meaningless, so refused, without one.
        ({"device": [{"cxl_mem_active_timeout": 4}]}, "cxl_mem_active_timeout needs cxl_dvsec"),
        (
            {"device": [{"cxl_dvsec": False, "cxl_mem_active_timeout": 3}]},
            "cxl_mem_active_timeout needs cxl_dvsec = true",
        ),
        # A 3-bit field: 0..7; no bools, floats or strings even when they look like a code.
        *(
            ({"device": [{"cxl_dvsec": True, "cxl_mem_active_timeout": bad}]}, CXL_CODE_MESSAGE)
            for bad in (8, -1, 1 << 40, True, False, 3.0, "3")
        ),
    ],
)
def test_bad_config_is_rejected_with_the_key(raw: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse(raw)


def test_config_that_is_not_utf8_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes(b'[[device]]\nname = "gp\xfc"\n')
    with pytest.raises(ConfigError, match=r"latin1\.toml: not UTF-8 text"):
        load_file(path)


def test_socket_path_of_107_bytes_and_numeric_group_are_fine() -> None:
    device = parse({"device": [{"socket_path": "/" + "s" * 106, "socket_group": "0"}]})
    assert len(str(device.devices[0].socket_path)) == 107


def test_bad_toml(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("[[device]\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_file(path)


def test_flags_make_one_device() -> None:
    device = single_device(socket_path=Path("/tmp/x.sock"), memory_size="8GiB", socket_group="kvm")
    assert device.memory_size == 8 << 30
    assert device.socket_mode == 0o660  # the group's members may connect
    assert device.resolved_backing_dir() == Path("/dev/shm/vgpud/gpu0")


@pytest.mark.parametrize(
    ("keys", "mode"),
    [
        ({}, 0o600),
        ({"socket_group": "kvm"}, 0o660),
        ({"socket_group": "kvm", "socket_mode": "0600"}, 0o600),
        ({"socket_mode": "0666"}, 0o666),
    ],
)
def test_a_socket_group_alone_makes_the_socket_group_accessible(
    keys: dict[str, str], mode: int
) -> None:
    """docs/operations.md "Permissions": owner-only unless socket_mode says otherwise, and
    with socket_group the default becomes 0660 -- in a config file as with --socket-group
    (a file with only the group used to leave the group's VMM locked out of an 0600 socket)."""
    assert parse({"device": [keys]}).devices[0].socket_mode == mode


def test_cxl_dvsec_is_off_by_default() -> None:
    device = parse({"device": [{}]}).devices[0]
    assert device.cxl_dvsec is False
    assert device.cxl_mem_active_timeout == 3  # the Profile default (64 s), unused here
    assert not profile_for(device).cxl_dvsec


def test_cxl_dvsec_keys_from_a_file(tmp_path: Path) -> None:
    path = tmp_path / "cxl.toml"
    path.write_text(
        "[[device]]\n"
        'name = "gpu0"\n'
        "cxl_dvsec = true\n"  # timeout: the profile's default
        "[[device]]\n"
        'name = "gpu1"\n'
        "cxl_dvsec = true\n"
        "cxl_mem_active_timeout = 0\n"
        "[[device]]\n"
        'name = "gpu2"\n'
        "cxl_dvsec = true\n"
        "cxl_mem_active_timeout = 7\n"
    )
    devices = load_file(path).devices
    assert [(d.cxl_dvsec, d.cxl_mem_active_timeout) for d in devices] == [
        (True, 3),
        (True, 0),
        (True, 7),
    ]
    # ... and they reach the synthetic GPU's profile (spec nvgrace-gpu.md §2.3, §7.3).
    profiles = [profile_for(d) for d in devices]
    assert [(p.cxl_dvsec, p.cxl_mem_active_timeout) for p in profiles] == [
        (True, 3),
        (True, 0),
        (True, 7),
    ]


def test_cxl_dvsec_flags_make_the_same_device() -> None:
    device = single_device(socket_path=None, cxl_dvsec=True, cxl_mem_active_timeout=5)
    assert (device.cxl_dvsec, device.cxl_mem_active_timeout) == (True, 5)
    assert single_device(socket_path=None, cxl_dvsec=True).cxl_mem_active_timeout == 3
    with pytest.raises(ConfigError, match=r"^command line: cxl_mem_active_timeout needs cxl_dvsec"):
        single_device(socket_path=None, cxl_mem_active_timeout=5)
    with pytest.raises(ConfigError, match=f"^command line: {CXL_CODE_MESSAGE}"):
        single_device(socket_path=None, cxl_dvsec=True, cxl_mem_active_timeout=8)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"daemon": {"log_levle": "debug"}, "device": [{}]}, "unknown key"),
        ({"device": [{"socket_mode": "4660"}]}, "socket_mode"),  # setuid bit on a socket
        # From a config audit: each used to start, or to fail only once files existed.
        ({"device": [{"backing_dir": ""}]}, "backing_dir must be a non-empty path"),
        ({"device": [{"socket_path": ""}]}, "socket_path must be a non-empty path"),
        ({"device": [{"backing_dir": "/m\0x"}]}, "backing_dir must be a non-empty path"),
        ({"device": [{"name": "gpu\0"}]}, "file-name-safe"),
        ({"device": [{"socket_path": "/" + "s" * 107}]}, "108 bytes, more than a UNIX socket"),
        # Used to fail at bind, with the memory files made.
        ({"device": [{"name": "g" * 100}]}, "the default socket path .* give a shorter name"),
        ({"device": [{"socket_mode": True}]}, "socket_mode must be an octal string"),
        ({"device": [{"socket_mode": 6.9}]}, "socket_mode must be an octal string"),
        ({"device": [{"socket_group": ""}]}, "socket_group must be a group name or number"),
        ({"device": [{"ready_delay": float("nan")}]}, "ready_delay"),
        (
            {
                "device": [
                    {"name": "a", "socket_path": "/r/a.sock"},
                    {"socket_path": "/r/q/../a.sock"},
                ]
            },
            "two devices use socket /r/q/../a.sock",
        ),
        (
            {"device": [{"name": "a", "backing_dir": "/m"}, {"backing_dir": "/q/../m"}]},
            "two devices share backing_dir /m",
        ),
        ({"device": [{"ready_delay": float("inf")}]}, "ready_delay"),
    ],
)
def test_more_bad_config(raw: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse(raw)


@pytest.mark.parametrize("order", [1, -1])
def test_a_socket_path_that_is_another_devices_default_is_a_duplicate(
    monkeypatch: pytest.MonkeyPatch, order: int
) -> None:
    """gpu0 listens on its default path, $XDG_RUNTIME_DIR/vgpud/gpu0.sock; a gpu1 given that
    path used to pass, and the start failed once the memory files were made ("another
    server is already listening")."""
    monkeypatch.setenv("XDG_RUNTIME_DIR", "/r")
    devices = [{"name": "gpu0"}, {"name": "gpu1", "socket_path": "/r/vgpud/gpu0.sock"}]
    with pytest.raises(ConfigError, match=r"two devices use socket /r/vgpud/gpu0\.sock"):
        parse({"device": devices[::order]})


def test_decimal_units_and_negative_ints() -> None:
    assert parse_size("1kB") == 1000
    assert parse_size("2MB") == 2 * 1000**2
    with pytest.raises(ValueError, match="size"):
        parse_size(-1)
