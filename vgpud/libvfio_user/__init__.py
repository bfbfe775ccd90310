"""The optional libvfio-user engine (``--engine libvfio-user``, DESIGN.md "Engines" #2).

nutanix's C vfio-user server library, loaded with cffi in ABI mode from a system install
(``libvfio-user.so.0``, or ``$VGPUD_LIBVFIO_USER`` / an explicit path), serving the same
``VfioDevice`` as the Python engine. See ``docs/libvfio-user-engine.md``.
"""

from vgpud.libvfio_user.engine import LibvfioUserServer, serve_device
from vgpud.libvfio_user.ffi import ENV_LIBRARY, EngineUnavailable, Library, load_library

__all__ = [
    "ENV_LIBRARY",
    "EngineUnavailable",
    "Library",
    "LibvfioUserServer",
    "load_library",
    "serve_device",
]
