"""The optional libvfio-user engine under a real QEMU guest (skipped without the library).

libvfio-user is in no package registry; point VGPUD_LIBVFIO_USER at a build of it
(docs/libvfio-user-engine.md) to run this.
"""

from __future__ import annotations

import os
import socket

import pytest

from tests.e2e.expect import NVIDIA
from tests.e2e.harness import Harness
from tests.e2e.plans import bar_facts, describe_script, memory_plan

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.timeout(600),
    pytest.mark.skipif(
        not os.environ.get("VGPUD_LIBVFIO_USER"),
        reason="VGPUD_LIBVFIO_USER is not set: the libvfio-user engine needs a local build",
    ),
]


async def test_guest_uses_gpu_through_libvfio_user(harness: Harness) -> None:
    device = harness.device("gh200", "8448MiB")
    plan = memory_plan(device.expected)
    await harness.start_vgpud(device, extra=["--engine", "libvfio-user"])
    results = await harness.boot(device, plan.script(describe_script()))
    assert int(results.values["vendor"], 16) == NVIDIA
    assert bar_facts(results, 4)["size"] == device.expected.usemem_bar
    assert bar_facts(results, 2)["size"] == device.expected.resmem_bar
    bad = plan.mismatches(results) + plan.host_mismatches(device.files)
    assert not bad, "\n".join(bad)


async def test_guest_on_an_inherited_socket_through_libvfio_user(harness: Harness) -> None:
    """Socket activation with this engine: libvfio-user binds a path of its own, and the
    engine swaps the inherited listening socket in for it (vgpud/libvfio_user/sockets.py).
    QEMU connects to the socket the "service manager" (this test) bound, not to vgpud's."""
    device = harness.device("gh200", "8448MiB")
    plan = memory_plan(device.expected)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(str(device.socket_path))
        listener.listen()
        await harness.start_vgpud(
            device, extra=["--engine", "libvfio-user"], inherited_fd=listener.fileno()
        )
    # Only the daemon holds the listening socket now.
    results = await harness.boot(device, plan.script(describe_script()))
    assert int(results.values["vendor"], 16) == NVIDIA
    bad = plan.mismatches(results) + plan.host_mismatches(device.files)
    assert not bad, "\n".join(bad)
