"""Small helpers shared by the backend and variant tests."""

from __future__ import annotations

import os
import struct

from backends.device import CONFIG_REGION_INDEX, VfioDevice


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def open_fds() -> set[int]:
    """The fds this process has open right now."""
    return {int(name) for name in os.listdir("/proc/self/fd")}


def new_eventfd() -> tuple[int, int]:
    """(fd to hand to the device, a dup the test keeps to observe the same eventfd)."""
    fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    return fd, os.dup(fd)


def eventfd_count(observer: int) -> int:
    """Read and reset the eventfd counter (0 when nothing was signalled)."""
    try:
        return os.eventfd_read(observer)
    except BlockingIOError:
        return 0


def cfg_read(dev: VfioDevice, offset: int, size: int) -> int:
    return int.from_bytes(dev.region_read(CONFIG_REGION_INDEX, offset, size), "little")


def cfg_write(dev: VfioDevice, offset: int, size: int, value: int) -> None:
    dev.region_write(CONFIG_REGION_INDEX, offset, value.to_bytes(size, "little"))


def u32(data: bytes) -> int:
    value: int = struct.unpack("<I", data)[0]
    return value
