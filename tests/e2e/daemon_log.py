"""Reading a running vgpud's JSON log in the e2e tier, and probing it as a new client."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import trio

from tests.e2e.qemu import VGPUD, Vgpud


def parsed(line: str) -> dict[str, Any] | None:
    """One log line as its JSON object, or None for a line that is not one."""
    try:
        value = json.loads(line)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def events_since(daemon: Vgpud, start: int = 0) -> list[dict[str, Any]]:
    """vgpud's JSON log lines from line ``start`` on, parsed."""
    return [e for e in map(parsed, daemon.log.lines[start:]) if e is not None]


async def wait_event(
    daemon: Vgpud,
    names: str | tuple[str, ...],
    start: int,
    *,
    device: str | None = None,
    within: float = 60,
) -> tuple[int, dict[str, Any]]:
    """The first JSON log line from line ``start`` on whose event is (one of) ``names`` and,
    if given, whose device is ``device``: its index and the line, parsed. E2EError if the
    daemon's output ends first."""
    wanted = (names,) if isinstance(names, str) else names

    def check(line: str) -> bool:
        event = parsed(line)
        return (
            event is not None
            and event.get("event") in wanted
            and (device is None or event.get("device") == device)
        )

    with trio.fail_after(within):
        index, line = await daemon.log.wait_for(
            check, start=start, what=f"{' or '.join(wanted)} {device or ''}"
        )
    event: dict[str, Any] = json.loads(line)
    return index, event


async def probe(socket_path: Path) -> tuple[int, str]:
    """``vgpud probe SOCKET``: its exit status and stderr (a new client of that device)."""
    with trio.fail_after(60):
        done = await trio.run_process(
            [VGPUD, "probe", str(socket_path)],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    return done.returncode, done.stderr.decode()
