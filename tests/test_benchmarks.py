"""The benchmarks still run (tiny iteration counts; no numbers are asserted: performance
targets live in the benchmarks' output, not in timed tests)."""

from __future__ import annotations

import os

import pytest

from benchmarks import codec, roundtrip


def test_codec_benchmark_runs() -> None:
    results = codec.run(iterations=200, repeats=1)
    assert set(results) == set(codec.CASES)
    for stages in results.values():
        assert set(stages) == {"total_us", "frame_us", "handle_us", "general_us"}


def test_roundtrip_benchmark_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VGPUD_LIBVFIO_USER", raising=False)  # the pure-Python rows only
    cpu = min(os.sched_getaffinity(0))
    before = os.sched_getaffinity(0)
    try:
        results = roundtrip.run(iterations=200, cpu=cpu, libvfio_user_server=None)
    finally:
        os.sched_setaffinity(0, before)  # run() pins the calling process
    assert {"floor (python echo)", "vgpud config read", "vgpud BAR0 read"} <= set(results)
    for row in results.values():
        assert row["p50_us"] > 0 and row["msgs_per_s"] > 0
