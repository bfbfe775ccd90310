"""Guest initramfs: busybox-static plus a generated ``/init``, as a gzip'd newc cpio.

Built in pure Python (no root, no cpio tool): device nodes are just cpio headers.

The guest speaks to the host only through the serial console, one fact per line::

    VGTEST <key>=<value>            a value the host asserts on
    VGTEST-CHECK <name> PASS|FAIL <detail>
    VGTEST-DONE rc=<n>              the script finished (then ``poweroff -f``)

Test inputs come from the kernel command line (``vg.<name>=<value>`` → shell variable
``VG_<NAME>``, exported), so one initramfs can serve several boots; the test body itself is a
shell snippet built with :class:`GuestScript`. Kernel modules given to
:func:`build_initramfs` are loaded, in order, before the body runs.

A VFIO guest (``Harness.boot(..., vfio=True)``) also has ``vg_vfio_bind``, which hands the
device to the guest kernel's vfio-pci, and ``vg_host_chroot`` / ``vg_host_python``, which run a
module of this repository with the host's own Python inside ``chroot /host``.
"""

from __future__ import annotations

import gzip
import io
import re
import shlex
import stat
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

RESULT_PREFIX = "VGTEST"

# Shell helpers available to every test body. ash (busybox sh) does 64-bit arithmetic.
GUEST_LIB = r"""
vg_kv() { echo "VGTEST $1=$2"; }
vg_check() {  # name, condition-result (0 = pass), detail
    if [ "$2" = 0 ]; then echo "VGTEST-CHECK $1 PASS $3"; else echo "VGTEST-CHECK $1 FAIL $3"; fi
}
hex() { printf '0x%x' "$1"; }

# vg_find_dev VENDOR: sets BDF and DEV (sysfs dir) to the first PCI function of that vendor.
vg_find_dev() {
    BDF=""
    for d in /sys/bus/pci/devices/*; do
        if [ "$(cat "$d/vendor")" = "$1" ]; then BDF=${d##*/}; DEV=$d; return 0; fi
    done
    return 1
}

# vg_bar N: sets BAR_START BAR_END BAR_FLAGS BAR_SIZE from sysfs "resource" line N.
vg_bar() {
    set -- $(sed -n "$(($1 + 1))p" "$DEV/resource")
    BAR_START=$(($1)); BAR_END=$(($2)); BAR_FLAGS=$(($3))
    if [ "$BAR_END" -gt 0 ]; then BAR_SIZE=$((BAR_END - BAR_START + 1)); else BAR_SIZE=0; fi
}

# vg_read KEY ADDR WIDTH: devmem read, printed as VGTEST KEY=0x...
vg_read() {
    v=$(devmem "$(hex "$2")" "$3" 2>&1) || v="ERR:$v"
    vg_kv "$1" "$(echo $v | tr 'A-F' 'a-f')"
}
# vg_write ADDR WIDTH VALUE
vg_write() { devmem "$(hex "$1")" "$2" "$3"; }

# vg_describe: ids, class and every BAR of $DEV.
vg_describe() {
    vg_kv bdf "$BDF"
    for f in vendor device subsystem_vendor subsystem_device class revision; do
        vg_kv "$f" "$(cat "$DEV/$f")"
    done
    for n in 0 1 2 3 4 5 6; do
        vg_bar $n
        vg_kv "bar$n" "$(hex $BAR_START),$(hex $BAR_SIZE),$(hex $BAR_FLAGS)"
    done
    vg_kv config "$(head -c 256 "$DEV/config" | od -An -tx1 -v | tr -d ' \n')"
}

# vg_vfio_bind [DRIVER]: hands $BDF (from vg_find_dev) to DRIVER (default vfio-pci; any VFIO
# driver, e.g. nvgrace_gpu_vfio_pci) and sets VFIO_GROUP. Needs a VFIO guest: the vfio
# modules, and a vIOMMU, since this kernel has no no-IOMMU mode. Binding and the /dev/vfio
# node are synchronous in the kernel, so both are checked once, not polled.
vg_vfio_bind() {
    want=${1:-vfio-pci}
    if [ ! -e "$DEV/iommu_group" ]; then
        vg_kv vfio_error "$BDF has no iommu_group (no vIOMMU, or intel_iommu=on missing)"
        return 1
    fi
    VFIO_GROUP=$(basename "$(readlink "$DEV/iommu_group")")
    if [ -e "$DEV/driver" ]; then echo "$BDF" > "$DEV/driver/unbind"; fi
    echo "$want" > "$DEV/driver_override"
    echo "$BDF" > /sys/bus/pci/drivers_probe
    driver=$(basename "$(readlink "$DEV/driver" || echo none)")  # unbound: report, not set -e
    if [ "$driver" != "$want" ]; then
        vg_kv vfio_error "$BDF is bound to '$driver', not $want"
        return 1
    fi
    if [ ! -c "/dev/vfio/$VFIO_GROUP" ]; then
        vg_kv vfio_error "/dev/vfio/$VFIO_GROUP did not appear ($(ls /dev/vfio))"
        return 1
    fi
    vg_kv vfio_group "$VFIO_GROUP"
}

# vg_host_chroot: the host's / (read-only virtio-9p, tag "host") at /host, with this guest's
# proc, sys and dev, and writable tmpfs on /run and /dev/shm where programs create files and
# sockets (the host's /tmp, read-only like the rest, stays visible). cache=loose: what the
# guest reads (the repository, the venv, /usr) does not change during a test, and caching it makes
# `import vgpud.cli, trio` take 5.5 s instead of 7.8 s under TCG (3.9 s instead of 9.4 s again).
vg_host_chroot() {
    mkdir -p /host
    mount -t 9p -o trans=virtio,version=9p2000.L,ro,cache=loose host /host
    mount -t proc proc /host/proc
    mount -t sysfs sysfs /host/sys
    mount -t devtmpfs devtmpfs /host/dev
    mkdir -p /dev/shm  # the same devtmpfs as /host/dev
    # Writable scratch space on /run and /dev/shm only: the host's /tmp stays visible, since
    # the repository and its venv may live there (a CI clone under /tmp).
    for d in /host/run /host/dev/shm; do mount -t tmpfs tmpfs "$d"; done
}

# vg_host_python MODULE ARGS...: python -m MODULE of the host's repository ($VG_REPO) with
# the host's interpreter ($VG_PYTHON) inside /host. Its output goes to the serial console, so
# it reports with the same VGTEST lines; the device is in VG_BDF and VG_VFIO_GROUP.
vg_host_python() {
    HOME=/run TMPDIR=/run PYTHONPATH="$VG_REPO" PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
        VG_BDF="$BDF" VG_VFIO_GROUP="$VFIO_GROUP" \
        chroot /host "$VG_PYTHON" -m "$@"
}
"""

