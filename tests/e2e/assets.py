"""Fetch and load the e2e tier's assets: QEMU 11.1 (Debian sid), a guest kernel and busybox.

``python -m tests.e2e.assets fetch [--arch x86_64|aarch64] [--all] [--refresh]`` fills
``$VGPUD_CACHE`` (default ``~/.cache/vgpud``); tests call :meth:`Assets.load`, which never
touches the network.

Nothing is installed system-wide. Every apt call runs with a private configuration
(``APT_CONFIG`` pointing at our own file, which also switches off /etc/apt/apt.conf.d and
/etc/apt/sources.list*), its own lists, status and archive cache under the cache directory.
Packages are unpacked with ``dpkg-deb -x`` and sid's QEMU runs through sid's own dynamic
loader (``ld-linux-x86-64.so.2 --library-path …``), so bookworm's older glibc is never mixed in.

Layout (``<arch>`` is x86_64 or aarch64)::

    $VGPUD_CACHE/apt/<suite>-<debarch>/     private apt roots (apt.conf, sources.list, state, cache)
    $VGPUD_CACHE/<arch>/qemu/               unpacked sid QEMU + its library closure + firmware
    $VGPUD_CACHE/<arch>/kernel/             vmlinuz (+ the kernel's config), modules/*.ko and
                                            modules/modules.order (their load order)
    $VGPUD_CACHE/x86_64/kernel-trixie/      the same for trixie's kernel (the VFIO guest runs
                                            on both: tests/e2e/test_vfio_backend.py)
    $VGPUD_CACHE/x86_64/kernel-sid/         the same for sid's kernel (7.x)
    $VGPUD_CACHE/x86_64/nvgrace-module-<suite>/
                                            the kernel's nvgrace-gpu-vfio-pci.ko, built for
                                            the kernel-<suite> asset's kernel (trixie, sid;
                                            tests/e2e/kernel_module.py)
    $VGPUD_CACHE/<arch>/busybox/busybox     static busybox for the initramfs
    $VGPUD_CACHE/libvirt/                   sid's libvirtd + virsh + their library closure
                                            (root/), and share/libvirt (its CPU map), which
                                            libvirt reads from /usr/share only
                                            (tests/e2e/libvirt.py); runs on this host, for
                                            guests of either arch

Each asset directory is built under a temporary name and renamed into place only after it was
verified and its ``manifest.json`` written, so an interrupted fetch never looks complete and a
re-run simply starts that asset again. A lock file serialises concurrent fetches.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import functools
import getpass
import json
import lzma
import os
import platform
import re
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.e2e import kernel_module

ARCHES = ("x86_64", "aarch64")
# Overridable for CI mirrors; signatures are still checked against Debian's keyring.
DEBIAN_MIRROR = os.environ.get("VGPUD_DEBIAN_MIRROR", "http://deb.debian.org/debian")
DEBIAN_SECURITY = os.environ.get(
    "VGPUD_DEBIAN_SECURITY_MIRROR", "http://deb.debian.org/debian-security"
)
KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"
MANIFEST = "manifest.json"
# Bumped (per asset, so that a change to one does not re-fetch the others) when the layout of
# an asset directory changes: older directories are rebuilt.
ASSET_FORMATS = {
    "qemu": 1,
    "kernel": 2,
    "kernel-trixie": 2,
    "busybox": 1,
    "libvirt": 1,
    "kernel-sid": 2,
    "nvgrace-module-trixie": 1,
    "nvgrace-module-sid": 1,
}
# The kernel's nvgrace-gpu-vfio-pci, built for each of these x86_64 guest kernels
# (tests/e2e/kernel_module.py): trixie's 6.12 and sid's 7.x (the v6.19+ variant).
NVGRACE_MODULE_KERNELS = ("trixie", "sid")
# Every guest boots bookworm's kernel (6.1); x86_64 also has trixie's (6.12, as Grace hosts
# run) and sid's (7.x, the newest), for the tests of the /dev/vfio backend, whose kernel
# interface changed between them (vfio/type1's DMA owner moving on exec, 6.2), and for the
# kernel's nvgrace driver of both generations (test_kernel_driver.py).
DEFAULT_KERNEL = "bookworm"
MODULES_ORDER = "modules.order"
# Guest kernel modules kept with the kernel (plus what they depend on), for the VFIO guest
# (``Harness.boot(..., vfio=True)``): Debian builds virtio-pci, 9p and vfio-pci as modules, and the
# initramfs guest has no other root to load them from. Same names on amd64 and arm64.
GUEST_MODULES = (
    "virtio_pci",  # the 9p export of the host's / is a virtio-9p-pci device
    "9pnet_virtio",
    "9p",
    "vfio_iommu_type1",  # not a depends= of vfio-pci (vfio finds it at runtime)
    "vfio-pci",
)
HOST_MULTIARCH = "x86_64-linux-gnu"
_PRUNE = ("usr/share/doc", "usr/share/man", "usr/share/locale", "usr/share/AAVMF")
# libvirt's daemon, QEMU driver and virsh, from sid like QEMU (bookworm's 9.0 predates QEMU
# 11.1 by three years); the closure brings a QEMU too, which is pruned: the tests point
# libvirt at the qemu asset's.
LIBVIRT_PACKAGES = ("libvirt-daemon", "libvirt-daemon-driver-qemu", "libvirt-clients")
_LIBVIRT_PRUNE = ("usr/lib/ipxe", "usr/lib/x86_64-linux-gnu/qemu", "usr/share")


# Where a kernel package keeps the kernel and its config: ./boot up to trixie, the modules
# directory since sid's split 7.x packages.
_VMLINUZ = re.compile(r"\./boot/vmlinuz-(\S+)|\./usr/lib/modules/([^/]+)/vmlinuz")
_KERNEL_CONFIG = re.compile(r"\./boot/config-\S+|\./usr/lib/modules/[^/]+/config")


class AssetError(Exception):
    """A fetch step failed; ``str()`` is the one message shown to the user."""

    def __init__(self, asset: str, step: str, detail: str) -> None:
        super().__init__(f"{asset}: {step} failed: {detail}")
        self.asset = asset
        self.step = step
        self.detail = detail


class AssetsMissingError(Exception):
    """The assets are not (completely) in the cache; the message says how to fetch them."""


def default_cache_dir() -> Path:
    """``$VGPUD_CACHE``, else ``~/.cache/vgpud``."""
    env = os.environ.get("VGPUD_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "vgpud"


# --------------------------------------------------------------------------------------------
# What each architecture needs


@dataclass(frozen=True)
class _QemuSpec:
    packages: tuple[str, ...]  # sid packages whose Depends closure is downloaded
    binary: str  # usr/bin/<binary>
    firmware_dirs: tuple[str, ...]  # relative to the unpacked root, in -L order
    bios: str | None  # relative path of the firmware passed as -bios, if any


@dataclass(frozen=True)
class _ArchSpec:
    arch: str
    debarch: str
    qemu: _QemuSpec
    kernel_meta: str  # metapackage whose first Depends is the real kernel package
    other_kernels: tuple[str, ...] = ()  # suites whose kernel is fetched too (with_kernel)


_SPECS: dict[str, _ArchSpec] = {
    "x86_64": _ArchSpec(
        arch="x86_64",
        debarch="amd64",
        qemu=_QemuSpec(
            packages=("qemu-system-x86", "seabios"),
            binary="qemu-system-x86_64",
            firmware_dirs=("usr/share/qemu", "usr/share/seabios", "usr/lib/ipxe/qemu"),
            bios=None,
        ),
        kernel_meta="linux-image-amd64",
        other_kernels=("trixie", "sid"),
    ),
    "aarch64": _ArchSpec(
        arch="aarch64",
        debarch="arm64",
        qemu=_QemuSpec(
            packages=("qemu-system-arm", "qemu-efi-aarch64"),
            binary="qemu-system-aarch64",
            firmware_dirs=("usr/share/qemu", "usr/share/qemu-efi-aarch64"),
            bios="usr/share/qemu-efi-aarch64/QEMU_EFI.fd",
        ),
        kernel_meta="linux-image-arm64",
    ),
}


# --------------------------------------------------------------------------------------------
# The loaded view used by tests


@dataclass(frozen=True)
class Assets:
    """Everything a test needs to boot a guest of one architecture."""

    arch: str
    qemu_root: Path
    #: argv prefix that runs QEMU (loader, library path, binary, then ``-L`` firmware dirs).
    qemu_cmd_prefix: list[str]
    #: extra environment for QEMU (module dir of the unpacked tree).
    qemu_env: dict[str, str]
    firmware_dir: Path
    #: ``-bios`` image (aarch64 UEFI), None when the machine's default firmware is used.
    bios: Path | None
    kernel: Path
    busybox: Path
    versions: dict[str, str] = field(default_factory=dict)
    #: the guest kernel's modules (GUEST_MODULES and their dependencies) in load order.
    kernel_modules: list[Path] = field(default_factory=list)
    #: the Debian suite the kernel comes from (:meth:`with_kernel`).
    kernel_suite: str = DEFAULT_KERNEL
    #: the other suites' kernels: suite -> (vmlinuz, modules in load order, version).
    other_kernels: dict[str, tuple[Path, list[Path], str]] = field(default_factory=dict)
    #: libvirt, which runs on this host whatever the guest's arch: see :class:`Libvirt`.
    libvirt: Libvirt | None = None
    #: the kernel's nvgrace-gpu-vfio-pci.ko per guest kernel suite (x86_64 only).
    nvgrace_modules: dict[str, Path] = field(default_factory=dict)

    def with_kernel(self, suite: str) -> Assets:
        """These assets with ``suite``'s kernel (one of :data:`KERNEL_SUITES` for the arch)."""
        if suite == self.kernel_suite:
            return self
        kernel, modules, version = self.other_kernels[suite]
        return dataclasses.replace(
            self,
            kernel=kernel,
            kernel_modules=modules,
            kernel_suite=suite,
            versions={**self.versions, "kernel": version},
        )

    @classmethod
    def load(cls, cache_dir: Path | None = None, arch: str = "x86_64") -> Assets:
        """Read the fetched assets; raise :class:`AssetsMissingError` if any is absent."""
        spec = _spec(arch)
        base = (cache_dir or default_cache_dir()) / arch
        manifests: dict[str, dict[str, Any]] = {}
        for name in ("qemu", "kernel", "busybox", *_kernel_dirs(spec)):
            manifest = _read_manifest(base / name)
            if manifest is None:
                raise AssetsMissingError(
                    f"e2e asset {arch}/{name} is not in {base.parent} "
                    f"(run `make assets` or `python -m tests.e2e.assets fetch --arch {arch}`)"
                )
            manifests[name] = manifest
        libvirt_manifest = _read_manifest(base.parent / "libvirt")
        if libvirt_manifest is None:
            raise AssetsMissingError(
                f"e2e asset libvirt is not in {base.parent} "
                f"(run `make assets` or `python -m tests.e2e.assets fetch --arch {arch}`)"
            )
        root = base / "qemu" / "root"
        versions = {
            "qemu": str(manifests["qemu"].get("version", "?")),
            "kernel": str(manifests["kernel"].get("version", "?")),
            "busybox": str(manifests["busybox"].get("version", "?")),
        }
        kernels = {
            suite: _load_kernel(base / _kernel_dir(suite), arch)
            for suite in (DEFAULT_KERNEL, *spec.other_kernels)
        }
        kernel, modules = kernels.pop(DEFAULT_KERNEL)
        nvgrace_modules = {
            suite: _load_nvgrace_module(base, suite, manifests[_kernel_dir(suite)])
            for suite in (NVGRACE_MODULE_KERNELS if arch == "x86_64" else ())
        }
        busybox = base / "busybox" / "busybox"
        for path in (busybox, root / "usr/bin" / spec.qemu.binary):
            if not path.is_file():
                raise AssetsMissingError(_missing(path, arch))
        return cls(
            arch=arch,
            qemu_root=root,
            qemu_cmd_prefix=qemu_cmd_prefix(root, spec.qemu),
            qemu_env={"QEMU_MODULE_DIR": str(root / "usr/lib" / HOST_MULTIARCH / "qemu")},
            firmware_dir=root / spec.qemu.firmware_dirs[0],
            bios=root / spec.qemu.bios if spec.qemu.bios else None,
            kernel=kernel,
            busybox=busybox,
            versions=versions,
            kernel_modules=modules,
            libvirt=Libvirt.load(base.parent / "libvirt", libvirt_manifest),
            nvgrace_modules=nvgrace_modules,
            other_kernels={
                suite: (*files, str(manifests[_kernel_dir(suite)].get("version", "?")))
                for suite, files in kernels.items()
            },
        )


