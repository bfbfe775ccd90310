"""The capability lists of the synthetic GPU: PM, MSI, PCI Express, MSI-X, DSN, DVSECs.

Layout (offsets chosen here; a real GH100 has a similar set at other offsets)::

    0x40 Power Management    0x48 MSI (64-bit, per-vector mask)
    0x60 PCI Express v2 (Endpoint, FLR capable)      0xA0 MSI-X (table/PBA in BAR0)
    0x100 Device Serial Number   0x110 NVIDIA DVSEC (ID 3, bitmap at +0xA)
    0x120 CXL Device DVSEC (vendor 0x1E98, ID 0), only with ``Profile.cxl_dvsec``

The CXL Device DVSEC follows the CXL 2.0 layout (revision 1, length 0x38). Everything in it
is read-only to software here. The driver reads one register only: Range 1 Size Low at
+0x1C, whose MEM_INFO_VALID (bit 0) and MEM_ACTIVE (bit 1) bits the device model updates
from its :class:`~backends.synthetic.bar0.Readiness` and whose Memory_Active_Timeout (bits
15:13) comes from the profile (spec nvgrace-gpu.md §2.3, §7.3).

The DSN has extended capability ID 3 -- the same number as the NVIDIA DVSEC ID -- so a DVSEC
lookup that confuses the two is caught by the tests (spec nvgrace-gpu.md §2.2).
"""

from __future__ import annotations

from dataclasses import dataclass

from backends.synthetic.config_space import (
    PCI_CAPABILITY_LIST,
    PCI_STATUS,
    PCI_STATUS_CAP_LIST,
    ConfigSpace,
)
from backends.synthetic.profiles import NVIDIA_VENDOR_ID

PCI_CAP_ID_PM = 0x01
PCI_CAP_ID_MSI = 0x05
PCI_CAP_ID_EXP = 0x10
PCI_CAP_ID_MSIX = 0x11
PCI_EXT_CAP_ID_DSN = 0x0003
PCI_EXT_CAP_ID_DVSEC = 0x0023

PM_OFFSET = 0x40
MSI_OFFSET = 0x48
PCIE_OFFSET = 0x60
MSIX_OFFSET = 0xA0
DSN_OFFSET = 0x100
DVSEC_OFFSET = 0x110
CXL_DVSEC_OFFSET = 0x120  # right after the NVIDIA DVSEC (0x110 + DVSEC_LENGTH)

# Field offsets inside the capabilities.
PM_CTRL = 4
MSI_FLAGS = 2
MSI_ADDRESS_LO = 4
MSI_ADDRESS_HI = 8
MSI_DATA = 12
MSI_MASK = 16
MSI_PENDING = 20
PCI_EXP_DEVCAP = 4
PCI_EXP_DEVCTL = 8
PCI_EXP_DEVSTA = 10
MSIX_FLAGS = 2
MSIX_TABLE = 4
MSIX_PBA = 8

MSI_FLAGS_ENABLE = 1 << 0
MSI_FLAGS_64BIT = 1 << 7
MSI_FLAGS_MASKBIT = 1 << 8
MSIX_FLAGS_MASKALL = 1 << 14
MSIX_FLAGS_ENABLE = 1 << 15
PCI_EXP_DEVCAP_FLR = 1 << 28
PCI_EXP_DEVCTL_BCR_FLR = 1 << 15

# NVIDIA DVSEC (spec nvgrace-gpu.md §2.2).
GPU_CAP_DVSEC_REGISTER = 3
DVSEC_HEADER1 = 4
DVSEC_HEADER2 = 8
DVSEC_BITMAP_OFFSET = 0xA
DVSEC_LENGTH = 0x10

# CXL Device DVSEC (spec nvgrace-gpu.md §2.3, §7.3; CXL 2.0 §8.1.3 for the other fields).
PCI_VENDOR_ID_CXL = 0x1E98
PCI_DVSEC_CXL_DEVICE = 0
CXL_DVSEC_REVISION = 1
CXL_DVSEC_LENGTH = 0x38
CXL_DVSEC_CAP = 0xA
CXL_DVSEC_CTRL = 0xC
CXL_DVSEC_RANGE_SIZE_HIGH1 = 0x18
CXL_DVSEC_RANGE_SIZE_LOW1 = 0x1C  # PCI_DVSEC_CXL_RANGE_SIZE_LOW(0): readiness (§7.3)
CXL_DVSEC_RANGE_BASE_HIGH1 = 0x20
CXL_DVSEC_RANGE_BASE_LOW1 = 0x24
CXL_DVSEC_CAP_MEM_CAPABLE = 1 << 2
CXL_DVSEC_CAP_MEM_HWINIT_MODE = 1 << 3  # memory is set up by the device/firmware
CXL_DVSEC_CAP_HDM_COUNT_1 = 1 << 4  # one HDM range
CXL_DVSEC_CTRL_MEM_ENABLE = 1 << 2
CXL_MEM_INFO_VALID = 1 << 0
CXL_MEM_ACTIVE = 1 << 1
CXL_MEM_ACTIVE_TIMEOUT_SHIFT = 13  # bits 15:13
CXL_MEM_LOW_MASK = 0xF000_0000  # bits 31:28 of the range size / base (256 MiB units)

