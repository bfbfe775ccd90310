from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from backends.synthetic import SyntheticGpu, get_profile
from backends.synthetic.profiles import GIB, MIB
from tests.backends.helpers import FakeClock, cfg_write
from vgpud.variant import NvgraceVariant

# 95.75 GiB: usemem 94.5 GiB in a 128 GiB BAR, resmem 1.25 GiB in a 2 GiB BAR (spec §3.2).
HOPPER_SIZE = 95 * GIB + 768 * MIB

MakeVariant = Callable[..., NvgraceVariant]


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def make_variant(tmp_path: Path, clock: FakeClock) -> Iterator[MakeVariant]:
    made: list[NvgraceVariant] = []

    def make(
        profile: str = "gh200", memory_size: int = HOPPER_SIZE, ready_delay: float = 0.0
    ) -> NvgraceVariant:
        gpu = SyntheticGpu(
            get_profile(profile).with_overrides(memory_size=memory_size),
            tmp_path / profile,
            clock=clock,
            ready_delay=ready_delay,
        )
        variant = NvgraceVariant(gpu, clock=clock)
        variant.open()
        cfg_write(variant, 0x04, 2, 0x0002)  # COMMAND.MEM, as a guest driver would
        made.append(variant)
        return variant

    yield make
    for variant in made:
        variant.shutdown()


@pytest.fixture
def hopper(make_variant: MakeVariant) -> NvgraceVariant:
    return make_variant()


@pytest.fixture
def blackwell(make_variant: MakeVariant) -> NvgraceVariant:
    return make_variant("gb200", 186 * GIB)