@dataclass(frozen=True)
class Libvirt:
    """The unpacked sid libvirt: ``root`` (binaries and libraries, run through their own
    loader like QEMU) and ``share`` (what libvirt reads from /usr/share: its CPU map)."""

    directory: Path
    version: str

    @property
    def root(self) -> Path:
        return self.directory / "root"

    @property
    def share(self) -> Path:
        return self.directory / "share"

    @property
    def driver_dir(self) -> Path:
        """libvirtd's QEMU driver module (it dlopens it; LIBVIRT_DRIVER_DIR)."""
        return self.root / "usr/lib" / HOST_MULTIARCH / "libvirt/connection-driver"

    def command(self, program: str) -> list[str]:
        """argv prefix running ``program`` (``usr/sbin/libvirtd``, ``usr/bin/virsh``)."""
        return _loader_prefix(self.root, program)

    @classmethod
    def load(cls, directory: Path, manifest: dict[str, Any]) -> Libvirt:
        libvirt = cls(directory, str(manifest.get("version", "?")))
        for path in (
            libvirt.root / "usr/sbin/libvirtd",
            libvirt.root / "usr/bin/virsh",
            libvirt.driver_dir / "libvirt_driver_qemu.so",
            libvirt.share / "libvirt/cpu_map/index.xml",
        ):
            if not path.is_file():
                raise AssetsMissingError(
                    f"{path} is missing (run `python -m tests.e2e.assets fetch --refresh`)"
                )
        return libvirt


