"""Whatever the guest does to its device, the device answers or refuses it.

Any sequence of config-space, BAR and reset operations, at any offset and size, on the
device the daemon serves (the nvgrace variant over the synthetic GPU, CXL DVSEC included):
each one succeeds or raises ``DeviceError`` -- the error reply the engines send -- and
never another exception, which would be a bug in vgpud. Reads return exactly the bytes
asked for, and afterwards the device still works: its IDs read back and its memory keeps a
value written through BAR4 (DESIGN.md "Errors and bad input").
"""

from __future__ import annotations

import errno
import struct
import tempfile
from pathlib import Path
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from backends.device import DeviceError
from vgpud.config import single_device
from vgpud.devices import build_device

CONFIG, BAR0, BAR2, BAR4 = 7, 0, 2, 4
GIB = 1 << 30
# 2 GiB gh200: usemem 1 GiB in a 1 GiB BAR4, resmem 1 GiB in BAR2; BAR0 is 16 MiB.
SIZES = {BAR0: 16 << 20, BAR2: GIB, BAR4: GIB, CONFIG: 4096}
INTERESTING = {  # offsets where the models change behaviour
    CONFIG: [0x04, 0x10, 0x18, 0x20, 0x24, 0x30, 0x3C, 0x40, 0xA0, 0x100, 0x120, 0x13C, 0xFFC],
    BAR0: [0x0, 0x88000, 0x1498, 0x200BC, 0xFF0000, 0xFFFFFC],
    BAR2: [0, GIB - 4],
    BAR4: [0, GIB - 4],
}

regions = st.sampled_from([CONFIG, BAR0, BAR2, BAR4, 1, 3, 5, 6, 8, 9])


@st.composite
def accesses(draw: Any) -> tuple[Any, ...]:
    region = draw(regions)
    size = SIZES.get(region, 0)
    offset = draw(
        st.one_of(
            st.sampled_from(INTERESTING.get(region, [0])),
            st.integers(0, max(size - 1, 0)),
            st.integers(-8, size + 8),
            st.just((1 << 64) - 2),
        )
    )
    count = draw(st.one_of(st.sampled_from([0, 1, 2, 4, 8]), st.integers(0, 4096)))
    if draw(st.booleans()):
        return ("read", region, offset, count)
    return ("write", region, offset, draw(st.binary(min_size=count, max_size=count)))


operations = st.lists(
    st.one_of(accesses(), st.just(("reset",)), st.just(("reopen",))), min_size=1, max_size=40
)


@settings(max_examples=1000, deadline=None)
@given(operations)
def test_any_guest_access_sequence_is_answered_or_refused(ops: list[tuple[Any, ...]]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        built = build_device(
            single_device(
                socket_path=None, memory_size="2GiB", backing_dir=Path(tmp), cxl_dvsec=True
            )
        )
        device = built.device
        try:
            device.open()
            for op in ops:
                try:
                    if op[0] == "read":
                        _, region, offset, count = op
                        assert len(device.region_read(region, offset, count)) == count
                    elif op[0] == "write":
                        _, region, offset, data = op
                        device.region_write(region, offset, data)
                    elif op[0] == "reset":
                        device.reset()
                    else:
                        device.close()
                        device.open()
                except DeviceError as exc:
                    assert exc.errno > 0
            still_works(device)
        finally:
            device.close()
            built.release()


def still_works(device: Any) -> None:
    assert struct.unpack("<HH", device.region_read(CONFIG, 0, 4)) == (0x10DE, 0x2342)
    device.reset()  # registers and interrupt state; the function back in D0 if left in D3hot
    device.region_write(CONFIG, 0x04, b"\x06\x00")  # memory decoding, as a guest driver does
    try:
        device.region_write(BAR4, 0x100, b"alive!")
        assert device.region_read(BAR4, 0x100, 6) == b"alive!"
    except DeviceError as exc:
        # The post-reset readiness gate (spec nvgrace-gpu.md §7.4) may still be closed.
        assert exc.errno == errno.EAGAIN
