"""Hypothesis strategies for every message dataclass (valid instances only)."""

from __future__ import annotations

from hypothesis import strategies as st

from protocol import (
    Capabilities,
    DeviceFeature,
    DeviceInfo,
    DeviceReset,
    DirtyBitmap,
    DmaLoggingControl,
    DmaLoggingReport,
    DmaMap,
    DmaReadReply,
    DmaReadRequest,
    DmaUnmap,
    DmaWriteReply,
    DmaWriteRequest,
    FeatureFlags,
    IoFdEntry,
    IrqInfo,
    MigDataRead,
    MigDataReadReply,
    MigDataWrite,
    MigDeviceStateFeature,
    Migration,
    MigrationFeature,
    MsixMappableCap,
    QemuDmaReadReply,
    QemuDmaReadRequest,
    QemuDmaWriteRequest,
    RegionInfoRequest,
    RegionIoFdsReply,
    RegionIoFdsRequest,
    RegionReadReply,
    RegionReadRequest,
    RegionWriteMulti,
    RegionWriteMultiReply,
    RegionWriteReply,
    RegionWriteRequest,
    SetIrqs,
    SetIrqsFlags,
    SparseMmapCap,
    TwinSocket,
    TypeCap,
    Version,
    WriteMultiEntry,
    build_region_info_reply,
)

u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFF_FFFF)
u64 = st.integers(0, (1 << 64) - 1)
small_data = st.binary(max_size=64)


@st.composite
def _base_and_length(
    draw: st.DrawFn, length_bits: int = 64, min_length: int = 0
) -> tuple[int, int]:
    """An (address, length) pair that does not wrap 64 bits."""
    length = draw(st.integers(min_length, (1 << length_bits) - 1))
    base = draw(st.integers(0, (1 << 64) - max(length, 1)))
    return base, length


capabilities = st.builds(
    Capabilities,
    max_msg_fds=st.integers(0, 1024),
    max_data_xfer_size=st.integers(1, 0xFFFF_FFFF),
    pgsizes=st.integers(1, (1 << 52) - 1).map(lambda n: n << 12),
    max_dma_maps=u32,
    migration=st.none() | st.builds(Migration, st.integers(1, (1 << 64) - 1), u64),
    write_multiple=st.booleans(),
    twin_socket=st.none() | st.builds(TwinSocket, st.booleans(), st.none() | u32),
)

versions = st.builds(Version, u16, u16, st.none() | capabilities)


@st.composite
def dma_maps(draw: st.DrawFn) -> DmaMap:
    address, size = draw(_base_and_length(min_length=1))
    offset = draw(st.integers(0, (1 << 64) - size))
    return DmaMap(draw(st.integers(0, 3)), offset, address, size)


@st.composite
def dma_unmaps(draw: st.DrawFn) -> DmaUnmap:
    kind = draw(st.sampled_from(["plain", "all", "bitmap"]))
    if kind == "all":
        return DmaUnmap(2, 0, 0)
    address, size = draw(_base_and_length(min_length=1))
    if kind == "plain":
        return DmaUnmap(0, address, size)
    data = draw(small_data)
    bitmap = DirtyBitmap(
        draw(st.integers(1, 1 << 20)), len(data), draw(st.sampled_from([b"", data]))
    )
    return DmaUnmap(1, address, size, bitmap)


@st.composite
def set_irqs(draw: st.DrawFn) -> SetIrqs:
    data_type = draw(st.sampled_from([1, 2, 4]))
    action = draw(st.sampled_from([8, 16, 32]))
    count = draw(st.integers(1, 64))
    if data_type == SetIrqsFlags.DATA_NONE and action == SetIrqsFlags.ACTION_TRIGGER:
        count = draw(st.integers(0, 64))
    start = draw(st.integers(0, 0xFFFF_FFFF - count))
    data = b""
    if data_type == SetIrqsFlags.DATA_BOOL:
        data = bytes(draw(st.lists(st.integers(0, 1), min_size=count, max_size=count)))
    return SetIrqs.build(data_type | action, draw(u32), start, count, data)


@st.composite
def region_accesses(draw: st.DrawFn, cls: type, with_data: bool) -> object:
    data = draw(small_data)
    offset = draw(st.integers(0, (1 << 64) - max(len(data), 1)))
    if with_data:
        return cls(offset, draw(u32), len(data), data)
    return cls(offset, draw(u32), len(data))


@st.composite
def write_multis(draw: st.DrawFn) -> RegionWriteMulti:
    entries = []
    for _ in range(draw(st.integers(1, 8))):
        data = draw(st.binary(max_size=8))
        entries.append(WriteMultiEntry(draw(st.integers(0, 1 << 40)), draw(u32), len(data), data))
    return RegionWriteMulti(tuple(entries))


