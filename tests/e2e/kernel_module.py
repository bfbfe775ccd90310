"""The kernel's own ``nvgrace-gpu-vfio-pci`` module, built for an x86_64 guest kernel of the
e2e assets (trixie's 6.12, sid's 7.x): the reference tests/e2e/test_kernel_driver.py holds
vgpud's variant against.

Debian builds the driver for no architecture (``CONFIG_NVGRACE_GPU_VFIO_PCI`` is unset in
trixie's and sid's kernels, arm64 included, and the driver is arm64-only unless
``COMPILE_TEST``), so the e2e assets build it: from Debian's ``linux-source-<series>`` of
exactly the version of the ``kernel-<suite>`` asset, configured with that kernel's own config
plus the driver, against that kernel's ``Module.symvers`` (from its ``linux-headers``
package), so that the guest's kernel loads it as one of its own modules (same vermagic, same
symbol CRCs where the kernel has them, same ``struct module`` layout: :data:`LAYOUT_CONFIG`
is checked). Nothing of the kernel tree is kept but the ``.ko``.

Two changes to the source, both in the build directory only: the driver's Kconfig ``depends on
ARM64 || (COMPILE_TEST && 64BIT)`` becomes ``depends on 64BIT`` (``COMPILE_TEST`` would drop
``MODVERSIONS`` and so the CRCs), and ``MODULE_SIG_ALL`` is off (nothing to sign with; the
guest kernel loads unsigned modules, tainting itself). The driver's code is the kernel's, as
Debian ships it.

Build tools the kernel needs and the host may not have (flex and bison for Kconfig, m4 for
both, libelf and OpenSSL headers for objtool and the certificate tools) come from bookworm as
``.deb`` files unpacked into the build directory, never installed; gcc and make are the
host's. pahole is only asked its version (:func:`fake_pahole`): without a pahole as new as the
kernel's, Kconfig drops ``DEBUG_INFO_BTF``, which changes ``struct module``, and the module
fails to load ("Invalid relocation target, existing value is nonzero", seen with 6.12).
Measured on the 2-core build machine: 70-85 s, 164 MB downloaded, per kernel (session 24).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

MODULE_NAME = "nvgrace-gpu-vfio-pci.ko"
DRIVER_DIR = "drivers/vfio/pci/nvgrace-gpu"
# bookworm packages unpacked for the build (see the module docstring); each one alone, not
# its Depends closure: the host has the C library and the rest of the toolchain.
BUILD_TOOLS = ("flex", "bison", "m4", "libelf-dev", "libelf1", "libssl-dev", "libssl3")
KCONFIG_DEPENDS = "depends on ARM64 || (COMPILE_TEST && 64BIT)"
# What of the source tree the build reads: every Kconfig file (Kconfig parses them all), the
# build system, the headers, x86 and the driver. About 210 MB of the tree's 1.4 GB.
SOURCE_PARTS = (
    "Makefile",
    "include/*",
    "arch/x86/*",
    "scripts/*",
    "tools/*",
    "certs/*",
    "security/*",
    "kernel/*",
    "init/*",
    "usr/*",
    "rust/*",
    "drivers/vfio/*",
    "*/Kconfig*",
    "*/Makefile*",
    "*/Kbuild*",
)
# Symbols that shape what the module must match (``struct module``'s fields, symbol CRCs,
# vermagic): the configured tree must set each as the kernel's own config does.
LAYOUT_CONFIG = (
    "CONFIG_MODVERSIONS",
    "CONFIG_DEBUG_INFO_BTF",
    "CONFIG_DEBUG_INFO_BTF_MODULES",
    "CONFIG_MODULE_SIG",
    "CONFIG_MODULE_UNLOAD",
    "CONFIG_SMP",
    "CONFIG_PREEMPT_DYNAMIC",
    "CONFIG_VFIO_PCI_CORE",
)
BUILD_TIMEOUT = 1800.0  # seconds, per make step; a hang guard only


class ModuleBuildError(Exception):
    """A step failed; ``step`` names it and the message carries the tool's last lines."""

    def __init__(self, step: str, detail: str) -> None:
        super().__init__(detail)
        self.step = step


