"""A 4 KiB PCIe configuration space with per-byte write semantics, as hardware has.

Each byte has three attributes:

* ``wmask``: bits software may change (the rest are read-only and keep their value);
* ``w1cmask``: bits cleared by writing 1 (STATUS error bits, DEVSTA, PME status);
* reset value: what :meth:`ConfigSpace.reset` restores.

A write to a byte whose masks are 0 is silently ignored: QEMU forwards every guest config
write, including ones to registers a device does not implement (the Linux HDA quirk at
0x488), and a failure there only produces errors in QEMU's log (spec vfio-user.md §5.3,
§11). BAR sizing falls out of the masks too: the low bits of a BAR are read-only, so an
all-ones write reads back the size mask with the type bits (spec vfio-user.md R12).
"""

from __future__ import annotations

import errno
import struct

from backends.device import DeviceError

CONFIG_SPACE_SIZE = 4096
PCI_CONFIG_HEADER_SIZE = 256

# Type 0 header offsets (include/uapi/linux/pci_regs.h).
PCI_VENDOR_ID = 0x00
PCI_DEVICE_ID = 0x02
PCI_COMMAND = 0x04
PCI_STATUS = 0x06
PCI_REVISION_ID = 0x08
PCI_CLASS_PROG = 0x09
PCI_CACHE_LINE_SIZE = 0x0C
PCI_LATENCY_TIMER = 0x0D
PCI_HEADER_TYPE = 0x0E
PCI_BASE_ADDRESS_0 = 0x10
PCI_SUBSYSTEM_VENDOR_ID = 0x2C
PCI_SUBSYSTEM_ID = 0x2E
PCI_ROM_ADDRESS = 0x30
PCI_CAPABILITY_LIST = 0x34
PCI_INTERRUPT_LINE = 0x3C
PCI_INTERRUPT_PIN = 0x3D

PCI_COMMAND_IO = 1 << 0
PCI_COMMAND_MEMORY = 1 << 1
PCI_COMMAND_MASTER = 1 << 2
PCI_COMMAND_PARITY = 1 << 6
PCI_COMMAND_SERR = 1 << 8
PCI_COMMAND_INTX_DISABLE = 1 << 10

PCI_STATUS_INTERRUPT = 1 << 3
PCI_STATUS_CAP_LIST = 1 << 4
# Error bits a device reports and software clears by writing 1.
PCI_STATUS_RW1C = 0xF900

PCI_BASE_ADDRESS_SPACE_IO = 0x1
PCI_BASE_ADDRESS_MEM_TYPE_64 = 0x4
PCI_BASE_ADDRESS_MEM_PREFETCH = 0x8


class ConfigSpace:
    """Config-space bytes plus their write masks; no knowledge of capabilities."""

    __slots__ = ("_reset", "data", "w1cmask", "wmask")

    def __init__(self) -> None:
        self.data = bytearray(CONFIG_SPACE_SIZE)
        self.wmask = bytearray(CONFIG_SPACE_SIZE)
        self.w1cmask = bytearray(CONFIG_SPACE_SIZE)
        self._reset = bytes(CONFIG_SPACE_SIZE)

    # -- building ------------------------------------------------------------------------

    def set(self, offset: int, size: int, value: int, wmask: int = 0, w1cmask: int = 0) -> None:
        """Define a ``size``-byte little-endian register at ``offset``."""
        end = offset + size
        if offset < 0 or end > CONFIG_SPACE_SIZE:
            raise ValueError(f"register [{offset:#x}, {end:#x}) outside config space")
        self.data[offset:end] = value.to_bytes(size, "little")
        self.wmask[offset:end] = wmask.to_bytes(size, "little")
        self.w1cmask[offset:end] = w1cmask.to_bytes(size, "little")

    def bar(self, index: int, size: int, flags: int) -> None:
        """Define BAR ``index`` (64-bit BARs take ``index`` and ``index+1``).

        ``size`` 0 leaves the register(s) reading 0 and read-only (no BAR).
        """
        offset = PCI_BASE_ADDRESS_0 + 4 * index
        if size == 0:
            self.set(offset, 4, 0)
            return
        if size & (size - 1) or size < 16:
            raise ValueError(f"BAR{index} size {size:#x} is not a power of two >= 16")
        mask = ~(size - 1)
        self.set(offset, 4, flags, wmask=mask & 0xFFFFFFF0)
        if flags & PCI_BASE_ADDRESS_MEM_TYPE_64:
            self.set(offset + 4, 4, 0, wmask=(mask >> 32) & 0xFFFFFFFF)

    def freeze_reset_values(self) -> None:
        """Remember the current bytes as the power-on/reset state."""
        self._reset = bytes(self.data)

    # -- access --------------------------------------------------------------------------

    def check(self, offset: int, count: int) -> None:
        """Raise EINVAL unless ``[offset, offset+count)`` lies inside config space."""
        if offset < 0 or count < 0 or offset + count > CONFIG_SPACE_SIZE:
            raise DeviceError(
                errno.EINVAL, f"config access [{offset:#x}, +{count:#x}) outside 4 KiB"
            )

    def read(self, offset: int, count: int) -> bytes:
        """The bytes as stored (dynamic bits are kept up to date by their owners)."""
        self.check(offset, count)
        return bytes(self.data[offset : offset + count])

    def write(self, offset: int, data: bytes) -> None:
        """Apply ``data`` through the masks; read-only bits and bytes are left alone."""
        self.check(offset, len(data))
        for i, value in enumerate(data):
            at = offset + i
            wmask, w1c = self.wmask[at], self.w1cmask[at]
            if not wmask | w1c:
                continue
            old = self.data[at]
            new = (old & ~wmask) | (value & wmask)
            self.data[at] = new & ~(value & w1c)

    def reset(self) -> None:
        """Back to the reset values (a function-level reset)."""
        self.data[:] = self._reset

    # -- typed helpers for the device model ------------------------------------------------

    def u8(self, offset: int) -> int:
        """The byte at ``offset``."""
        return self.data[offset]

    def u16(self, offset: int) -> int:
        """The little-endian word at ``offset``."""
        value: int = struct.unpack_from("<H", self.data, offset)[0]
        return value

    def u32(self, offset: int) -> int:
        """The little-endian dword at ``offset``."""
        value: int = struct.unpack_from("<I", self.data, offset)[0]
        return value

    def set_bits(self, offset: int, size: int, bits: int, on: bool) -> None:
        """Set or clear device-owned (read-only to software) bits in place."""
        value = int.from_bytes(self.data[offset : offset + size], "little")
        value = value | bits if on else value & ~bits
        self.data[offset : offset + size] = value.to_bytes(size, "little")


def intersects(offset: int, count: int, reg: int, reg_size: int) -> bool:
    """Whether ``[offset, offset+count)`` touches ``[reg, reg+reg_size)``."""
    return offset < reg + reg_size and reg < offset + count