area = st.tuples(u64, u64)
caps = st.lists(
    st.one_of(
        st.builds(SparseMmapCap, st.lists(area, max_size=4).map(tuple)),
        st.builds(TypeCap, u32, u32),
        st.just(MsixMappableCap()),
    ),
    max_size=3,
).map(tuple)
region_infos = st.builds(
    build_region_info_reply, st.integers(32, 256), u32, st.integers(0, 7), u64, u64, caps
)


@st.composite
def io_fds_replies(draw: st.DrawFn) -> RegionIoFdsReply:
    entries = draw(
        st.lists(st.builds(IoFdEntry, u64, u64, st.integers(0, 7), u32, u32, u64), max_size=4)
    )
    count = len(entries)
    truncated = draw(st.booleans())
    return RegionIoFdsReply(
        16 + 40 * count, draw(u32), draw(u32), count, () if truncated else tuple(entries)
    )


@st.composite
def device_features(draw: st.DrawFn) -> DeviceFeature:
    mode = draw(
        st.sampled_from(
            [
                FeatureFlags.GET,
                FeatureFlags.SET,
                FeatureFlags.PROBE,
                FeatureFlags.PROBE | FeatureFlags.GET,
            ]
        )
    )
    data = draw(small_data)
    argsz = 8 + len(data) + draw(st.integers(0, 64))
    return DeviceFeature(argsz, int(mode) | draw(st.integers(0, 0xFFFF)), data)


@st.composite
def qemu_dma(draw: st.DrawFn, cls: type, with_data: bool) -> object:
    data = draw(small_data)
    offset = draw(st.integers(0, (1 << 64) - max(len(data), 1)))
    return cls(offset, len(data), data) if with_data else cls(offset, len(data))


@st.composite
def mig_reads(draw: st.DrawFn, cls: type) -> object:
    data = draw(small_data)
    return cls(8 + len(data), len(data), data)


#: One strategy per message dataclass.
MESSAGES: dict[str, st.SearchStrategy[object]] = {
    "Version": versions,
    "DmaMap": dma_maps(),
    "DmaUnmap": dma_unmaps(),
    "DeviceInfo": st.builds(DeviceInfo, st.integers(16, 0xFFFF_FFFF), u32, u32, u32),
    "RegionInfoRequest": st.builds(RegionInfoRequest, st.integers(32, 0xFFFF_FFFF), u32),
    "RegionInfo": region_infos,
    "RegionIoFdsRequest": st.builds(RegionIoFdsRequest, st.integers(16, 0xFFFF_FFFF), u32),
    "RegionIoFdsReply": io_fds_replies(),
    "IrqInfo": st.builds(IrqInfo, st.integers(16, 0xFFFF_FFFF), u32, u32, u32),
    "SetIrqs": set_irqs(),
    "RegionReadRequest": region_accesses(RegionReadRequest, False),
    "RegionReadReply": region_accesses(RegionReadReply, True),
    "RegionWriteRequest": region_accesses(RegionWriteRequest, True),
    "RegionWriteReply": region_accesses(RegionWriteReply, False),
    "RegionWriteMulti": write_multis(),
    "RegionWriteMultiReply": st.builds(RegionWriteMultiReply, u64),
    "DmaReadRequest": st.builds(lambda a: DmaReadRequest(*a), _base_and_length(32)),
    "DmaReadReply": st.builds(lambda a, d: DmaReadReply(a, len(d), d), u64, small_data),
    "DmaWriteRequest": st.builds(
        lambda d, a: DmaWriteRequest(a, len(d), d), small_data, st.integers(0, 1 << 48)
    ),
    "DmaWriteReply": st.builds(DmaWriteReply, u64, u64),
    "QemuDmaReadRequest": qemu_dma(QemuDmaReadRequest, False),
    "QemuDmaReadReply": st.builds(lambda a, d: QemuDmaReadReply(a, len(d), d), u64, small_data),
    "QemuDmaWriteRequest": qemu_dma(QemuDmaWriteRequest, True),
    "DeviceReset": st.just(DeviceReset()),
    "DeviceFeature": device_features(),
    "MigDataRead": st.builds(MigDataRead, st.integers(8, 0xFFFF_FFFF), u32),
    "MigDataReadReply": mig_reads(MigDataReadReply),
    "MigDataWrite": mig_reads(MigDataWrite),
}

#: Typed DEVICE_FEATURE data payloads.
FEATURE_DATA: dict[str, st.SearchStrategy[object]] = {
    "MigrationFeature": st.builds(MigrationFeature, u64),
    "MigDeviceStateFeature": st.builds(MigDeviceStateFeature, u32, u32),
    "DmaLoggingControl": st.builds(
        DmaLoggingControl, u64, st.lists(st.tuples(u64, u64), max_size=4).map(tuple)
    ),
    "DmaLoggingReport": st.builds(DmaLoggingReport, u64, u64, u64, small_data),
}
