"""Fixtures of the real-QEMU tier.

* ``assets``: the fetched QEMU/kernel/busybox (skips the tier with the fetch command when they
  are absent, unless ``VGPUD_E2E_REQUIRE=1``, which CI sets through ``make e2e``/``make test``
  so that missing assets fail loudly).
* ``harness``: a per-test :class:`Harness` (trio) that stops every process it started.
* Any failing test that used a harness or a scenario run gets every log (vgpud, guest serial,
  QEMU stderr, QEMU argv) appended to its report, so CI output alone explains the failure.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import trio

from tests.e2e.assets import Assets, AssetsMissingError
from tests.e2e.harness import Harness


def _load(arch: str) -> Assets:
    try:
        return Assets.load(arch=arch)
    except AssetsMissingError as exc:
        if os.environ.get("VGPUD_E2E_REQUIRE") == "1":
            pytest.fail(str(exc), pytrace=False)
        pytest.skip(str(exc))


@pytest.fixture(scope="session")
def assets() -> Assets:
    return _load("x86_64")


@pytest.fixture(scope="session")
def assets_aarch64() -> Assets:
    return _load("aarch64")


@pytest.fixture
async def harness(assets: Assets, nursery: trio.Nursery) -> AsyncIterator[Harness]:
    h = Harness(assets, nursery)
    try:
        yield h
    finally:
        await h.aclose()
        h.cleanup()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome: Any = yield
    report = outcome.get_result()
    if not report.failed:
        return
    funcargs = getattr(item, "funcargs", {})
    for raw in funcargs.values():
        value = getattr(raw, "fixture_value", raw)  # pytest-trio wraps async fixtures
        logs = getattr(value, "e2e_logs", None)
        if not callable(logs):
            continue
        # A module-scoped scenario fails every test that uses it: show its logs once.
        if getattr(value, "_e2e_logs_shown", False):
            report.sections.append(("e2e logs", "see the first failing test of this scenario"))
            continue
        for name, text in logs():
            report.sections.append((f"e2e {name}", text))
        if not isinstance(value, Harness):
            value._e2e_logs_shown = True
