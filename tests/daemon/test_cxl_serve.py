"""The CXL Device DVSEC from the daemon's side: config -> device, ``serve``, ``probe``.

Spec nvgrace-gpu.md §2.3 (the DVSEC picks the readiness path), §7.3 (MEM_INFO_VALID,
MEM_ACTIVE and the Memory_Active_Timeout budget), §7.4 (after a reset).
"""

from __future__ import annotations

import json
import math
import socket
import subprocess
from pathlib import Path

import pytest

from backends.device import CONFIG_REGION_INDEX
from backends.synthetic import SyntheticGpu, get_profile
from backends.synthetic.capabilities import CXL_DVSEC_OFFSET
from backends.synthetic.profiles import GIB
from tests.serve_process import VGPUD, serve_args, start, stop
from vgpud.config import single_device
from vgpud.devices import build_device
from vgpud.probe import ProbeResult, decode_config, render
from vgpud.variant import find_cxl_dvsec

CXL_LINE = "Designated Vendor-Specific (DVSEC) vendor 0x1e98 id 0 [CXL Device]"


def cxl_entries(config: dict[str, object]) -> list[dict[str, object]]:
    caps = config["extended_capabilities"]
    assert isinstance(caps, list)
    return [c for c in caps if c.get("dvsec_vendor") == 0x1E98 and c.get("dvsec_id") == 0]


# -- config -> device ----------------------------------------------------------------------


@pytest.mark.parametrize(("code", "seconds"), [(0, 1), (3, 64), (4, 256), (7, 256)])
def test_build_device_gives_the_gpu_the_dvsec(tmp_path: Path, code: int, seconds: int) -> None:
    config = single_device(
        socket_path=None,
        memory_size="4GiB",
        backing_dir=tmp_path,
        cxl_dvsec=True,
        cxl_mem_active_timeout=code,
    )
    built = build_device(config)
    try:
        # What the variant's probe (and so the daemon's wait_ready) finds: the CXL path.
        assert find_cxl_dvsec(built.backend) == CXL_DVSEC_OFFSET
        status = int.from_bytes(
            built.device.region_read(CONFIG_REGION_INDEX, CXL_DVSEC_OFFSET + 0x1C, 4), "little"
        )
        assert status >> 13 & 7 == code
        (entry,) = cxl_entries(
            decode_config(built.device.region_read(CONFIG_REGION_INDEX, 0, 4096))
        )
        assert entry["cxl"] == {
            "range1_size_low": status,
            "mem_info_valid": True,  # ready_delay 0
            "mem_active": True,
            "mem_active_timeout": code,
            "mem_active_timeout_seconds": seconds,
        }
        assert built.summary()["cxl_mem_active_timeout"] == code
    finally:
        built.release()


def test_build_device_without_the_key_has_no_dvsec(tmp_path: Path) -> None:
    built = build_device(single_device(socket_path=None, memory_size="4GiB", backing_dir=tmp_path))
    try:
        assert find_cxl_dvsec(built.backend) is None
        assert "cxl_mem_active_timeout" not in built.summary()
        config = decode_config(built.device.region_read(CONFIG_REGION_INDEX, 0, 4096))
        assert cxl_entries(config) == []
        assert "CXL" not in render_ext_caps(config)
    finally:
        built.release()


# -- probe's decoding, on a device whose clock does not move -------------------------------


def render_ext_caps(config: dict[str, object]) -> str:
    return render(ProbeResult(capabilities={}, device_flags=0, config=config))