def _kernel_dir(suite: str) -> str:
    return "kernel" if suite == DEFAULT_KERNEL else f"kernel-{suite}"


def _kernel_dirs(spec: _ArchSpec) -> list[str]:
    return [_kernel_dir(suite) for suite in spec.other_kernels]


def _load_kernel(directory: Path, arch: str) -> tuple[Path, list[Path]]:
    kernel = directory / "vmlinuz"
    order = directory / "modules" / MODULES_ORDER
    modules = _read_modules_order(order) if order.is_file() else []
    for path in (kernel, order, *modules):
        if not path.is_file():
            raise AssetsMissingError(_missing(path, arch))
    return kernel, modules


def _nvgrace_module_dir(suite: str) -> str:
    return f"nvgrace-module-{suite}"


def _load_nvgrace_module(base: Path, suite: str, kernel_manifest: dict[str, Any]) -> Path:
    """The module built for ``suite``'s kernel, if it was built for the kernel there now."""
    directory = base / _nvgrace_module_dir(suite)
    manifest = _read_manifest(directory)
    module = directory / kernel_module.MODULE_NAME
    if manifest is None or manifest.get("kernel") != kernel_manifest.get("version"):
        raise AssetsMissingError(
            f"e2e asset x86_64/{directory.name} for kernel {kernel_manifest.get('version')} "
            f"is not in {base.parent} (run `make assets`)"
        )
    if not module.is_file():
        raise AssetsMissingError(_missing(module, "x86_64"))
    return module


def _missing(path: Path, arch: str) -> str:
    return f"{path} is missing (run `python -m tests.e2e.assets fetch --arch {arch} --refresh`)"


def kernel_suites(arch: str) -> tuple[str, ...]:
    """The Debian suites whose kernel a guest of ``arch`` can boot (:meth:`Assets.with_kernel`)."""
    return (DEFAULT_KERNEL, *_spec(arch).other_kernels)


def qemu_cmd_prefix(root: Path, qemu: _QemuSpec) -> list[str]:
    """argv prefix running the unpacked QEMU with its own loader and libraries."""
    argv = _loader_prefix(root, f"usr/bin/{qemu.binary}")
    for fw in qemu.firmware_dirs:
        if (root / fw).is_dir():
            argv += ["-L", str(root / fw)]
    return argv


def _loader_prefix(root: Path, program: str) -> list[str]:
    """argv prefix running ``root/program`` through ``root``'s own dynamic loader and
    libraries (sid's glibc, never bookworm's)."""
    libdirs = [
        root / "usr/lib" / HOST_MULTIARCH,
        root / "lib" / HOST_MULTIARCH,
        root / "usr/lib" / HOST_MULTIARCH / "systemd",
    ]
    return [
        str(root / "usr/lib" / HOST_MULTIARCH / "ld-linux-x86-64.so.2"),
        "--library-path",
        ":".join(str(d) for d in libdirs if d.is_dir()),
        str(root / program),
    ]


