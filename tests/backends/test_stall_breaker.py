"""A write to an interrupt eventfd that the VMM made block is got out of
(backends/stall_breaker.py)."""

from __future__ import annotations

import os
import threading

from backends.stall_breaker import StallBreaker

FULL = 0xFFFF_FFFF_FFFF_FFFE  # an eventfd counter's maximum: one more write blocks


def test_a_blocked_guarded_write_is_got_out_of() -> None:
    """What a hostile VMM arranges: a blocking eventfd with its counter full. Without the
    breaker the writing thread never returns (the test then fails on its timeout)."""
    breaker = StallBreaker(period=0.01)
    breaker.start()
    efd = os.eventfd(0, os.EFD_CLOEXEC)  # blocking
    os.eventfd_write(efd, FULL)
    returned = threading.Event()

    def write() -> None:
        note = breaker.begin(efd)
        try:
            os.eventfd_write(efd, 1)
        finally:
            breaker.end(note)
        returned.set()

    writer = threading.Thread(target=write)
    writer.start()
    writer.join()
    try:
        assert returned.is_set() and breaker.drained == 1
        # The VMM's interrupts went with the drain; the one just written is pending.
        assert os.eventfd_read(efd) == 1
    finally:
        os.close(efd)


def test_a_write_that_returns_is_left_alone() -> None:
    breaker = StallBreaker(period=0.01)
    breaker.start()
    efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    try:
        for _ in range(3):
            note = breaker.begin(efd)
            os.eventfd_write(efd, 1)
            breaker.end(note)
        assert os.eventfd_read(efd) == 3 and breaker.drained == 0
    finally:
        os.close(efd)


def test_a_write_noted_but_not_asleep_in_write_is_not_drained() -> None:
    """A thread that is merely slow between noting its write and returning (preempted on a
    loaded host; here, waiting on an event) is not drained: that would eat the interrupts of
    a VMM that did nothing wrong."""
    breaker = StallBreaker(period=0.01)
    breaker.start()
    efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    os.eventfd_write(efd, 5)  # the VMM's pending interrupts
    noted, release = threading.Event(), threading.Event()

    def slow_writer() -> None:
        note = breaker.begin(efd)
        noted.set()
        release.wait()
        breaker.end(note)

    writer = threading.Thread(target=slow_writer)
    writer.start()
    try:
        noted.wait()
        looks = breaker.looks
        while breaker.looks < looks + 3:  # the watchdog has seen the note at least twice
            release.wait(0.01)
        assert breaker.drained == 0
        assert os.eventfd_read(efd) == 5
    finally:
        release.set()
        writer.join()
        os.close(efd)
