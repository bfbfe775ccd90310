"""The engines an e2e test can run vgpud with: ``vgpud serve`` flags, one pytest param each.

The libvfio-user engine needs a local build of the library (docs/libvfio-user-engine.md);
without ``VGPUD_LIBVFIO_USER`` its params skip with that reason.
"""

from __future__ import annotations

import os

import pytest

ENGINES = [
    pytest.param([], id="python"),
    pytest.param(
        ["--engine", "libvfio-user"],
        id="libvfio-user",
        marks=pytest.mark.skipif(
            not os.environ.get("VGPUD_LIBVFIO_USER"),
            reason="VGPUD_LIBVFIO_USER is not set: the libvfio-user engine needs a local build",
        ),
    ),
]
