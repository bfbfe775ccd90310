"""Loading libvfio-user through cffi (ABI mode) and checking it is one we can drive.

libvfio-user has no stable ABI and no version symbol (its header says so; DESIGN.md
"Engines" #2), so the declarations below are only the functions, types and constants the
engine uses, copied from ``include/libvfio-user.h`` of upstream commit efd091b (June 2026).
What can be checked without a compiler is checked in :func:`load_library`:

* every declared function is exported (a missing one means a different API);
* ``vfu_setup_device_dma`` takes ``max_regions`` -- added by upstream f3742ed (March 2026)
  with no change of soname. Calling the 4-argument form on an older library would pass our
  callbacks in the wrong registers and crash on the first DMA_MAP, so we look for a log
  string that only the new DMA code contains (``"hit max regions %zu"``; before it was
  ``%d``) in the mapped library file.

Everything else (the 64-bit/prefetchable BAR region flags, ``VFU_REGION_FLAG_ALWAYS_CB``) is
checked when the context is set up: an older library rejects unknown flags with EINVAL and the
engine reports that as :class:`EngineUnavailable`.

The process must also be allowed ``kcmp(2)``. libvfio-user's fd cache (lib/fd_cache.c)
compares DMA fds with it, and without it falls back to comparing device, inode and the
file status flags. A client can change those flags on the fd it sent (they belong to the
shared open file description), and the region's fd is then not found when it is unmapped,
so ``assert(err == 0)`` in ``dma_controller_destroy_region`` aborts the whole daemon. An
adversarial run showed this under a blocked ``kcmp``, which Docker's and podman's default
seccomp profiles do. So without ``kcmp`` the engine refuses to start.
"""

from __future__ import annotations

import ctypes
import os
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cffi  # type: ignore[import-untyped]

ENV_LIBRARY = "VGPUD_LIBVFIO_USER"
DEFAULT_LIBRARY = "libvfio-user.so.0"

