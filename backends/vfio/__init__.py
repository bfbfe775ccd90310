"""A real PCI device through /dev/vfio (group/container, type1 IOMMU): the passthrough backend."""

from backends.vfio.device import VfioPciDevice, normalize_pci_address

__all__ = ["VfioPciDevice", "normalize_pci_address"]