INIT = r"""#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys /dev /tmp /run /sbin /usr/bin /usr/sbin
/bin/busybox --install -s
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
# vg.foo_bar=1 on the kernel command line becomes VG_FOO_BAR=1
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        vg.*=*)
            k=${arg%%=*}; k=${k#vg.}; v=${arg#*=}
            k=$(echo "$k" | tr 'a-z.-' 'A-Z__')
            eval "export VG_$k=\$v"  # exported: vg_host_python's programs read them too
            ;;
    esac
done
. /vglib.sh
echo "VGTEST boot=$(cut -d" " -f1 /proc/uptime)"
echo "VGTEST kernel=$(uname -r)"
# -x: a failing run's serial log shows every command up to the one that failed
( set -ex; . /vgmodules.sh; . /vgtest.sh )
rc=$?
echo "VGTEST-DONE rc=$rc"
sync
poweroff -f
"""


@dataclass
class _Entry:
    name: str
    mode: int
    data: bytes = b""
    rdev: tuple[int, int] = (0, 0)


def _newc(entries: Iterable[_Entry]) -> bytes:
    out = io.BytesIO()

    def pad() -> None:
        out.write(b"\0" * (-out.tell() % 4))

    ino = 1
    for entry in [*entries, _Entry("TRAILER!!!", 0)]:
        name = entry.name.encode() + b"\0"
        fields = (
            ino if entry.name != "TRAILER!!!" else 0,
            entry.mode,
            0,  # uid
            0,  # gid
            2 if stat.S_ISDIR(entry.mode) else 1,
            0,  # mtime: reproducible images
            len(entry.data),
            0,
            0,
            entry.rdev[0],
            entry.rdev[1],
            len(name),
            0,
        )
        out.write(b"070701" + b"".join(b"%08X" % f for f in fields))
        out.write(name)
        pad()
        out.write(entry.data)
        pad()
        ino += 1
    return out.getvalue()


