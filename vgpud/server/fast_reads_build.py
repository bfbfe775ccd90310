"""cffi build script for ``vgpud.server._fast_reads`` (fast_reads.c; setup.py builds it).

Kept out of the package's imports: only the build runs it.
"""

from __future__ import annotations

from pathlib import Path

from cffi import FFI  # type: ignore[import-untyped]

MODULE = "vgpud.server._fast_reads"
SOURCE = Path(__file__).with_name("fast_reads.c")

# The declarations both sides share (the context and the call).
HEADER = SOURCE.with_suffix(".h")


def builder() -> FFI:
    """The FFI that compiles fast_reads.c as a CPython extension (cffi's API mode)."""
    ffi = FFI()
    ffi.cdef(HEADER.read_text())
    ffi.set_source(
        MODULE,
        SOURCE.read_text(),
        include_dirs=[str(SOURCE.parent)],
        depends=[str(SOURCE), str(HEADER)],
        extra_compile_args=["-O2", "-std=gnu11"],
    )
    return ffi


ffibuilder = builder()

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
