"""cffi build script for ``vgpud.server._fast_reads`` (fast_reads.c; setup.py builds it).

Kept out of the package's imports: only the build runs it.
"""

from __future__ import annotations

from pathlib import Path

from cffi import FFI  # type: ignore[import-untyped]

MODULE = "vgpud.server._fast_reads"
SOURCE = Path(__file__).with_name("fast_reads.c")

# What Python sees of fast_reads.c: the context's fields it sets and reads, and the call.
CDEF = """
struct vgpud_fast_reads {
    int sock;
    int loop_fd;
    const uint8_t *config;
    uint32_t config_size;
    uint32_t max_data;
    uint32_t max_size;
    uint32_t holes;
    uint32_t hole_start[8];
    uint32_t hole_end[8];
    int why;
    uint32_t unsent_len;
    uint8_t unsent[4128];
    uint64_t waits;
    uint64_t woken_by_loop;
    uint64_t timed_out;
};
int vgpud_serve_config_reads(struct vgpud_fast_reads *ctx, int budget, int wait_ms);
"""


def builder() -> FFI:
    """The FFI that compiles fast_reads.c as a CPython extension (cffi's API mode)."""
    ffi = FFI()
    ffi.cdef(CDEF)
    ffi.set_source(MODULE, SOURCE.read_text(), extra_compile_args=["-O2", "-std=gnu11"])
    return ffi


ffibuilder = builder()

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