MODULE_DIR = "lib/modules"


def build_initramfs(
    busybox: Path,
    test_body: str,
    extra_files: dict[str, bytes] | None = None,
    modules: Sequence[Path] = (),
) -> bytes:
    """gzip'd newc cpio with busybox, /init, the helper library and ``test_body``.

    ``extra_files`` maps paths (subdirectories are created) to contents; ``modules`` are
    kernel modules that /init loads with insmod, in this order, before the test body.
    """
    dirs = ["bin", "dev", "proc", "sys", "tmp", "run", "sbin", "usr", "usr/bin", "usr/sbin"]
    files = {name.lstrip("/"): data for name, data in (extra_files or {}).items()}
    load = ""
    for module in modules:
        files[f"{MODULE_DIR}/{module.name}"] = module.read_bytes()
        load += f"insmod /{MODULE_DIR}/{module.name}\n"
    if modules:
        load += 'vg_kv modules_loaded "$(cut -d" " -f1 /proc/uptime)"\n'
    for name in files:  # parents first, each once: the kernel's unpacker does not create them
        parts = name.split("/")[:-1]
        dirs += [p for p in ("/".join(parts[: i + 1]) for i in range(len(parts))) if p not in dirs]
    entries = [_Entry(d, stat.S_IFDIR | 0o755) for d in dirs]
    entries += [
        _Entry("dev/console", stat.S_IFCHR | 0o600, rdev=(5, 1)),
        _Entry("dev/null", stat.S_IFCHR | 0o666, rdev=(1, 3)),
        _Entry("bin/busybox", stat.S_IFREG | 0o755, busybox.read_bytes()),
        _Entry("bin/sh", stat.S_IFLNK | 0o777, b"busybox"),
        _Entry("init", stat.S_IFREG | 0o755, INIT.encode()),
        _Entry("vglib.sh", stat.S_IFREG | 0o644, GUEST_LIB.encode()),
        _Entry("vgmodules.sh", stat.S_IFREG | 0o644, load.encode()),
        _Entry("vgtest.sh", stat.S_IFREG | 0o644, test_body.encode()),
    ]
    entries += [_Entry(name, stat.S_IFREG | 0o644, data) for name, data in files.items()]
    return gzip.compress(_newc(entries), compresslevel=1, mtime=0)


# --------------------------------------------------------------------------------------------
# Test bodies and their results