# MSI-X table and PBA inside BAR0: page-aligned, away from the readiness registers at
# 0x1498 and 0x200BC (spec nvgrace-gpu.md §7.1) and never mmapped (spec vfio-user.md R14).
MSIX_TABLE_OFFSET = 0x2000
MSIX_PBA_OFFSET = 0x3000
MSIX_ENTRY_SIZE = 16


@dataclass(frozen=True, slots=True)
class CapabilityParams:
    """What varies between profiles in the capability lists."""

    msi_vectors: int
    msix_vectors: int
    serial_number: int
    dvsec_bitmap: int | None
    # None: no CXL Device DVSEC. Otherwise the Memory_Active_Timeout code (0..7) it carries.
    cxl_mem_active_timeout: int | None = None
    # What the CXL DVSEC's Range 1 describes (the device memory, as firmware reports it).
    memory_base: int = 0
    memory_size: int = 0


def build_capabilities(cfg: ConfigSpace, params: CapabilityParams) -> None:
    """Write the standard and extended capability lists into ``cfg``."""
    cfg.set_bits(PCI_STATUS, 2, PCI_STATUS_CAP_LIST, True)
    cfg.set(PCI_CAPABILITY_LIST, 1, PM_OFFSET)
    _power_management(cfg, PM_OFFSET, next_cap=MSI_OFFSET)
    _msi(cfg, MSI_OFFSET, params.msi_vectors, next_cap=PCIE_OFFSET)
    if params.msix_vectors:
        _pci_express(cfg, PCIE_OFFSET, next_cap=MSIX_OFFSET)
        _msix(cfg, MSIX_OFFSET, params.msix_vectors, next_cap=0)
    else:  # no MSI-X: the list ends at PCIe, and the capability's bytes stay zero
        _pci_express(cfg, PCIE_OFFSET, next_cap=0)
    # The extended list: DSN, then whichever DVSECs exist, in offset order.
    chain = [DSN_OFFSET]
    if params.dvsec_bitmap is not None:
        chain.append(DVSEC_OFFSET)
    if params.cxl_mem_active_timeout is not None:
        chain.append(CXL_DVSEC_OFFSET)
    after = dict(zip(chain, [*chain[1:], 0], strict=True))
    _ext_header(cfg, DSN_OFFSET, PCI_EXT_CAP_ID_DSN, next_cap=after[DSN_OFFSET])
    cfg.set(DSN_OFFSET + 4, 8, params.serial_number)
    if params.dvsec_bitmap is not None:
        _nvidia_dvsec(cfg, DVSEC_OFFSET, params.dvsec_bitmap, next_cap=after[DVSEC_OFFSET])
    if params.cxl_mem_active_timeout is not None:
        _cxl_device_dvsec(cfg, CXL_DVSEC_OFFSET, params, params.cxl_mem_active_timeout)


def _header(cfg: ConfigSpace, offset: int, cap_id: int, next_cap: int) -> None:
    cfg.set(offset, 1, cap_id)
    cfg.set(offset + 1, 1, next_cap)


def _ext_header(cfg: ConfigSpace, offset: int, cap_id: int, next_cap: int) -> None:
    cfg.set(offset, 4, cap_id | 1 << 16 | next_cap << 20)


def _power_management(cfg: ConfigSpace, at: int, next_cap: int) -> None:
    _header(cfg, at, PCI_CAP_ID_PM, next_cap)
    cfg.set(at + 2, 2, 0x0003)  # PMC: version 3, no PME from any state
    # PMCSR: power state and PME_En writable, PME status RW1C, NoSoftReset set so that a
    # D3hot->D0 transition keeps config state (what Linux expects from a GPU).
    cfg.set(at + PM_CTRL, 2, 0x0008, wmask=0x0103, w1cmask=0x8000)


def _msi(cfg: ConfigSpace, at: int, vectors: int, next_cap: int) -> None:
    _header(cfg, at, PCI_CAP_ID_MSI, next_cap)
    mmc = vectors.bit_length() - 1
    flags = MSI_FLAGS_64BIT | MSI_FLAGS_MASKBIT | mmc << 1
    cfg.set(at + MSI_FLAGS, 2, flags, wmask=0x0071)  # enable + multiple message enable
    cfg.set(at + MSI_ADDRESS_LO, 4, 0, wmask=0xFFFFFFFC)
    cfg.set(at + MSI_ADDRESS_HI, 4, 0, wmask=0xFFFFFFFF)
    cfg.set(at + MSI_DATA, 2, 0, wmask=0xFFFF)
    cfg.set(at + MSI_MASK, 4, 0, wmask=(1 << vectors) - 1)
    cfg.set(at + MSI_PENDING, 4, 0)  # device-owned


