"""``benchmarks.guest_bandwidth`` still runs end to end: two guests (mmapped and --no-mmap), tiny
sizes. No figure is asserted (performance lives in the benchmark's output); what is asserted is
that every copy and load it reports was checked: the bytes read back were those written, the
host found them in its usemem file, and the loads returned the device's ids and PMC_BOOT_0."""

from __future__ import annotations

import pytest

from benchmarks import guest_bandwidth
from tests.e2e.assets import Assets

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]


def test_guest_bandwidth_benchmark_runs(assets: Assets) -> None:
    settings = guest_bandwidth.Settings(size_kib=64, trapped_size_kib=8, loads=50, rounds=1)
    result = guest_bandwidth.measure(assets, settings)
    rows = {row["path"]: row for row in result["rows"]}
    assert set(rows) == {
        "guest RAM",
        "BAR4 usemem, mmapped (default)",
        "BAR2 resmem, mmapped (default)",
        "BAR4 usemem, trapped (--no-mmap)",
        "BAR2 resmem, trapped (--no-mmap)",
        "config dword, vgpud",
        "BAR0 register, vgpud",
    }
    for row in rows.values():
        assert row["load_p50_us"] > 0
    text = guest_bandwidth.render(result)
    assert all(path in text for path in rows)
