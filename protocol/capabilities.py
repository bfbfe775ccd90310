"""The VERSION capabilities object (spec vfio-user.md §3.1).

``Capabilities`` describes what the *sender* of a VERSION message accepts: its
``max_msg_fds`` is how many fds it can receive per message, its ``max_data_xfer_size`` the
largest data transfer it accepts. Defaults are the spec's; unknown JSON keys are tolerated
(QEMU itself only warns), wrong types are the peer's EINVAL.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from protocol._fields import check_uint, require

DEFAULT_MAX_MSG_FDS = 1
DEFAULT_MAX_DATA_XFER_SIZE = 1 << 20
DEFAULT_PGSIZES = 4096
DEFAULT_MAX_DMA_MAPS = 65535
#: libvfio-user refuses more; it bounds the ancillary buffer a transport must allocate.
MAX_MSG_FDS_LIMIT = 1024


@dataclass(frozen=True, slots=True)
class Migration:
    """The legacy ``migration`` capability: ``{"pgsize": N, "max_bitmap_size": N}``."""

    pgsize: int = 4096
    max_bitmap_size: int = 256 << 20

    def __post_init__(self) -> None:
        check_uint(self, 64, "pgsize", "max_bitmap_size")
        require(self.pgsize > 0, "migration pgsize must be > 0")

    def to_json(self) -> dict[str, Any]:
        """The JSON object."""
        return {"pgsize": self.pgsize, "max_bitmap_size": self.max_bitmap_size}

    @classmethod
    def from_json(cls, obj: object) -> Migration:
        """Parse the JSON object (missing keys take the defaults)."""
        require(isinstance(obj, Mapping), "migration capability must be an object")
        assert isinstance(obj, Mapping)
        return cls(
            pgsize=_int(obj, "pgsize", 4096),
            max_bitmap_size=_int(obj, "max_bitmap_size", 256 << 20),
        )


@dataclass(frozen=True, slots=True)
class TwinSocket:
    """``{"supported": bool, "fd_index": n}``; ``fd_index`` only appears in a reply."""

    supported: bool = False
    fd_index: int | None = None

    def __post_init__(self) -> None:
        require(type(self.supported) is bool, "twin_socket.supported must be a bool")
        if self.fd_index is not None:
            check_uint(self, 32, "fd_index")

    def to_json(self) -> dict[str, Any]:
        """The JSON object."""
        obj: dict[str, Any] = {"supported": self.supported}
        if self.fd_index is not None:
            obj["fd_index"] = self.fd_index
        return obj

    @classmethod
    def from_json(cls, obj: object) -> TwinSocket:
        """Parse the JSON object."""
        require(isinstance(obj, Mapping), "twin_socket capability must be an object")
        assert isinstance(obj, Mapping)
        supported = obj.get("supported", False)
        require(type(supported) is bool, "twin_socket.supported must be a bool")
        fd_index = obj.get("fd_index")
        require(fd_index is None or (type(fd_index) is int), "twin_socket.fd_index must be an int")
        return cls(supported=supported, fd_index=fd_index)


@dataclass(frozen=True, slots=True)
class Capabilities:
    """The ``capabilities`` member of the VERSION JSON (spec §3.1 table)."""

    max_msg_fds: int = DEFAULT_MAX_MSG_FDS
    max_data_xfer_size: int = DEFAULT_MAX_DATA_XFER_SIZE
    pgsizes: int = DEFAULT_PGSIZES
    max_dma_maps: int = DEFAULT_MAX_DMA_MAPS
    migration: Migration | None = None
    write_multiple: bool = False
    twin_socket: TwinSocket | None = None

    def __post_init__(self) -> None:
        check_uint(self, 32, "max_msg_fds", "max_data_xfer_size", "max_dma_maps")
        check_uint(self, 64, "pgsizes")
        require(self.max_msg_fds <= MAX_MSG_FDS_LIMIT, f"max_msg_fds > {MAX_MSG_FDS_LIMIT}")
        require(self.max_data_xfer_size > 0, "max_data_xfer_size must be > 0")
        # QEMU's check: page sizes are multiples of 4 KiB (spec §3.1 table).
        require(self.pgsizes != 0 and self.pgsizes & 0xFFF == 0, "pgsizes must be 4 KiB multiples")
        require(type(self.write_multiple) is bool, "write_multiple must be a bool")
        require(
            self.migration is None or isinstance(self.migration, Migration),
            "migration must be a Migration",
        )
        require(
            self.twin_socket is None or isinstance(self.twin_socket, TwinSocket),
            "twin_socket must be a TwinSocket",
        )

    def to_json(self, *, explicit: bool = False) -> dict[str, Any]:
        """The JSON object. ``max_msg_fds`` and ``max_data_xfer_size`` are always present
        (spec R8: QEMU assumes 8 fds, not the spec's 1, when the key is absent); the other
        keys only when they differ from the spec default, which keeps VERSION replies short
        (spec R2), unless ``explicit`` (a request that leaves the reply room, as QEMU's)."""
        obj: dict[str, Any] = {
            "max_msg_fds": self.max_msg_fds,
            "max_data_xfer_size": self.max_data_xfer_size,
        }
        if explicit or self.pgsizes != DEFAULT_PGSIZES:
            obj["pgsizes"] = self.pgsizes
        if explicit or self.max_dma_maps != DEFAULT_MAX_DMA_MAPS:
            obj["max_dma_maps"] = self.max_dma_maps
        if self.migration is not None:
            obj["migration"] = self.migration.to_json()
        if self.write_multiple:
            obj["write_multiple"] = True
        if self.twin_socket is not None:
            obj["twin_socket"] = self.twin_socket.to_json()
        return obj

    @classmethod
    def from_json(cls, obj: object) -> Capabilities:
        """Parse the JSON object; unknown keys are ignored, wrong types raise (EINVAL)."""
        require(isinstance(obj, Mapping), "capabilities must be a JSON object")
        assert isinstance(obj, Mapping)
        write_multiple = obj.get("write_multiple", False)
        require(type(write_multiple) is bool, "write_multiple must be a bool")
        migration = obj.get("migration")
        twin = obj.get("twin_socket")
        return cls(
            max_msg_fds=_int(obj, "max_msg_fds", DEFAULT_MAX_MSG_FDS),
            max_data_xfer_size=_int(obj, "max_data_xfer_size", DEFAULT_MAX_DATA_XFER_SIZE),
            pgsizes=_int(obj, "pgsizes", DEFAULT_PGSIZES),
            max_dma_maps=_int(obj, "max_dma_maps", DEFAULT_MAX_DMA_MAPS),
            migration=None if migration is None else Migration.from_json(migration),
            write_multiple=write_multiple,
            twin_socket=None if twin is None else TwinSocket.from_json(twin),
        )


def _int(obj: Mapping[str, object], key: str, default: int) -> int:
    value = obj.get(key, default)
    # bool is an int subclass: JSON true must not pass as 1.
    require(type(value) is int, f"{key} must be an integer")
    assert isinstance(value, int)
    return value