def _pci_express(cfg: ConfigSpace, at: int, next_cap: int) -> None:
    _header(cfg, at, PCI_CAP_ID_EXP, next_cap)
    cfg.set(at + 2, 2, 0x0002)  # version 2, device/port type 0 = PCI Express Endpoint
    # DEVCAP: MPS 256 B, extended tags, role-based errors, FLR (spec vfio-user.md §5.3).
    cfg.set(at + PCI_EXP_DEVCAP, 4, 0x00008021 | PCI_EXP_DEVCAP_FLR)
    # DEVCTL: error enables, RO, MPS, ext tag, no snoop, MRRS writable. BCR_FLR (bit 15)
    # is not stored: it always reads 0 and the write itself triggers the reset.
    cfg.set(at + PCI_EXP_DEVCTL, 2, 0x2810, wmask=0x79FF)
    cfg.set(at + PCI_EXP_DEVSTA, 2, 0, w1cmask=0x000F)
    cfg.set(at + 12, 4, 0x00000105)  # LNKCAP: 32 GT/s, x16
    cfg.set(at + 16, 2, 0, wmask=0x00C3)  # LNKCTL: ASPM, common clock, extended sync
    cfg.set(at + 18, 2, 0x1105)  # LNKSTA: 32 GT/s x16, slot clock
    cfg.set(at + 36, 4, 0x0000001F)  # DEVCAP2: completion timeout ranges + disable
    cfg.set(at + 40, 2, 0, wmask=0x001F)  # DEVCTL2
    cfg.set(at + 44, 4, 0x0000003E)  # LNKCAP2: 2.5-32 GT/s
    cfg.set(at + 48, 2, 0x0005, wmask=0x000F)  # LNKCTL2: target speed


def _msix(cfg: ConfigSpace, at: int, vectors: int, next_cap: int) -> None:
    _header(cfg, at, PCI_CAP_ID_MSIX, next_cap)
    cfg.set(at + MSIX_FLAGS, 2, vectors - 1, wmask=MSIX_FLAGS_ENABLE | MSIX_FLAGS_MASKALL)
    cfg.set(at + MSIX_TABLE, 4, MSIX_TABLE_OFFSET)  # BIR 0
    cfg.set(at + MSIX_PBA, 4, MSIX_PBA_OFFSET)  # BIR 0


def _nvidia_dvsec(cfg: ConfigSpace, at: int, bitmap: int, next_cap: int) -> None:
    _ext_header(cfg, at, PCI_EXT_CAP_ID_DVSEC, next_cap=next_cap)
    cfg.set(at + DVSEC_HEADER1, 4, NVIDIA_VENDOR_ID | DVSEC_LENGTH << 20)  # revision 0
    cfg.set(at + DVSEC_HEADER2, 2, GPU_CAP_DVSEC_REGISTER)
    cfg.set(at + DVSEC_BITMAP_OFFSET, 2, bitmap)


def _cxl_device_dvsec(cfg: ConfigSpace, at: int, params: CapabilityParams, code: int) -> None:
    """The CXL Device DVSEC the v7.2 driver finds by (0x1E98, 0) (spec nvgrace-gpu.md §2.3).

    All registers are read-only (wmask 0): a guest write is ignored, so it can neither fake
    readiness nor change the timeout the driver budgets for. Range 1 Size Low is stored
    with VALID and ACTIVE clear; the device model sets them on every read (§7.3).
    """
    _ext_header(cfg, at, PCI_EXT_CAP_ID_DVSEC, next_cap=0)
    header1 = PCI_VENDOR_ID_CXL | CXL_DVSEC_REVISION << 16 | CXL_DVSEC_LENGTH << 20
    cfg.set(at + DVSEC_HEADER1, 4, header1)
    cfg.set(at + DVSEC_HEADER2, 2, PCI_DVSEC_CXL_DEVICE)
    capability = CXL_DVSEC_CAP_MEM_CAPABLE | CXL_DVSEC_CAP_MEM_HWINIT_MODE
    cfg.set(at + CXL_DVSEC_CAP, 2, capability | CXL_DVSEC_CAP_HDM_COUNT_1)
    cfg.set(at + CXL_DVSEC_CTRL, 2, CXL_DVSEC_CTRL_MEM_ENABLE)
    size, base = params.memory_size, params.memory_base
    cfg.set(at + CXL_DVSEC_RANGE_SIZE_HIGH1, 4, size >> 32)
    timeout = code << CXL_MEM_ACTIVE_TIMEOUT_SHIFT
    cfg.set(at + CXL_DVSEC_RANGE_SIZE_LOW1, 4, (size & CXL_MEM_LOW_MASK) | timeout)
    cfg.set(at + CXL_DVSEC_RANGE_BASE_HIGH1, 4, base >> 32)
    cfg.set(at + CXL_DVSEC_RANGE_BASE_LOW1, 4, base & CXL_MEM_LOW_MASK)
