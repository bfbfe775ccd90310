"""Runs inside a VFIO guest (``GuestScript.host_python``), not on the host: opens the device
that ``vg_vfio_bind`` gave to vfio-pci the way a VFIO user does (container, group, IOMMU,
device), and prints what the kernel answered as ``VGTEST`` lines for test_vfio_guest.py.

``python -m tests.e2e.guest_vfio_smoke BDF``. The ioctl numbers are
``_IO(VFIO_TYPE, VFIO_BASE + n)`` from <linux/vfio.h> (``;`` = 0x3b).
"""

from __future__ import annotations

import fcntl
import os
import struct
import sys

VFIO_GET_API_VERSION = 0x3B64
VFIO_CHECK_EXTENSION = 0x3B65
VFIO_SET_IOMMU = 0x3B66
VFIO_GROUP_GET_STATUS = 0x3B67
VFIO_GROUP_SET_CONTAINER = 0x3B68
VFIO_GROUP_GET_DEVICE_FD = 0x3B6A
VFIO_DEVICE_GET_INFO = 0x3B6B
VFIO_DEVICE_GET_REGION_INFO = 0x3B6C
VFIO_TYPE1V2_IOMMU = 3
REGIONS = (0, 2, 4)  # the BARs the GPU has (64-bit BARs take two slots)


def kv(key: str, value: object) -> None:
    print(f"VGTEST {key}={value}", flush=True)


def uptime() -> str:
    with open("/proc/uptime") as handle:
        return handle.read().split()[0]


def main() -> int:
    kv("python_started", uptime())
    # The BDF from argv, the group from the environment: both ways host_python passes them.
    bdf, group = sys.argv[1], os.environ["VG_VFIO_GROUP"]
    container = os.open("/dev/vfio/vfio", os.O_RDWR)
    kv("vfio_api_version", fcntl.ioctl(container, VFIO_GET_API_VERSION))
    kv("vfio_type1v2", fcntl.ioctl(container, VFIO_CHECK_EXTENSION, VFIO_TYPE1V2_IOMMU))
    group_fd = os.open(f"/dev/vfio/{group}", os.O_RDWR)
    status = bytearray(struct.pack("<II", 8, 0))  # argsz, flags
    fcntl.ioctl(group_fd, VFIO_GROUP_GET_STATUS, status, True)
    kv("vfio_group_flags", hex(struct.unpack_from("<II", status)[1]))
    # The device can only be opened once its group is in a container with an IOMMU set.
    fcntl.ioctl(group_fd, VFIO_GROUP_SET_CONTAINER, bytearray(struct.pack("<i", container)), True)
    fcntl.ioctl(container, VFIO_SET_IOMMU, VFIO_TYPE1V2_IOMMU)
    # A mutable buffer makes ioctl return the call's result, here the new fd.
    device = fcntl.ioctl(group_fd, VFIO_GROUP_GET_DEVICE_FD, bytearray(bdf.encode() + b"\0"), True)
    info = bytearray(struct.pack("<IIII", 16, 0, 0, 0))  # argsz, flags, num_regions, num_irqs
    fcntl.ioctl(device, VFIO_DEVICE_GET_INFO, info, True)
    _, flags, num_regions, num_irqs = struct.unpack("<IIII", info)
    kv("vfio_device_flags", hex(flags))
    kv("vfio_num_regions", num_regions)
    kv("vfio_num_irqs", num_irqs)
    for index in REGIONS:
        region = bytearray(struct.pack("<IIIIQQ", 32, 0, index, 0, 0, 0))
        fcntl.ioctl(device, VFIO_DEVICE_GET_REGION_INFO, region, True)
        _, rflags, _, _, size, _ = struct.unpack("<IIIIQQ", region)
        kv(f"vfio_region{index}", f"{size:#x},{rflags:#x}")
    for fd in (device, group_fd, container):
        os.close(fd)
    kv("python_done", uptime())
    return 0


if __name__ == "__main__":
    sys.exit(main())
