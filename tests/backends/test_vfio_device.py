"""``backends.vfio.device`` without a kernel VFIO device: sysfs helpers and every way opening
one fails (a fake sysfs tree and a fake ``/dev/vfio`` in tmp_path).

Opening a real device is tests/e2e/test_vfio_backend.py's job; here each failure must be a
:class:`DeviceError` whose errno and message tell the user what to do, with no fd left open.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from backends.device import DeviceError
from backends.vfio import VfioPciDevice, normalize_pci_address
from backends.vfio.device import bound_driver, iommu_group, sysfs_bar_sizes, sysfs_bars
from tests.backends.helpers import open_fds

ADDRESS = "0000:01:00.0"
GROUP = 7
# A GH200-like BAR set: 16 MiB BAR0, 64-bit BAR2 and BAR4 (their upper halves are zero lines).
RESOURCE = (
    "0x00000000fd000000 0x00000000fdffffff 0x0000000000040200\n"
    "0x0000000000000000 0x0000000000000000 0x0000000000000000\n"
    "0x0000400000000000 0x000040003fffffff 0x000000000014220c\n"
    "0x0000000000000000 0x0000000000000000 0x0000000000000000\n"
    "0x0000420000000000 0x000043ffffffffff 0x000000000014220c\n"
    "0x0000000000000000 0x0000000000000000 0x0000000000000000\n"
    "0x00000000fe000000 0x00000000fe07ffff 0x0000000000046200\n"  # the ROM: not a BAR
)


@dataclass
class Host:
    """A fake sysfs ``bus/pci/devices`` directory and a fake ``/dev/vfio``."""

    sysfs: Path
    dev_vfio: Path
    root: Path

    def add_device(
        self, address: str = ADDRESS, *, group: int | None = GROUP, driver: str | None = "vfio-pci"
    ) -> Path:
        device = self.sysfs / address
        device.mkdir()
        if group is not None:
            target = self.root / "kernel" / "iommu_groups" / str(group)
            target.mkdir(parents=True, exist_ok=True)
            (device / "iommu_group").symlink_to(target)
        if driver is not None:
            target = self.root / "bus" / "pci" / "drivers" / driver
            target.mkdir(parents=True, exist_ok=True)
            (device / "driver").symlink_to(target)
        (device / "resource").write_text(RESOURCE)
        return device

    def add_node(self, name: str) -> None:
        """A regular file standing in for a ``/dev/vfio`` character device."""
        (self.dev_vfio / name).write_bytes(b"")

    def open(self, address: str = ADDRESS) -> VfioPciDevice:
        return VfioPciDevice(address, sysfs=self.sysfs, dev_vfio=self.dev_vfio)


@pytest.fixture
def host(tmp_path: Path) -> Host:
    sysfs = tmp_path / "sys" / "bus" / "pci" / "devices"
    dev_vfio = tmp_path / "dev" / "vfio"
    sysfs.mkdir(parents=True)
    dev_vfio.mkdir(parents=True)
    return Host(sysfs, dev_vfio, tmp_path / "sys")


def open_fails(host: Host, address: str = ADDRESS) -> DeviceError:
    """Open the device, expecting a DeviceError, and check no fd was left behind."""
    before = open_fds()
    with pytest.raises(DeviceError) as caught:
        host.open(address)
    assert open_fds() == before, "a failed open leaked an fd"
    assert str(caught.value) == caught.value.message
    return caught.value


# -- normalize_pci_address ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0000:01:00.0", "0000:01:00.0"),
        ("01:00.0", "0000:01:00.0"),
        ("0009:01:00.0", "0009:01:00.0"),
        ("000A:Bc:1F.7", "000a:bc:1f.7"),
        ("DB:00.1", "0000:db:00.1"),
        (" 0000:01:00.0\n", "0000:01:00.0"),
    ],
)
def test_normalize_pci_address(text: str, expected: str) -> None:
    assert normalize_pci_address(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        "1:00.0",
        "01:00",
        "01:00.8",  # functions are 0-7
        "0000:01:00.0.0",
        "00000:01:00.0",
        "0000:001:00.0",
        "0000-01-00.0",
        "gg:00.0",
        "0000:01:00.0/../../x",
        "/sys/bus/pci/devices/0000:01:00.0",
    ],
)
def test_normalize_pci_address_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="is not a PCI address"):
        normalize_pci_address(text)


# -- sysfs helpers -------------------------------------------------------------------------


def test_sysfs_bar_sizes(host: Host) -> None:
    host.add_device()
    assert sysfs_bar_sizes(ADDRESS, host.sysfs) == [16 << 20, 0, 1 << 30, 0, 2 << 40, 0]


def test_sysfs_bars_carry_the_resource_flags(host: Host) -> None:
    host.add_device()
    bars = sysfs_bars(ADDRESS, host.sysfs)
    assert [size for size, _ in bars] == sysfs_bar_sizes(ADDRESS, host.sysfs)
    assert bars[1] == (0, 0)  # unused
    assert bars[0] == (16 << 20, 0x40200)  # memory, not prefetchable
    assert bars[2] == (1 << 30, 0x14220C)  # memory, 64-bit, prefetchable


def test_sysfs_bar_sizes_of_a_device_with_fewer_lines(host: Host) -> None:
    device = host.add_device()
    (device / "resource").write_text(RESOURCE.splitlines()[0] + "\n")
    assert sysfs_bar_sizes(ADDRESS, host.sysfs) == [16 << 20]


def test_sysfs_bar_sizes_of_an_unknown_device(host: Host) -> None:
    with pytest.raises(ValueError, match=f"PCI device {ADDRESS}: cannot read its BARs"):
        sysfs_bar_sizes(ADDRESS, host.sysfs)


def test_bound_driver(host: Host) -> None:
    host.add_device()
    host.add_device("0000:02:00.0", driver="nvgrace-gpu-vfio-pci")
    host.add_device("0000:03:00.0", driver=None)
    assert bound_driver(ADDRESS, host.sysfs) == "vfio-pci"
    assert bound_driver("0000:02:00.0", host.sysfs) == "nvgrace-gpu-vfio-pci"
    assert bound_driver("0000:03:00.0", host.sysfs) is None
    assert bound_driver("0000:04:00.0", host.sysfs) is None


def test_iommu_group(host: Host) -> None:
    host.add_device()
    host.add_device("0000:02:00.0", group=123)
    assert iommu_group(ADDRESS, host.sysfs) == GROUP
    assert iommu_group("0000:02:00.0", host.sysfs) == 123


# -- opening: every failure says what to do ------------------------------------------------------


def test_bad_address_is_a_value_error(host: Host) -> None:
    before = open_fds()
    with pytest.raises(ValueError, match="is not a PCI address"):
        host.open("01:00")
    assert open_fds() == before


def test_unknown_device(host: Host) -> None:
    error = open_fails(host, "0000:99:00.0")
    assert error.errno == errno.ENODEV
    assert "no PCI device 0000:99:00.0" in error.message
    assert str(host.sysfs) in error.message


def test_unknown_device_named_in_short_form(host: Host) -> None:
    error = open_fails(host, "99:00.0")
    assert "0000:99:00.0" in error.message


def test_device_without_an_iommu_group(host: Host) -> None:
    host.add_device(group=None)
    host.add_node("vfio")
    error = open_fails(host)
    assert error.errno == errno.ENODEV
    assert f"PCI device {ADDRESS} has no IOMMU group" in error.message
    assert "enable the IOMMU" in error.message


@pytest.mark.parametrize("driver", ["nvidia", None])
def test_group_node_missing_names_the_driver_and_the_fix(host: Host, driver: str | None) -> None:
    host.add_device(driver=driver)
    host.add_node("vfio")
    error = open_fails(host)
    assert error.errno == errno.ENODEV
    assert f"IOMMU group {GROUP} {host.dev_vfio / str(GROUP)}" in error.message
    assert f"bind {ADDRESS} to vfio-pci first" in error.message
    assert f"(driver now: {driver or 'none'})" in error.message
    assert f"echo vfio-pci > /sys/bus/pci/devices/{ADDRESS}/driver_override" in error.message
    assert f"echo {ADDRESS} > /sys/bus/pci/drivers_probe" in error.message


def test_container_node_missing(host: Host) -> None:
    host.add_device()
    host.add_node(str(GROUP))
    error = open_fails(host)
    assert error.errno == errno.ENODEV
    assert f"cannot open the VFIO container {host.dev_vfio / 'vfio'}" in error.message


def test_no_dev_vfio_at_all(host: Host) -> None:
    host.add_device()
    host.dev_vfio.rmdir()
    error = open_fails(host)
    assert error.errno == errno.ENODEV
    assert "VFIO container" in error.message


def test_group_node_not_openable(host: Host) -> None:
    # A directory cannot be opened O_RDWR: EISDIR, reported with the path.
    host.add_device()
    host.add_node("vfio")
    (host.dev_vfio / str(GROUP)).mkdir()
    error = open_fails(host)
    assert error.errno == errno.EISDIR
    assert f"cannot open IOMMU group {GROUP} {host.dev_vfio / str(GROUP)}: " in error.message


def test_nodes_that_are_not_vfio_fail_the_first_ioctl(host: Host) -> None:
    # Both nodes open (regular files), so the container and the group fds are open when
    # VFIO_GET_API_VERSION fails with ENOTTY: both must be closed again.
    host.add_device()
    host.add_node("vfio")
    host.add_node(str(GROUP))
    error = open_fails(host)
    assert error.errno == errno.ENOTTY
    assert error.message.startswith(f"{ADDRESS}: get the API version: ")


def test_failed_opens_repeatedly_leak_nothing(host: Host) -> None:
    host.add_device()
    host.add_node("vfio")
    host.add_node(str(GROUP))
    before = open_fds()
    for _ in range(20):
        with pytest.raises(DeviceError):
            host.open()
    assert open_fds() == before


# -- taking a handover over (a live upgrade: the fds come from the previous process) ----------


@pytest.fixture
def handed_fds(tmp_path: Path) -> Iterator[list[int]]:
    """Container, group and device stand-ins (not VFIO: the first ioctl fails), and an
    eventfd; whatever the device under test did not close is closed after."""
    fds = [os.open(tmp_path / name, os.O_RDWR | os.O_CREAT) for name in ("c", "g", "d")]
    fds.append(os.eventfd(0))
    yield fds
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def handover_state(fds: list[int], address: str = ADDRESS) -> dict[str, Any]:
    container, group, device, eventfd = fds
    return {
        "address": address,
        "container": container,
        "group": group,
        "device": device,
        "eventfds": [[2, "trigger", [eventfd, -1]]],
        "iommu_maps": [[0x10_0000, 0x20_0000]],
        "reset_count": 3,
    }


def is_open(fd: int) -> bool:
    # Not "fd in open_fds()": listing /proc/self/fd opens a directory fd, which takes the
    # lowest free number -- one the device under test has just closed.
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def test_a_handover_of_fds_that_are_not_vfio_fails_with_every_fd_closed(
    host: Host, handed_fds: list[int]
) -> None:
    """Taken over, then VFIO_DEVICE_GET_INFO fails: the device, which owned the fds from the
    take-over on, closes every one (the group's included: it is open only once)."""
    host.add_device()
    with pytest.raises(DeviceError) as caught:
        VfioPciDevice(ADDRESS, sysfs=host.sysfs, handed=handover_state(handed_fds))
    assert caught.value.errno == errno.ENOTTY
    assert not any(is_open(fd) for fd in handed_fds)


@pytest.mark.parametrize(
    ("change", "error"),
    [
        ({"address": "0000:02:00.0"}, ValueError),
        ({"eventfds": [[2, "no such action", [5]]]}, ValueError),
        ({"iommu_maps": [[1]]}, ValueError),
        ({"device": None}, TypeError),
    ],
)
def test_a_handover_state_that_does_not_fit_takes_no_fd(
    host: Host, handed_fds: list[int], change: dict[str, Any], error: type[Exception]
) -> None:
    """Refused before anything is taken: the caller (vgpud/upgrade.py) closes them."""
    host.add_device()
    state = {**handover_state(handed_fds), **change}
    with pytest.raises(error):
        VfioPciDevice(ADDRESS, sysfs=host.sysfs, handed=state)
    assert all(is_open(fd) for fd in handed_fds)


def test_a_missing_key_takes_no_fd(host: Host, handed_fds: list[int]) -> None:
    host.add_device()
    state = handover_state(handed_fds)
    del state["iommu_maps"]
    with pytest.raises(KeyError):
        VfioPciDevice(ADDRESS, sysfs=host.sysfs, handed=state)
    assert all(is_open(fd) for fd in handed_fds)
