from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from backends.synthetic import SyntheticGpu, get_profile
from backends.synthetic.profiles import GIB
from tests.backends.helpers import FakeClock


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def gpu(tmp_path: Path, clock: FakeClock) -> Iterator[SyntheticGpu]:
    device = SyntheticGpu(
        get_profile("gh200").with_overrides(memory_size=4 * GIB), tmp_path / "mem", clock=clock
    )
    yield device
    device.shutdown()
