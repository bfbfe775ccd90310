"""The ``vgpud`` command's entry point, kept free of imports.

Importing the CLI (trio, structlog, cffi, the device model) takes about a quarter of a second
here. A Ctrl-C in that window used to print a KeyboardInterrupt traceback, because
:func:`vgpud.cli.main` only catches it once it runs; catching it around the import gives the
same quiet exit status 130 at any moment.
"""

from __future__ import annotations

from collections.abc import Sequence

INTERRUPTED = 130  # 128 + SIGINT, as shells report it


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``vgpud`` (see :func:`vgpud.cli.main`)."""
    try:
        from vgpud import cli  # noqa: PLC0415 (deferred on purpose: see above)
    except KeyboardInterrupt:
        return INTERRUPTED
    return cli.main(argv)
