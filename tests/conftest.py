"""Fixtures shared by every test directory."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from socket import socket

import pytest

from tests.serve_process import notify_socket_at


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[socket]:
    """Where a ``vgpud serve`` started by :func:`tests.serve_process.start` says READY=1."""
    yield from notify_socket_at(tmp_path)
