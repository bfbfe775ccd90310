"""Profiles: PCI identity and memory of each product, overrides."""

from __future__ import annotations

import pytest

from backends.backend import Backend
from backends.device import VfioDevice
from backends.synthetic import PROFILES, Architecture, SyntheticGpu, get_profile
from backends.synthetic.profiles import GIB


@pytest.mark.parametrize(
    ("name", "device_id", "arch", "memory", "bug"),
    [
        ("gh200", 0x2342, Architecture.HOPPER, 96 * GIB, True),
        ("gh200-480g", 0x2345, Architecture.HOPPER, 144 * GIB, True),
        ("gh200-sku", 0x2348, Architecture.HOPPER, 144 * GIB, True),
        ("gb200", 0x2941, Architecture.BLACKWELL, 186 * GIB, False),
        ("gb300", 0x31C2, Architecture.BLACKWELL, 279 * GIB, False),
    ],
)
def test_profiles(name: str, device_id: int, arch: Architecture, memory: int, bug: bool) -> None:
    profile = get_profile(name)
    assert (profile.device_id, profile.architecture, profile.memory_size) == (
        device_id,
        arch,
        memory,
    )
    assert profile.has_mig_hw_bug is bug


def test_subsystem_ids_distinct() -> None:
    assert len({p.subsystem_id for p in PROFILES.values()}) == len(PROFILES)


def test_unknown_profile() -> None:
    with pytest.raises(ValueError, match="gb200"):
        get_profile("h100")


def test_overrides() -> None:
    p = get_profile("gh200").with_overrides(memory_size=8 * GIB, dvsec_bitmap=None)
    assert p.memory_size == 8 * GIB and p.has_mig_hw_bug
    assert get_profile("gh200").memory_size == 96 * GIB  # frozen original
    with pytest.raises(ValueError, match="unknown"):
        get_profile("gh200").with_overrides(colour="green")
    with pytest.raises(ValueError, match="bar1_size"):
        get_profile("gh200").with_overrides(bar1_size=3 << 20)
    with pytest.raises(ValueError, match="device_id"):
        get_profile("gh200").with_overrides(device_id=0x10000)


def test_synthetic_gpu_is_a_backend(gpu: SyntheticGpu) -> None:
    assert isinstance(gpu, Backend)
    assert isinstance(gpu, VfioDevice)
