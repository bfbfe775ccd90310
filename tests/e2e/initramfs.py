"""Guest initramfs: busybox-static plus a generated ``/init``, as a gzip'd newc cpio.

Built in pure Python (no root, no cpio tool): device nodes are just cpio headers.

The guest speaks to the host only through the serial console, one fact per line::

    VGTEST <key>=<value>            a value the host asserts on
    VGTEST-CHECK <name> PASS|FAIL <detail>
    VGTEST-DONE rc=<n>              the script finished (then ``poweroff -f``)

Test inputs come from the kernel command line (``vg.<name>=<value>`` → shell variable
``VG_<NAME>``), so one initramfs can serve several boots; the test body itself is a shell
snippet built with :class:`GuestScript`.
"""

from __future__ import annotations

import gzip
import io
import re
import shlex
import stat
from collections.abc import Iterable
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
            eval "VG_$k=\$v"
            ;;
    esac
done
. /vglib.sh
echo "VGTEST boot=$(cut -d" " -f1 /proc/uptime)"
# -x: a failing run's serial log shows every command up to the one that failed
( set -ex; . /vgtest.sh )
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


def build_initramfs(
    busybox: Path, test_body: str, extra_files: dict[str, bytes] | None = None
) -> bytes:
    """gzip'd newc cpio with busybox, /init, the helper library and ``test_body``."""
    entries = [
        _Entry(d, stat.S_IFDIR | 0o755)
        for d in ("bin", "dev", "proc", "sys", "tmp", "run", "sbin", "usr", "usr/bin", "usr/sbin")
    ]
    entries += [
        _Entry("dev/console", stat.S_IFCHR | 0o600, rdev=(5, 1)),
        _Entry("dev/null", stat.S_IFCHR | 0o666, rdev=(1, 3)),
        _Entry("bin/busybox", stat.S_IFREG | 0o755, busybox.read_bytes()),
        _Entry("bin/sh", stat.S_IFLNK | 0o777, b"busybox"),
        _Entry("init", stat.S_IFREG | 0o755, INIT.encode()),
        _Entry("vglib.sh", stat.S_IFREG | 0o644, GUEST_LIB.encode()),
        _Entry("vgtest.sh", stat.S_IFREG | 0o644, test_body.encode()),
    ]
    for name, data in (extra_files or {}).items():
        entries.append(_Entry(name.lstrip("/"), stat.S_IFREG | 0o644, data))
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

    def render(self) -> str:
        return "\n".join(self.lines) + "\n"


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