def kernel_release(kernel_manifest: dict[str, Any]) -> tuple[str, str]:
    """(release, Debian version) of a kernel asset's manifest, e.g. ("6.12.117+deb13-amd64",
    "6.12.117-1") from its version "6.12.117+deb13-amd64 (6.12.117-1)"."""
    match = re.fullmatch(r"(\S+) \((\S+)\)", str(kernel_manifest.get("version", "")))
    if not match:
        raise ModuleBuildError("kernel version", f"unexpected {kernel_manifest.get('version')!r}")
    return match.group(1), match.group(2)


def source_package(debian_version: str) -> str:
    """``linux-source-6.12=6.12.117-1`` for Debian version 6.12.117-1."""
    series = ".".join(debian_version.split(".")[:2])
    return f"linux-source-{series}={debian_version}"


def headers_package(release: str) -> str:
    return f"linux-headers-{release}"


def unpack_tools(debs: list[Path], root: Path) -> dict[str, str]:
    """Unpack the build tools under ``root``; the environment that makes the build use them."""
    for deb in debs:
        _run(["dpkg-deb", "-x", str(deb), str(root)], f"unpack {deb.name}")
    usr = root / "usr"
    multiarch = usr / "lib" / "x86_64-linux-gnu"
    return {
        "PATH": f"{usr / 'bin'}:{os.environ.get('PATH', '/usr/bin:/bin')}",
        # flex and bison run m4; bison finds its skeletons by this, not by its prefix.
        "M4": str(usr / "bin" / "m4"),
        "BISON_PKGDATADIR": str(usr / "share" / "bison"),
        # Read by gcc for every compile and link, the kernel's host programs included.
        "C_INCLUDE_PATH": f"{usr / 'include'}:{usr / 'include' / 'x86_64-linux-gnu'}",
        "LIBRARY_PATH": str(multiarch),
        "LD_LIBRARY_PATH": str(multiarch),
    }


def extract_source(source_deb: Path, work: Path) -> Path:
    """The parts of the kernel tree the build reads (:data:`SOURCE_PARTS`); its directory."""
    listing = _run(["dpkg-deb", "-c", str(source_deb)], "list the source package")
    tarballs = re.findall(r"\./(usr/src/linux-source-[\d.]+\.tar\.xz)$", listing, re.M)
    if not tarballs:
        raise ModuleBuildError("unpack the source", f"no source tarball in {source_deb.name}")
    _run(["dpkg-deb", "-x", str(source_deb), str(work / "deb")], "unpack the source package")
    tarball = work / "deb" / str(tarballs[0])
    top = tarball.name.removesuffix(".tar.xz")
    patterns = [f"{top}/{part}" if not part.startswith("*") else part for part in SOURCE_PARTS]
    _run(["tar", "-xJf", str(tarball), "-C", str(work), "--wildcards", *patterns], "extract")
    shutil.rmtree(work / "deb")
    return work / top


def fake_pahole(kernel_config: Path, directory: Path) -> Path:
    """A ``pahole`` that only tells the version the kernel was configured with.

    Kconfig turns BTF (and with it fields of ``struct module``) on or off by pahole's version
    alone, and the module's own BTF is never generated here (that needs the kernel's
    vmlinux, which a module build does not have: kbuild skips the step). So the version
    the kernel's build saw, ``CONFIG_PAHOLE_VERSION``, is all the build needs of pahole."""
    match = re.search(r"^CONFIG_PAHOLE_VERSION=(\d+)$", kernel_config.read_text(), re.M)
    version = int(match.group(1)) if match else 0
    script = directory / "pahole"
    directory.mkdir(parents=True, exist_ok=True)
    # scripts/pahole-version.sh reads "v1.30" as 130; 0 (no pahole) is a failing pahole.
    body = f"echo v{version // 100}.{version % 100}" if version else "exit 1"
    script.write_text(f"#!/bin/sh\n{body}\n")
    script.chmod(0o755)
    return script