@dataclass
class GuestScript:
    """A test body assembled from small steps; :meth:`render` gives the shell text."""

    lines: list[str] = field(default_factory=list)

    def raw(self, text: str) -> GuestScript:
        self.lines.append(text)
        return self

    def find_device(self, vendor: int = 0x10DE) -> GuestScript:
        return self.raw(
            f"vg_find_dev {vendor:#06x} || {{ vg_kv device_found no; exit 1; }}\n"
            "vg_kv device_found yes"
        )

    def wait_for_device(self, within_s: int, vendor: int = 0x10DE) -> GuestScript:
        """Like :meth:`find_device`, for a device hot-added while the script runs: polls
        sysfs (pciehp adds it on the slot's presence event) for up to ``within_s``."""
        tries = within_s * 5
        return self.raw(
            f"vg_tries=0; until vg_find_dev {vendor:#06x}; do\n"
            f"  vg_tries=$((vg_tries + 1))\n"
            f"  if [ $vg_tries -gt {tries} ]; then vg_kv device_found no; exit 1; fi\n"
            "  sleep 0.2\n"
            "done\n"
            "vg_kv device_found yes"
        )

    def describe(self) -> GuestScript:
        return self.raw("vg_describe")

    def enable(self) -> GuestScript:
        return self.raw('echo 1 > "$DEV/enable"\nvg_kv enabled "$(cat "$DEV/enable")"')

    def bar_base(self, bar: int) -> GuestScript:
        """Set shell variable BAR<n> to the BAR's guest-physical address."""
        return self.raw(f"vg_bar {bar}; BAR{bar}=$BAR_START")

    def read(self, key: str, bar: int, offset: int, width: int = 32) -> GuestScript:
        _check_key(key)
        return self.raw(f"vg_read {key} $((BAR{bar} + {offset:#x})) {width}")

    def write(self, bar: int, offset: int, value: int, width: int = 32) -> GuestScript:
        return self.raw(f"vg_write $((BAR{bar} + {offset:#x})) {width} {value:#x}")

    def kv(self, key: str, shell_value: str) -> GuestScript:
        _check_key(key)
        return self.raw(f"vg_kv {key} {shlex.quote(shell_value)}")

    # -- VFIO guest (Harness.boot(..., vfio=True)) -------------------------------------------

    def vfio_bind(self, driver: str = "vfio-pci") -> GuestScript:
        """Bind the device found by :meth:`find_device` to ``driver`` (a VFIO driver, by its
        sysfs name); VGTEST vfio_group=N."""
        if not re.fullmatch(r"[A-Za-z0-9_-]+", driver):
            raise ValueError(f"bad driver name {driver!r}")
        return self.raw(f"vg_vfio_bind {driver}")

    def host_chroot(self) -> GuestScript:
        """Mount the host's / read-only at /host, ready for :meth:`host_python`."""
        return self.raw("vg_host_chroot")

    def host_python(self, module: str, *args: str) -> GuestScript:
        """``python -m module args`` from the host's repository, inside ``chroot /host``.

        Each of ``args`` is one double-quoted shell word, so guest variables expand
        (``"$BDF"``, ``"$VFIO_GROUP"``) but nothing is split. The program also finds the device
        in its environment (``VG_BDF``, ``VG_VFIO_GROUP``) and any test input ``vg.x`` as
        ``VG_X``. A non-zero exit ends the guest script with that rc.
        """
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.]*", module):
            raise ValueError(f"bad module name {module!r}")
        words = ["vg_host_python", module, *(_double_quoted(arg) for arg in args)]
        return self.raw(" ".join(words))

    def render(self) -> str:
        return "\n".join(self.lines) + "\n"


def _double_quoted(word: str) -> str:
    return '"' + re.sub(r'(["\\`])', r"\\\1", word) + '"'


def _check_key(key: str) -> None:
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", key):
        raise ValueError(f"bad result key {key!r}")


@dataclass
class GuestResults:
    """What the guest printed: values, checks, and whether it finished."""

    values: dict[str, str] = field(default_factory=dict)
    checks: dict[str, tuple[bool, str]] = field(default_factory=dict)
    done_rc: int | None = None
    boots: int = 0

    @classmethod
    def parse(cls, serial: str) -> GuestResults:
        results = cls()
        for raw_line in serial.splitlines():
            line = raw_line.strip("\r")
            if line.startswith("VGTEST-DONE "):
                match = re.search(r"rc=(\d+)", line)
                results.done_rc = int(match.group(1)) if match else -1
            elif line.startswith("VGTEST-CHECK "):
                parts = line.split(" ", 3)
                if len(parts) >= 3:
                    results.checks[parts[1]] = (
                        parts[2] == "PASS",
                        parts[3] if len(parts) > 3 else "",
                    )
            elif line.startswith("VGTEST "):
                key, _, value = line[len("VGTEST ") :].partition("=")
                if key == "boot":
                    results.boots += 1
                results.values[key] = value
        return results

    def as_int(self, key: str) -> int:
        return int(self.values[key], 0)

    def bar(self, n: int) -> tuple[int, int, int]:
        """(guest address, size, sysfs flags) of BAR n."""
        start, size, flags = (int(x, 16) for x in self.values[f"bar{n}"].split(","))
        return start, size, flags