# Only what engine.py and irq.py use. Struct layouts are the ones of the header named above;
# vfu_dma_info_t has been unchanged since upstream #396 (2021).
CDEF = """
typedef struct vfu_ctx vfu_ctx_t;
typedef long ssize_t;
typedef long loff_t;
struct iovec { void *iov_base; size_t iov_len; };

typedef enum { VFU_TRANS_SOCK, VFU_TRANS_PIPE, VFU_TRANS_MAX } vfu_trans_t;
typedef enum { VFU_DEV_TYPE_PCI } vfu_dev_type_t;
typedef enum {
    VFU_PCI_TYPE_CONVENTIONAL, VFU_PCI_TYPE_PCI_X_1, VFU_PCI_TYPE_PCI_X_2, VFU_PCI_TYPE_EXPRESS
} vfu_pci_type_t;
typedef enum vfu_reset_type {
    VFU_RESET_DEVICE, VFU_RESET_LOST_CONN, VFU_RESET_PCI_FLR
} vfu_reset_type_t;
enum vfu_dev_irq_type {
    VFU_DEV_INTX_IRQ, VFU_DEV_MSI_IRQ, VFU_DEV_MSIX_IRQ, VFU_DEV_ERR_IRQ, VFU_DEV_REQ_IRQ,
    VFU_DEV_NUM_IRQS
};

typedef struct vfu_dma_info {
    struct iovec iova;
    void *vaddr;
    struct iovec mapping;
    size_t page_size;
    uint32_t prot;
} vfu_dma_info_t;

typedef void (vfu_log_fn_t)(vfu_ctx_t *vfu_ctx, int level, const char *msg);
typedef ssize_t (vfu_region_access_cb_t)(vfu_ctx_t *vfu_ctx, char *buf, size_t count,
                                         loff_t offset, bool is_write);
typedef int (vfu_reset_cb_t)(vfu_ctx_t *vfu_ctx, vfu_reset_type_t type);
typedef void (vfu_dma_register_cb_t)(vfu_ctx_t *vfu_ctx, vfu_dma_info_t *info);
typedef void (vfu_dma_unregister_cb_t)(vfu_ctx_t *vfu_ctx, vfu_dma_info_t *info);
typedef void (vfu_dev_irq_state_cb_t)(vfu_ctx_t *vfu_ctx, uint32_t start, uint32_t count,
                                      bool mask);

vfu_ctx_t *vfu_create_ctx(vfu_trans_t trans, const char *path, int flags, void *pvt,
                          vfu_dev_type_t dev_type);
int vfu_realize_ctx(vfu_ctx_t *vfu_ctx);
int vfu_attach_ctx(vfu_ctx_t *vfu_ctx);
int vfu_get_poll_fd(vfu_ctx_t *vfu_ctx);
int vfu_run_ctx(vfu_ctx_t *vfu_ctx);
void vfu_destroy_ctx(vfu_ctx_t *vfu_ctx);
int vfu_setup_log(vfu_ctx_t *vfu_ctx, vfu_log_fn_t *log, int level);
int vfu_setup_region(vfu_ctx_t *vfu_ctx, int region_idx, size_t size,
                     vfu_region_access_cb_t *region_access, int flags,
                     struct iovec *mmap_areas, uint32_t nr_mmap_areas, int fd, uint64_t offset);
int vfu_setup_device_reset_cb(vfu_ctx_t *vfu_ctx, vfu_reset_cb_t *reset);
int vfu_setup_device_dma(vfu_ctx_t *vfu_ctx, size_t max_regions,
                         vfu_dma_register_cb_t *dma_register,
                         vfu_dma_unregister_cb_t *dma_unregister);
int vfu_setup_device_nr_irqs(vfu_ctx_t *vfu_ctx, enum vfu_dev_irq_type type, uint32_t count);
int vfu_setup_irq_state_callback(vfu_ctx_t *vfu_ctx, enum vfu_dev_irq_type type,
                                 vfu_dev_irq_state_cb_t *cb);
int vfu_irq_trigger(vfu_ctx_t *vfu_ctx, uint32_t subindex);
int vfu_pci_init(vfu_ctx_t *vfu_ctx, vfu_pci_type_t pci_type, int hdr_type, int revision);
void vfu_pci_set_id(vfu_ctx_t *vfu_ctx, uint16_t vid, uint16_t did, uint16_t ssvid,
                    uint16_t ssid);
"""

FUNCTIONS = (
    "vfu_create_ctx",
    "vfu_realize_ctx",
    "vfu_attach_ctx",
    "vfu_get_poll_fd",
    "vfu_run_ctx",
    "vfu_destroy_ctx",
    "vfu_setup_log",
    "vfu_setup_region",
    "vfu_setup_device_reset_cb",
    "vfu_setup_device_dma",
    "vfu_setup_device_nr_irqs",
    "vfu_setup_irq_state_callback",
    "vfu_irq_trigger",
    "vfu_pci_init",
    "vfu_pci_set_id",
)

# #defines of the header (cffi's ABI mode cannot read macros).
LIBVFIO_USER_FLAG_ATTACH_NB = 1 << 0
PCI_HEADER_TYPE_NORMAL = 0
VFU_REGION_FLAG_READ = 1 << 0
VFU_REGION_FLAG_WRITE = 1 << 1
VFU_REGION_FLAG_MEM = 1 << 2
VFU_REGION_FLAG_ALWAYS_CB = 1 << 3
VFU_REGION_FLAG_64_BITS = 1 << 4
VFU_REGION_FLAG_PREFETCH = 1 << 5
LIBVFIO_USER_MAX_DMA_REGIONS = 1000 * 1000
LOG_ERR, LOG_WARNING, LOG_INFO, LOG_DEBUG = 3, 4, 6, 7  # syslog(3)

# Present only in libraries with the 4-argument vfu_setup_device_dma (see module docstring).
_DMA_ABI_MARKER = b"hit max regions %zu"