def _spec(arch: str) -> _ArchSpec:
    try:
        return _SPECS[arch]
    except KeyError:
        raise ValueError(f"unknown arch {arch!r} (known: {', '.join(ARCHES)})") from None


def _read_manifest(directory: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((directory / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("format") != ASSET_FORMATS[directory.name]:
        return None
    return data


def _read_modules_order(order: Path) -> list[Path]:
    """The module files named by a ``modules.order`` file, in that order."""
    return [order.parent / name for name in order.read_text().split()]


# --------------------------------------------------------------------------------------------
# Private apt roots


class _Apt:
    """apt-get/apt-cache confined to ``root`` (no system config, lists, status or cache)."""

    def __init__(self, root: Path, suites: Sequence[tuple[str, str]], debarch: str) -> None:
        self.root = root
        self.name = root.name
        self.suites = suites
        self.debarch = debarch
        self.archives = root / "cache" / "archives"
        self._updated = False

    def setup(self) -> None:
        for sub in ("state/lists/partial", "cache/archives/partial"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        status = self.root / "state" / "status"
        if not status.exists():
            status.touch()
        sources = "".join(
            f"deb [signed-by={KEYRING}] {uri} {suite} main\n" for uri, suite in self.suites
        )
        (self.root / "sources.list").write_text(sources)
        # Read by apt before anything else (APT_CONFIG); switching off Dir::Etc::Parts and
        # Dir::Etc::Main keeps the host's hooks (docker-clean, packagekit…) out of our runs.
        conf = f"""\
Dir::Etc::Main "/dev/null";
Dir::Etc::Parts "/dev/null";
Dir::Etc::SourceParts "/dev/null";
Dir::Etc::Preferences "/dev/null";
Dir::Etc::PreferencesParts "/dev/null";
Dir::Etc::SourceList "{self.root}/sources.list";
Dir::State "{self.root}/state";
Dir::State::status "{status}";
Dir::Cache "{self.root}/cache";
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
Dir::Log "{self.root}/log";
Debug::NoLocking "true";
APT::Architecture "{self.debarch}";
APT::Architectures {{ "{self.debarch}"; }};
APT::Install-Recommends "false";
APT::Install-Suggests "false";
APT::Get::Assume-Yes "true";
APT::Sandbox::User "{_sandbox_user()}";
Acquire::Languages "none";
# Signatures are still checked; only the Valid-Until freshness is not, because the build
# machines reach the archive through a snapshot mirror whose Release files have "expired".
Acquire::Check-Valid-Until "false";
Acquire::Check-Date "false";
Acquire::Retries "3";
Acquire::http::Timeout "60";
"""
        (self.root / "apt.conf").write_text(conf)

    def run(
        self,
        tool: str,
        *args: str,
        asset: str,
        step: str,
        cwd: Path | None = None,
        merge_stderr: bool = False,
    ) -> str:
        env = dict(os.environ, APT_CONFIG=str(self.root / "apt.conf"), LC_ALL="C.UTF-8")
        env.pop("DEBIAN_FRONTEND", None)
        cmd = [tool, *args]
        try:
            proc = subprocess.run(
                cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=900, check=False
            )
        except FileNotFoundError:
            raise AssetError(asset, step, f"{tool} not found (needs a Debian host)") from None
        except subprocess.TimeoutExpired:
            raise AssetError(asset, step, f"`{' '.join(cmd)}` timed out") from None
        if proc.returncode != 0:
            errors = [
                line
                for line in (proc.stderr + proc.stdout).splitlines()
                if line.startswith(("E:", "Err:", "W:")) or "rror" in line
            ] or (proc.stderr + proc.stdout).strip().splitlines()[-5:]
            raise AssetError(
                asset,
                step,
                f"`{' '.join(cmd)}` (apt root {self.root}) exited {proc.returncode}: "
                + " | ".join(errors[-6:]),
            )
        return proc.stdout + proc.stderr if merge_stderr else proc.stdout

    def update(self, asset: str) -> None:
        if self._updated:
            return
        self.setup()
        step = f"apt-get update ({self.name})"
        out = self.run("apt-get", "update", asset=asset, step=step, merge_stderr=True)
        # apt-get update exits 0 when an index could not be fetched; that is fatal for us.
        failed = [line for line in out.splitlines() if line.startswith(("Err:", "W: Failed", "E:"))]
        if failed:
            raise AssetError(asset, step, " | ".join(failed[:4]))
        self._updated = True

    def dependencies(self, package: str, asset: str) -> list[tuple[str, str]]:
        """(name, version or "") of each Depends of ``package``'s candidate (the first of each
        alternative)."""
        out = self.run(
            "apt-cache",
            "show",
            "--no-all-versions",
            package,
            asset=asset,
            step=f"resolve {package}",
        )
        match = re.search(r"^Depends: (.*)$", out, re.M)
        if not match:
            raise AssetError(asset, f"resolve {package}", "no Depends field in apt-cache show")
        found = []
        for alternatives in match.group(1).split(","):
            dep = re.match(r"\s*([^\s|(]+)(?: \(= ([^)]+)\))?", alternatives)
            if dep:
                found.append((dep.group(1), dep.group(2) or ""))
        return found

    def kernel_packages(self, meta: str, asset: str) -> tuple[str, str, list[str]]:
        """The kernel image package ``meta`` stands for, its version, and the packages that
        hold its files: the image itself up to trixie; since sid's 7.x kernels the image is
        split into linux-binary (vmlinuz), linux-modules and linux-base (config, module
        lists), on which it depends."""
        image = next(
            (
                (name, version)
                for name, version in self.dependencies(meta, asset)
                if re.fullmatch(r"linux-image-\d\S*", name)
            ),
            None,
        )
        if image is None:
            raise AssetError(asset, f"resolve {meta}", "no linux-image-<release> among its Depends")
        parts = [
            name
            for name, _ in self.dependencies(image[0], asset)
            if re.fullmatch(r"linux-(binary|modules|base)-\d\S*", name)
        ]
        return image[0], image[1], parts or [image[0]]

    def version_of(self, package: str, asset: str) -> str:
        out = self.run(
            "apt-cache",
            "show",
            "--no-all-versions",
            package,
            asset=asset,
            step=f"resolve {package}",
        )
        match = re.search(r"^Version: (\S+)", out, re.M)
        return match.group(1) if match else "?"

    def closure(self, packages: Sequence[str], asset: str) -> list[Path]:
        """Download ``packages`` and their whole Depends closure; return the .deb paths."""
        step = f"resolve {' '.join(packages)}"
        plan = self.run("apt-get", "install", "-s", *packages, asset=asset, step=step)
        debs = []
        for match in re.finditer(r"^Inst (\S+) \((\S+) .*\[(\S+)\]\)", plan, re.M):
            name, version, debarch = match.groups()
            debs.append(self.archives / f"{name}_{version.replace(':', '%3a')}_{debarch}.deb")
        if not debs:
            raise AssetError(asset, step, "apt planned no packages")
        self.run(
            "apt-get",
            "install",
            "--download-only",
            *packages,
            asset=asset,
            step=f"download {' '.join(packages)}",
        )
        missing = [d.name for d in debs if not d.is_file()]
        if missing:
            raise AssetError(asset, "download", f"apt did not leave {', '.join(missing)}")
        return debs

    def download(self, package: str, asset: str) -> Path:
        """``apt-get download`` one package into the archive cache; return the .deb."""
        before = set(self.archives.glob("*.deb"))
        out = self.run(
            "apt-get",
            "download",
            "--print-uris",
            package,
            asset=asset,
            step=f"resolve {package}",
        )
        uris = [line.split() for line in out.splitlines() if line.startswith("'")]
        if not uris:
            raise AssetError(asset, f"resolve {package}", "apt printed no download URI")
        target = self.archives / uris[0][1]
        if target.is_file():
            return target
        # apt-get download writes into the current directory; a partial file is named
        # *.FAILED or left in partial/ by apt, never under the final name.
        self.run(
            "apt-get",
            "download",
            package,
            asset=asset,
            step=f"download {package}",
            cwd=self.archives,
        )
        if not target.is_file():
            new = sorted(set(self.archives.glob("*.deb")) - before)
            raise AssetError(asset, f"download {package}", f"expected {target.name}, got {new}")
        return target


def _print_progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _sandbox_user() -> str:
    # apt drops to _apt for downloads when root; _apt cannot enter a 0700 home directory.
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "root"


# --------------------------------------------------------------------------------------------
# Fetching


class Fetcher:
    """Fetches missing assets into ``cache_dir``; see the module docstring."""

    def __init__(
        self, cache_dir: Path, *, refresh: bool = False, log: Callable[[str], None] | None = None
    ) -> None:
        self.cache_dir = cache_dir
        self.refresh = refresh
        self._log = log or _print_progress
        self._apts: dict[str, _Apt] = {}

    def apt(self, suite: str, debarch: str) -> _Apt:
        key = f"{suite}-{debarch}"
        if key not in self._apts:
            suites: list[tuple[str, str]]
            if suite == "sid":
                suites = [(DEBIAN_MIRROR, "sid")]
            else:
                suites = [
                    (DEBIAN_MIRROR, suite),
                    (DEBIAN_MIRROR, f"{suite}-updates"),
                    (DEBIAN_SECURITY, f"{suite}-security"),
                ]
            self._apts[key] = _Apt(self.cache_dir / "apt" / key, suites, debarch)
        return self._apts[key]

    def fetch(self, arch: str) -> Assets:
        spec = _spec(arch)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        with _locked(self.cache_dir / ".lock"):
            base = self.cache_dir / arch
            base.mkdir(exist_ok=True)
            self._asset(base / "qemu", f"{arch}/qemu", lambda d: self._build_qemu(spec, d))
            for suite in kernel_suites(arch):
                name = _kernel_dir(suite)
                build = functools.partial(self._build_kernel, spec, suite=suite)
                self._asset(base / name, f"{arch}/{name}", build)
            for suite in NVGRACE_MODULE_KERNELS if arch == "x86_64" else ():
                kernel = _read_manifest(base / _kernel_dir(suite)) or {}
                module_dir = base / _nvgrace_module_dir(suite)
                built = _read_manifest(module_dir)
                if built is not None and built.get("kernel") != kernel.get("version"):
                    shutil.rmtree(module_dir)  # built for the kernel asset before this one
                build_module = functools.partial(
                    self._build_nvgrace_module, suite=suite, kernel=kernel
                )
                self._asset(module_dir, f"x86_64/{module_dir.name}", build_module)
            self._asset(base / "busybox", f"{arch}/busybox", lambda d: self._build_busybox(spec, d))
            self._asset(self.cache_dir / "libvirt", "libvirt", self._build_libvirt)
        assets = Assets.load(self.cache_dir, arch)
        _verify_qemu(assets, f"{arch}/qemu")
        return assets

    def _asset(self, final: Path, asset: str, build: Callable[[Path], dict[str, Any]]) -> None:
        if _read_manifest(final) is not None and not self.refresh:
            self._log(f"assets: {asset}: present ({final})")
            return
        started = time.monotonic()
        self._log(f"assets: {asset}: fetching …")
        for stale in final.parent.glob(f".{final.name}.*"):  # left by a killed fetch
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
        tmp.chmod(0o755)
        try:
            manifest: dict[str, Any] = build(tmp)
            manifest["format"] = ASSET_FORMATS[final.name]
            manifest["fetched_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
            old = final.with_name(f".{final.name}.old")
            if final.exists():
                shutil.rmtree(old, ignore_errors=True)
                final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old, ignore_errors=True)
            for apt in self._apts.values():  # unpacked now; keep only apt's lists
                for deb in apt.archives.glob("*.deb"):
                    deb.unlink()
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self._log(
            f"assets: {asset}: {manifest.get('version', '')} in {time.monotonic() - started:.1f} s"
        )

    def _build_qemu(self, spec: _ArchSpec, out: Path) -> dict[str, Any]:
        asset = f"{spec.arch}/qemu"
        # QEMU itself always runs on this (x86_64) host: the sid amd64 root serves both arches.
        apt = self.apt("sid", "amd64")
        apt.update(asset)
        debs = apt.closure(spec.qemu.packages, asset)
        root = out / "root"
        root.mkdir()
        for deb in debs:
            _run(["dpkg-deb", "-x", str(deb), str(root)], asset, f"unpack {deb.name}")
        for unneeded in _PRUNE:  # docs and the 64 MiB AAVMF pflash images (385 MB)
            shutil.rmtree(root / unneeded, ignore_errors=True)
        loader = root / "usr/lib" / HOST_MULTIARCH / "ld-linux-x86-64.so.2"
        binary = root / "usr/bin" / spec.qemu.binary
        for path in (loader, binary):
            if not path.is_file():
                raise AssetError(asset, "unpack", f"{path.relative_to(root)} missing")
        if spec.qemu.bios and not (root / spec.qemu.bios).is_file():
            raise AssetError(asset, "unpack", f"{spec.qemu.bios} missing")
        prefix = qemu_cmd_prefix(root, spec.qemu)
        version = _verify_qemu_prefix(prefix, asset, out)
        return {
            "version": version,
            "packages": sorted(d.name for d in debs),
            "download_bytes": sum(d.stat().st_size for d in debs),
        }

    def _build_kernel(self, spec: _ArchSpec, out: Path, suite: str) -> dict[str, Any]:
        asset = f"{spec.arch}/{_kernel_dir(suite)}"
        apt = self.apt(suite, spec.debarch)
        apt.update(asset)
        package, version, parts = apt.kernel_packages(spec.kernel_meta, asset)
        debs = [apt.download(part, asset) for part in parts]
        # Two streaming passes over the packages (about 2 s each): the first keeps the kernel
        # and its config and reads every module's depends=, the second writes only the
        # modules needed. Nothing else of their 400 MB is ever written out.
        found: dict[str, _Module] = {}
        builtin: set[str] = set()
        release = ""
        for deb in debs:
            for member, data in _module_files(deb, asset, lambda name: True):
                vmlinuz = _VMLINUZ.fullmatch(member)
                if vmlinuz:
                    release = vmlinuz.group(1) or vmlinuz.group(2)
                    (out / "vmlinuz").write_bytes(data)
                elif _KERNEL_CONFIG.fullmatch(member):
                    (out / "config").write_bytes(data)
                elif member.endswith("/modules.builtin"):
                    builtin = {_module_name(Path(line).stem) for line in data.decode().split()}
                elif member.endswith(".ko"):
                    module = _Module.parse(member, data, asset)
                    found[module.name] = module
        if not release:
            names = ", ".join(deb.name for deb in debs)
            raise AssetError(asset, "unpack", f"no vmlinuz in {names}")
        order = _load_order(GUEST_MODULES, found, builtin, asset)
        modules = out / "modules"
        modules.mkdir()
        wanted = {found[name].member: found[name].filename for name in order}
        for deb in debs:
            for member, data in _module_files(deb, asset, wanted.__contains__):
                (modules / wanted.pop(member)).write_bytes(data)
        if wanted:
            raise AssetError(asset, "unpack", f"second pass missed {sorted(wanted)}")
        filenames = [found[name].filename for name in order]
        (modules / MODULES_ORDER).write_text("".join(f"{name}\n" for name in filenames))
        return {
            "version": f"{release} ({version})",
            "package": package,
            "download_bytes": sum(deb.stat().st_size for deb in debs),
            "modules": filenames,
        }

    def _build_nvgrace_module(
        self, out: Path, suite: str, kernel: dict[str, Any]
    ) -> dict[str, Any]:
        asset = f"x86_64/{_nvgrace_module_dir(suite)}"
        try:
            release, version = kernel_module.kernel_release(kernel)
        except kernel_module.ModuleBuildError as exc:
            raise AssetError(asset, exc.step, str(exc)) from None
        kernel_apt = self.apt(suite, "amd64")
        kernel_apt.update(asset)
        source = kernel_apt.download(kernel_module.source_package(version), asset)
        headers = kernel_apt.download(kernel_module.headers_package(release), asset)
        bookworm = self.apt("bookworm", "amd64")
        bookworm.update(asset)
        tools = [bookworm.download(package, asset) for package in kernel_module.BUILD_TOOLS]
        symvers_member = f"/linux-headers-{release}/Module.symvers"
        symvers = [
            data
            for _, data in _deb_files(headers, asset, lambda name: name.endswith(symvers_member))
        ]
        if len(symvers) != 1:
            raise AssetError(asset, "unpack", f"{headers.name} has no {symvers_member}")
        work = Path(tempfile.mkdtemp(prefix=".nvgrace-build.", dir=self.cache_dir))
        try:
            env = kernel_module.unpack_tools(tools, work / "tools")
            config = self.cache_dir / "x86_64" / _kernel_dir(suite) / "config"
            pahole = kernel_module.fake_pahole(config, work / "pahole")
            tree = kernel_module.extract_source(source, work)
            kernel_module.configure(tree, config, env, pahole)
            module = kernel_module.build(tree, env, pahole, release, symvers[0])
            data = module.read_bytes()
        except kernel_module.ModuleBuildError as exc:
            raise AssetError(asset, exc.step, str(exc)) from None
        finally:
            shutil.rmtree(work, ignore_errors=True)
        modinfo = _elf_section(data, b".modinfo") or b""
        if f"vermagic={release} ".encode() not in modinfo:
            raise AssetError(asset, "verify", f"the module's vermagic is not {release}'s")
        (out / kernel_module.MODULE_NAME).write_bytes(data)
        debs = [source, headers, *tools]
        return {
            "version": f"{release} ({version})",
            "kernel": kernel.get("version"),
            "download_bytes": sum(deb.stat().st_size for deb in debs),
        }

    def _build_libvirt(self, out: Path) -> dict[str, Any]:
        asset = "libvirt"
        apt = self.apt("sid", "amd64")  # the host's arch, as for QEMU
        apt.update(asset)
        debs = apt.closure(LIBVIRT_PACKAGES, asset)
        root = out / "root"
        root.mkdir()
        for deb in debs:
            _run(["dpkg-deb", "-x", str(deb), str(root)], asset, f"unpack {deb.name}")
        (root / "usr/share/libvirt").rename(_mkdir(out / "share") / "libvirt")
        for unneeded in _LIBVIRT_PRUNE:
            shutil.rmtree(root / unneeded, ignore_errors=True)
        for binary in (root / "usr/bin").glob("qemu-*"):
            binary.unlink()
        libvirt = Libvirt(out, "?")
        out_text = _run([*libvirt.command("usr/sbin/libvirtd"), "--version"], asset, "verify")
        match = re.search(r"\(libvirt\) (\S+)", out_text)
        if not match:
            raise AssetError(asset, "verify", f"unexpected libvirtd --version: {out_text!r}")
        return {
            "version": match.group(1),
            "packages": sorted(d.name for d in debs),
            "download_bytes": sum(d.stat().st_size for d in debs),
        }

    def _build_busybox(self, spec: _ArchSpec, out: Path) -> dict[str, Any]:
        asset = f"{spec.arch}/busybox"
        apt = self.apt("bookworm", spec.debarch)
        apt.update(asset)
        deb = apt.download("busybox-static", asset)
        unpack = out / "unpack"
        unpack.mkdir()
        _run(["dpkg-deb", "-x", str(deb), str(unpack)], asset, f"unpack {deb.name}")
        binary = unpack / "bin" / "busybox"
        if not binary.is_file():
            raise AssetError(asset, "unpack", "bin/busybox missing from busybox-static")
        binary.rename(out / "busybox")
        shutil.rmtree(unpack)
        if spec.arch == platform.machine():
            _run([str(out / "busybox"), "true"], asset, "run busybox")
        return {
            "version": apt.version_of("busybox-static", asset),
            "download_bytes": deb.stat().st_size,
        }


def _verify_qemu(assets: Assets, asset: str) -> str:
    return _verify_qemu_prefix(assets.qemu_cmd_prefix, asset, None, assets.qemu_env)


def _verify_qemu_prefix(
    prefix: list[str], asset: str, cwd: Path | None, env: dict[str, str] | None = None
) -> str:
    """Run ``--version`` and ``-device help``; return the version string."""
    full_env = dict(os.environ, **(env or {}))
    version_out = _run([*prefix, "--version"], asset, "verify (qemu --version)", env=full_env)
    first = version_out.strip().splitlines()[0] if version_out.strip() else ""
    match = re.search(r"version (\S+)", first)
    if not match:
        raise AssetError(asset, "verify (qemu --version)", f"unexpected output {first!r}")
    devices = _run([*prefix, "-device", "help"], asset, "verify (-device help)", env=full_env)
    if '"vfio-user-pci"' not in devices:
        raise AssetError(asset, "verify", f"QEMU {match.group(1)} has no vfio-user-pci device")
    return first.removeprefix("QEMU emulator version ").strip()


def _mkdir(path: Path) -> Path:
    path.mkdir()
    return path


def _run(cmd: list[str], asset: str, step: str, env: dict[str, str] | None = None) -> str:
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=300, check=False, env=env
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise AssetError(asset, step, str(exc)) from None
    if proc.returncode != 0:
        tail = " | ".join(proc.stderr.strip().splitlines()[-4:])
        raise AssetError(asset, step, f"`{cmd[-1]}` exited {proc.returncode}: {tail}")
    return proc.stdout


def _deb_files(deb: Path, asset: str, want: Callable[[str], bool]) -> Iterator[tuple[str, bytes]]:
    """(member name, contents) of each regular file of ``deb`` for which ``want`` is true."""
    step = f"unpack {deb.name}"
    with subprocess.Popen(
        ["dpkg-deb", "--fsys-tarfile", str(deb)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    ) as proc:
        assert proc.stdout is not None and proc.stderr is not None
        try:
            with tarfile.open(fileobj=proc.stdout, mode="r|") as tar:
                for info in tar:
                    if info.isfile() and want(info.name):
                        reader = tar.extractfile(info)
                        assert reader is not None  # regular files always have one
                        yield info.name, reader.read()
        except tarfile.TarError as exc:
            proc.kill()
            raise AssetError(asset, step, f"dpkg-deb --fsys-tarfile: {exc}") from None
        proc.stdout.read()  # to the end, so that dpkg-deb exits by itself
        stderr = proc.stderr.read().decode(errors="replace")
        if proc.wait() != 0:
            raise AssetError(asset, step, f"dpkg-deb exited {proc.returncode}: {stderr.strip()}")


def _module_files(
    deb: Path, asset: str, want: Callable[[str], bool]
) -> Iterator[tuple[str, bytes]]:
    """:func:`_deb_files` of a kernel package, its xz-compressed modules (trixie's) given
    uncompressed under their ``.ko`` name: busybox's insmod loads only plain ELF files."""

    def plain(name: str) -> str:
        return name.removesuffix(".xz") if name.endswith(".ko.xz") else name

    for member, data in _deb_files(deb, asset, lambda name: want(plain(name))):
        if not member.endswith(".ko.xz"):
            yield member, data
            continue
        try:
            elf = lzma.decompress(data)
        except lzma.LZMAError as exc:
            raise AssetError(asset, "unpack", f"{member}: {exc}") from None
        yield plain(member), elf


def _module_name(stem: str) -> str:
    # The kernel treats - and _ in module names alike (depends= keeps the file's dashes).
    return stem.replace("-", "_")


@dataclass(frozen=True)
class _Module:
    name: str  # normalised (_module_name)
    member: str  # path in the package
    depends: tuple[str, ...]  # normalised names

    @property
    def filename(self) -> str:
        return Path(self.member).name

    @classmethod
    def parse(cls, member: str, data: bytes, asset: str) -> _Module:
        modinfo = _elf_section(data, b".modinfo")
        if modinfo is None:
            raise AssetError(asset, "read modules", f"{member} has no .modinfo section")
        depends: tuple[str, ...] = ()
        for entry in modinfo.split(b"\0"):
            if entry.startswith(b"depends="):
                value = entry.removeprefix(b"depends=").decode()
                depends = tuple(_module_name(d) for d in value.split(",") if d)
        return cls(_module_name(Path(member).stem), member, depends)


def _elf_section(data: bytes, wanted: bytes) -> bytes | None:
    """The contents of section ``wanted`` of a little-endian ELF64 file (x86_64, arm64)."""
    if data[:6] != b"\x7fELF\x02\x01":
        return None
    (shoff,) = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)

    def header(index: int) -> tuple[int, int, int]:
        base = shoff + index * shentsize
        (name,) = struct.unpack_from("<I", data, base)
        offset, size = struct.unpack_from("<QQ", data, base + 0x18)
        return name, offset, size

    _, strtab, _ = header(shstrndx)
    for index in range(shnum):
        name, offset, size = header(index)
        if data[strtab + name : data.index(b"\0", strtab + name)] == wanted:
            return data[offset : offset + size]
    return None


def _load_order(
    roots: Iterable[str], found: dict[str, _Module], builtin: set[str], asset: str
) -> list[str]:
    """``roots`` and everything they depend on, each after its dependencies (built-in modules
    are left out: there is nothing to load)."""
    order: list[str] = []
    visiting: set[str] = set()

    def visit(name: str, needed_by: str) -> None:
        if name in order or name in builtin:
            return
        if name in visiting:
            raise AssetError(asset, "module order", f"dependency cycle through {name}")
        if name not in found:
            raise AssetError(
                asset, "module order", f"{name} ({needed_by}) is neither a .ko nor built in"
            )
        visiting.add(name)
        for dependency in found[name].depends:
            visit(dependency, f"needed by {name}")
        visiting.discard(name)
        order.append(name)

    for root in roots:
        visit(_module_name(root), "wanted")
    return order


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# --------------------------------------------------------------------------------------------
# Command line


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.e2e.assets", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    fetch = sub.add_parser("fetch", help="fetch what is missing (idempotent)")
    fetch.add_argument("--arch", choices=ARCHES, action="append", help="default: x86_64")
    fetch.add_argument("--all", action="store_true", help="every architecture")
    fetch.add_argument("--refresh", action="store_true", help="re-fetch even if present")
    fetch.add_argument("--cache-dir", type=Path, default=None)
    show = sub.add_parser("show", help="print the loaded assets as JSON")
    show.add_argument("--arch", choices=ARCHES, default="x86_64")
    show.add_argument("--cache-dir", type=Path, default=None)
    args = parser.parse_args(argv)
    cache = args.cache_dir or default_cache_dir()
    if args.command == "show":
        try:
            assets = Assets.load(cache, args.arch)
        except AssetsMissingError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        print(json.dumps(vars(assets), indent=2, default=str))
        return 0
    arches = list(ARCHES) if args.all else (args.arch or ["x86_64"])
    fetcher = Fetcher(cache, refresh=args.refresh)
    started = time.monotonic()
    for arch in arches:
        try:
            assets = fetcher.fetch(arch)
        except (AssetError, AssetsMissingError) as exc:
            print(f"error: e2e assets: {exc}", file=sys.stderr)
            return 2
        except OSError as exc:
            print(f"error: e2e assets ({arch}): {exc}", file=sys.stderr)
            return 2
        others = "".join(
            f" (and {suite}'s {version})" for suite, (*_, version) in assets.other_kernels.items()
        )
        libvirt = f", libvirt {assets.libvirt.version}" if assets.libvirt else ""
        print(
            f"assets: {arch} ready in {cache}: QEMU {assets.versions['qemu']}, "
            f"kernel {assets.versions['kernel']}{others}, busybox {assets.versions['busybox']}"
            f"{libvirt}",
            file=sys.stderr,
        )
    print(f"assets: done in {time.monotonic() - started:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