@pytest.mark.parametrize(
    ("valid_delay", "bits"),
    [
        (math.inf, "MEM_INFO_VALID- MEM_ACTIVE-"),
        (0.0, "MEM_INFO_VALID+ MEM_ACTIVE-"),
    ],
)
def test_probe_decodes_the_status_bits(tmp_path: Path, valid_delay: float, bits: str) -> None:
    profile = get_profile("gb200").with_overrides(
        memory_size=4 * GIB, cxl_dvsec=True, cxl_mem_active_timeout=5
    )
    gpu = SyntheticGpu(
        profile, tmp_path, ready_delay=math.inf, valid_delay=valid_delay, clock=lambda: 0.0
    )
    try:
        config = decode_config(gpu.region_read(CONFIG_REGION_INDEX, 0, 4096))
    finally:
        gpu.shutdown()
    (entry,) = cxl_entries(config)
    assert entry["dvsec_name"] == "CXL Device"
    cxl = entry["cxl"]
    assert isinstance(cxl, dict)
    assert cxl["mem_info_valid"] is (valid_delay == 0.0)
    assert cxl["mem_active"] is False
    # Code 5 is clamped to 4: 1 s * 4^4 (§7.3).
    assert (cxl["mem_active_timeout"], cxl["mem_active_timeout_seconds"]) == (5, 256)
    text = render_ext_caps(config)
    assert f"[120] {CXL_LINE} (Range 1 Size Low" in text
    assert f"{bits} Memory_Active_Timeout 5 = 256 s)" in text
    # The NVIDIA DVSEC is still decoded beside it (gb200: no MIG hardware bug).
    assert "vendor 0x10de id 3 [NVIDIA GPU capabilities] (MIG hardware bug: no)" in text


# -- the daemon as a user runs it -----------------------------------------------------------


def test_serve_cxl_dvsec_waits_then_probe_shows_it_ready(
    tmp_path: Path, notify_socket: socket.socket
) -> None:
    sock = tmp_path / "gpu0.sock"
    args = serve_args(
        tmp_path,
        *("--memory-size", "4GiB", "--cxl-dvsec", "--cxl-mem-active-timeout", "4"),
        *("--ready-delay", "2.5"),
    )
    proc = start(args, tmp_path)
    try:
        # READY=1 only once the CXL wait saw MEM_INFO_VALID and MEM_ACTIVE (§7.3, §2.4).
        assert notify_socket.recv(64) == b"READY=1"
        probe = subprocess.run(
            [*VGPUD, "probe", str(sock), "--json"],
            capture_output=True,
            text=True,
            check=False,
            timeout=60,
        )
        assert probe.returncode == 0, probe.stderr
        (entry,) = cxl_entries(json.loads(probe.stdout)["config"])
        cxl = entry["cxl"]
        assert isinstance(cxl, dict)
        assert cxl["mem_info_valid"] is True
        assert cxl["mem_active"] is True
        assert (cxl["mem_active_timeout"], cxl["mem_active_timeout_seconds"]) == (4, 256)
        text = subprocess.run(
            [*VGPUD, "probe", str(sock)], capture_output=True, text=True, check=True, timeout=60
        ).stdout
        assert CXL_LINE in text
        assert "MEM_INFO_VALID+ MEM_ACTIVE+ Memory_Active_Timeout 4 = 256 s" in text
    finally:
        stderr = stop(proc, check=False)
    assert proc.returncode == 0, stderr
    events = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    by_name = {e["event"]: e for e in events}
    # The device was not ready at the first poll: the daemon really waited. (Start-up takes
    # about 0.25 s here; a first poll later than 2.5 s after the device was built would fail.)
    assert "waiting for the device to become ready" in by_name
    assert by_name["device ready"]["polls"] >= 2
    assert by_name["serving"]["cxl_mem_active_timeout"] == 4


def test_serve_fails_when_memory_never_becomes_active_in_the_cxl_budget(tmp_path: Path) -> None:
    """Code 0 allows 1 s after MEM_INFO_VALID: a GPU training for an hour fails in ~2 s.

    The BAR0 path would wait 30 s and blame the BAR0 registers; the message shows the daemon
    took the CXL path the config asked for (spec nvgrace-gpu.md §2.3, §7.3).
    """
    sock = tmp_path / "gpu0.sock"
    config = tmp_path / "vgpud.toml"
    config.write_text(
        "[[device]]\n"
        f'socket_path = "{sock}"\n'
        f'backing_dir = "{tmp_path / "mem"}"\n'
        'memory_size = "4GiB"\n'
        "ready_delay = 3600.0\n"
        "cxl_dvsec = true\n"
        "cxl_mem_active_timeout = 0\n"
    )
    result = subprocess.run(
        [*VGPUD, "serve", "--config", str(config)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == 1, result.stderr
    assert "CXL DVSEC: memory never became active; ETIME" in result.stderr
    assert "readiness registers" not in result.stderr
    assert "Traceback" not in result.stderr
    assert not sock.exists(), "a device that never became ready must not be served"
