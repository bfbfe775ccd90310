"""The parts of ``linux/vfio.h`` the passthrough backend uses: ioctl numbers and structs.

Pure codecs (bytes in, values out), so they are tested without a kernel. Every VFIO ioctl is
``_IO(VFIO_TYPE, VFIO_BASE + n)`` -- no size or direction bits -- and every struct starts with
``argsz`` (the caller's buffer size, which the kernel checks against its ``minsz``) and
``flags``. All fields are native-endian; VFIO exists on little-endian hosts only here
(x86_64, arm64), so the formats say ``<``.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

VFIO_TYPE = ord(";")
VFIO_BASE = 100


def _io(nr: int) -> int:
    return (VFIO_TYPE << 8) | (VFIO_BASE + nr)


VFIO_GET_API_VERSION = _io(0)
VFIO_CHECK_EXTENSION = _io(1)
VFIO_SET_IOMMU = _io(2)
VFIO_GROUP_GET_STATUS = _io(3)
VFIO_GROUP_SET_CONTAINER = _io(4)
VFIO_GROUP_UNSET_CONTAINER = _io(5)
VFIO_GROUP_GET_DEVICE_FD = _io(6)
VFIO_DEVICE_GET_INFO = _io(7)
VFIO_DEVICE_GET_REGION_INFO = _io(8)
VFIO_DEVICE_GET_IRQ_INFO = _io(9)
VFIO_DEVICE_SET_IRQS = _io(10)
VFIO_DEVICE_RESET = _io(11)
VFIO_IOMMU_GET_INFO = _io(12)
VFIO_IOMMU_MAP_DMA = _io(13)
VFIO_IOMMU_UNMAP_DMA = _io(14)

VFIO_API_VERSION = 0
# VFIO_CHECK_EXTENSION / VFIO_SET_IOMMU arguments.
VFIO_TYPE1_IOMMU = 1
VFIO_TYPE1v2_IOMMU = 3

VFIO_GROUP_FLAGS_VIABLE = 1 << 0
VFIO_GROUP_FLAGS_CONTAINER_SET = 1 << 1

VFIO_DEVICE_FLAGS_RESET = 1 << 0
VFIO_DEVICE_FLAGS_PCI = 1 << 1

VFIO_REGION_INFO_FLAG_READ = 1 << 0
VFIO_REGION_INFO_FLAG_WRITE = 1 << 1
VFIO_REGION_INFO_FLAG_MMAP = 1 << 2
VFIO_REGION_INFO_FLAG_CAPS = 1 << 3
VFIO_REGION_INFO_CAP_SPARSE_MMAP = 1
VFIO_REGION_INFO_CAP_TYPE = 2
VFIO_REGION_INFO_CAP_MSIX_MAPPABLE = 3

VFIO_IRQ_SET_DATA_NONE = 1 << 0
VFIO_IRQ_SET_DATA_BOOL = 1 << 1
VFIO_IRQ_SET_DATA_EVENTFD = 1 << 2
VFIO_IRQ_SET_ACTION_MASK = 1 << 3
VFIO_IRQ_SET_ACTION_UNMASK = 1 << 4
VFIO_IRQ_SET_ACTION_TRIGGER = 1 << 5

VFIO_DMA_MAP_FLAG_READ = 1 << 0
VFIO_DMA_MAP_FLAG_WRITE = 1 << 1
# A live update's pair (include/uapi/linux/vfio.h): UNMAP with FLAG_VADDR invalidates the
# process addresses of a mapping while the IOMMU keeps translating it (DMA goes on), and MAP
# with FLAG_VADDR gives it the new process's address of the same memory, which also moves the
# pinned pages' locked_vm charge to the new address space (Linux 6.2+). Only where
# VFIO_CHECK_EXTENSION(VFIO_UPDATE_VADDR) says so (not iommufd's compat container).
VFIO_DMA_MAP_FLAG_VADDR = 1 << 2
VFIO_DMA_UNMAP_FLAG_VADDR = 1 << 2
VFIO_UPDATE_VADDR = 10

GROUP_STATUS = struct.Struct("<II")  # argsz, flags
DEVICE_INFO = struct.Struct("<IIII")  # argsz, flags, num_regions, num_irqs (minsz)
REGION_INFO = struct.Struct("<IIIIQQ")  # argsz, flags, index, cap_offset, size, offset
IRQ_INFO = struct.Struct("<IIII")  # argsz, flags, index, count
IRQ_SET = struct.Struct("<IIIII")  # argsz, flags, index, start, count; then data[]
DMA_MAP = struct.Struct("<IIQQQ")  # argsz, flags, vaddr, iova, size
DMA_UNMAP = struct.Struct("<IIQQ")  # argsz, flags, iova, size (size is written back)
CAP_HEADER = struct.Struct("<HHI")  # id, version, next (offset from the struct's start)
SPARSE_MMAP_HEAD = struct.Struct("<II")  # nr_areas, reserved
SPARSE_AREA = struct.Struct("<QQ")  # offset, size
CAP_TYPE = struct.Struct("<II")  # type, subtype


class UapiError(ValueError):
    """The kernel returned a struct that does not parse (a bug or a newer, stranger kernel)."""


@dataclass(frozen=True, slots=True)
class RawRegionInfo:
    """``struct vfio_region_info`` and the capabilities we understand from its chain."""

    index: int
    flags: int
    size: int
    offset: int  # where the region lives in the device fd (pread/pwrite/mmap offset)
    sparse_areas: tuple[tuple[int, int], ...] | None = None  # (offset, size) pairs
    type_cap: tuple[int, int] | None = None
    msix_mappable: bool = False


def region_info_request(index: int, argsz: int = REGION_INFO.size) -> bytearray:
    """A ``VFIO_DEVICE_GET_REGION_INFO`` buffer of ``argsz`` bytes (room for caps after)."""
    buf = bytearray(max(argsz, REGION_INFO.size))
    REGION_INFO.pack_into(buf, 0, len(buf), 0, index, 0, 0, 0)
    return buf


def region_info_needs(buf: bytes | bytearray) -> int:
    """The ``argsz`` the kernel asked for (larger than ours when caps did not fit)."""
    argsz: int = REGION_INFO.unpack_from(buf, 0)[0]
    return argsz


def parse_region_info(buf: bytes | bytearray) -> RawRegionInfo:
    """Decode a filled ``vfio_region_info`` and walk its capability chain."""
    if len(buf) < REGION_INFO.size:
        raise UapiError(f"region info of {len(buf)} bytes, less than the struct")
    _, flags, index, cap_offset, size, offset = REGION_INFO.unpack_from(buf, 0)
    sparse: tuple[tuple[int, int], ...] | None = None
    type_cap: tuple[int, int] | None = None
    msix_mappable = False
    if flags & VFIO_REGION_INFO_FLAG_CAPS and cap_offset:
        seen: set[int] = set()
        at = cap_offset
        while at:
            # The chain is the kernel's, but a loop or an out-of-range pointer must not hang
            # or crash the daemon.
            if at in seen or at < REGION_INFO.size or at + CAP_HEADER.size > len(buf):
                raise UapiError(f"region {index}: bad capability pointer {at:#x}")
            seen.add(at)
            cap_id, _version, following = CAP_HEADER.unpack_from(buf, at)
            body = at + CAP_HEADER.size
            if cap_id == VFIO_REGION_INFO_CAP_SPARSE_MMAP:
                sparse = _sparse_areas(buf, body, index)
            elif cap_id == VFIO_REGION_INFO_CAP_TYPE:
                if body + CAP_TYPE.size > len(buf):
                    raise UapiError(f"region {index}: truncated type capability")
                type_cap = CAP_TYPE.unpack_from(buf, body)
            elif cap_id == VFIO_REGION_INFO_CAP_MSIX_MAPPABLE:
                msix_mappable = True
            at = following
    return RawRegionInfo(index, flags, size, offset, sparse, type_cap, msix_mappable)


def _sparse_areas(buf: bytes | bytearray, at: int, index: int) -> tuple[tuple[int, int], ...]:
    if at + SPARSE_MMAP_HEAD.size > len(buf):
        raise UapiError(f"region {index}: truncated sparse-mmap capability")
    nr_areas, _ = SPARSE_MMAP_HEAD.unpack_from(buf, at)
    first = at + SPARSE_MMAP_HEAD.size
    if first + nr_areas * SPARSE_AREA.size > len(buf):
        raise UapiError(f"region {index}: sparse-mmap capability lists {nr_areas} areas")
    return tuple(
        SPARSE_AREA.unpack_from(buf, first + i * SPARSE_AREA.size) for i in range(nr_areas)
    )


def irq_set(
    index: int,
    flags: int,
    start: int,
    count: int,
    *,
    eventfds: Sequence[int] = (),
    data_bool: Sequence[bool] = (),
) -> bytearray:
    """A ``VFIO_DEVICE_SET_IRQS`` buffer: the header, then ``s32`` fds or ``u8`` bools."""
    if flags & VFIO_IRQ_SET_DATA_EVENTFD:
        data = struct.pack(f"<{len(eventfds)}i", *eventfds)
    elif flags & VFIO_IRQ_SET_DATA_BOOL:
        data = bytes(1 if b else 0 for b in data_bool)
    else:
        data = b""
    buf = bytearray(IRQ_SET.size + len(data))
    IRQ_SET.pack_into(buf, 0, len(buf), flags, index, start, count)
    buf[IRQ_SET.size :] = data
    return buf