class EngineUnavailable(Exception):  # noqa: N818 -- the name the daemon and CLI report
    """libvfio-user cannot be used; the message says why and what to do."""


@dataclass(frozen=True, slots=True)
class Library:
    """A loaded, checked libvfio-user."""

    ffi: Any
    lib: Any
    path: str  # the file actually mapped (resolved through the system loader if needed)


def library_name(explicit: str | os.PathLike[str] | None = None) -> str:
    """What to load: ``explicit``, else ``$VGPUD_LIBVFIO_USER``, else the soname."""
    if explicit is not None:
        return os.fspath(explicit)
    return os.environ.get(ENV_LIBRARY) or DEFAULT_LIBRARY


def load_library(explicit: str | os.PathLike[str] | None = None) -> Library:
    """dlopen libvfio-user and check it (see the module docstring).

    Raises :class:`EngineUnavailable` with a message for the user.
    """
    name = library_name(explicit)
    ffi = cffi.FFI()
    ffi.cdef(CDEF)
    try:
        lib = ffi.dlopen(name)
    except OSError as exc:
        hint = (
            f"set {ENV_LIBRARY} or --libvfio-user to the library's path"
            if os.sep not in name
            else "check the path"
        )
        raise EngineUnavailable(
            f"libvfio-user engine: cannot load {name!r} ({exc}); libvfio-user is not in any "
            f"package registry: build it from https://github.com/nutanix/libvfio-user and {hint}"
        ) from exc
    missing = [fn for fn in FUNCTIONS if not _has_symbol(lib, fn)]
    if missing:
        raise EngineUnavailable(
            f"libvfio-user engine: {name!r} lacks {', '.join(missing)}: not a libvfio-user "
            "with the API this engine was written for (upstream efd091b)"
        )
    path = _mapped_file(name)
    if path is None:
        raise EngineUnavailable(
            f"libvfio-user engine: loaded {name!r} but cannot find its file to check its ABI"
        )
    if not _file_contains(path, _DMA_ABI_MARKER):
        raise EngineUnavailable(
            f"libvfio-user engine: {path} predates the vfu_setup_device_dma(max_regions) ABI "
            "(upstream f3742ed, March 2026); calling it would crash. Use a newer build."
        )
    if kcmp_works() is False:
        raise EngineUnavailable(
            "libvfio-user engine: kcmp(2) is not permitted here (a container's seccomp "
            "profile?); without it libvfio-user aborts when a client changes the flags of a "
            "DMA fd it sent. Allow kcmp (e.g. --cap-add SYS_PTRACE) or use the python engine."
        )
    return Library(ffi, lib, path)


# SYS_kcmp by machine; None (not known) skips the check rather than refusing.
_SYS_KCMP = {"x86_64": 312, "aarch64": 272, "arm64": 272, "riscv64": 272}
_KCMP_FILE = 0


def kcmp_works() -> bool | None:
    """Whether ``kcmp(KCMP_FILE)`` works on one of our fds, as libvfio-user probes it."""
    number = _SYS_KCMP.get(platform.machine())
    if number is None:
        return None
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    try:
        pid = os.getpid()
        args = (number, pid, pid, _KCMP_FILE, fd, fd)
        return int(libc.syscall(*(ctypes.c_long(arg) for arg in args))) == 0
    finally:
        os.close(fd)


def _has_symbol(lib: Any, name: str) -> bool:
    try:
        getattr(lib, name)
    except AttributeError:
        return False
    return True


def _mapped_file(name: str) -> str | None:
    """The file the dynamic loader mapped for ``name`` (it may have been a bare soname)."""
    if os.sep in name:
        return str(Path(name).resolve())
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return None
    for line in maps.splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and Path(fields[5]).name.startswith("libvfio-user.so"):
            return fields[5]
    return None


def _file_contains(path: str, needle: bytes) -> bool:
    try:
        data = Path(path).read_bytes()
    except OSError:
        return False
    return needle in data