def _config_values(text: str) -> dict[str, str]:
    values = {}
    for line in text.splitlines():
        if line.startswith("CONFIG_"):
            name, _, value = line.partition("=")
            values[name] = value
    return values


def configure(tree: Path, kernel_config: Path, env: dict[str, str], pahole: Path) -> None:
    """The kernel's own config, plus the driver; then ``olddefconfig`` with this compiler."""
    kconfig = tree / DRIVER_DIR / "Kconfig"
    text = kconfig.read_text()
    if KCONFIG_DEPENDS not in text:
        raise ModuleBuildError("configure", f"{kconfig.name} no longer says {KCONFIG_DEPENDS!r}")
    kconfig.write_text(text.replace(KCONFIG_DEPENDS, "depends on 64BIT"))
    drop = ("CONFIG_NVGRACE_GPU_VFIO_PCI", "CONFIG_MODULE_SIG_ALL")
    lines = [
        line
        for line in kernel_config.read_text().splitlines()
        if not any(re.match(rf"(# )?{name}[= ]", line) for name in drop)
    ]
    lines += ["CONFIG_NVGRACE_GPU_VFIO_PCI=m", "# CONFIG_MODULE_SIG_ALL is not set"]
    (tree / ".config").write_text("\n".join(lines) + "\n")
    _make(tree, env, pahole, "olddefconfig")
    built = _config_values((tree / ".config").read_text())
    kernel = _config_values(kernel_config.read_text())
    if built.get("CONFIG_NVGRACE_GPU_VFIO_PCI") != "m":
        raise ModuleBuildError("configure", "the configured tree does not build the driver")
    differ = [
        f"{name}={built.get(name, 'unset')} (the kernel's: {kernel.get(name, 'unset')})"
        for name in LAYOUT_CONFIG
        if built.get(name) != kernel.get(name)
    ]
    if differ:
        raise ModuleBuildError("configure", f"the module would not fit: {', '.join(differ)}")


def build(tree: Path, env: dict[str, str], pahole: Path, release: str, symvers: bytes) -> Path:
    """``modules_prepare``, then the driver alone; the ``.ko``."""
    (tree / "Module.symvers").write_bytes(symvers)
    _make(tree, env, pahole, f"KERNELRELEASE={release}", "modules_prepare")
    _make(tree, env, pahole, f"KERNELRELEASE={release}", f"M={DRIVER_DIR}", "modules")
    module = tree / DRIVER_DIR / MODULE_NAME
    if not module.is_file():
        raise ModuleBuildError("build", f"make left no {MODULE_NAME}")
    return module


def _make(tree: Path, env: dict[str, str], pahole: Path, *targets: str) -> None:
    jobs = str(os.cpu_count() or 1)
    # HOSTPKG_CONFIG=false: objtool then links -lelf from LIBRARY_PATH instead of asking a
    # pkg-config that may not be there.
    argv = ["make", "-s", "-C", str(tree), f"-j{jobs}", f"PAHOLE={pahole}", "HOSTPKG_CONFIG=false"]
    _run([*argv, *targets], f"make {targets[-1]}", env=dict(os.environ, **env))


def _run(argv: list[str], step: str, env: dict[str, str] | None = None) -> str:
    try:
        proc = subprocess.run(
            argv, capture_output=True, text=True, timeout=BUILD_TIMEOUT, check=False, env=env
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ModuleBuildError(step, str(exc)) from None
    if proc.returncode != 0:
        tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-6:])
        raise ModuleBuildError(step, f"`{' '.join(argv[:3])} …` exited {proc.returncode}: {tail}")
    return proc.stdout
