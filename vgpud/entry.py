"""The ``vgpud`` command's entry point, kept free of imports.

Importing the CLI (trio, structlog, cffi, the device model) takes about a quarter of a second
here. A Ctrl-C in that window used to print a KeyboardInterrupt traceback, because
:func:`vgpud.cli.main` only catches it once it runs; catching it around the import gives the
same quiet exit status 130 at any moment. A SIGUSR2 (upgrade) or SIGUSR1 (status) in that
window used to kill a starting daemon, their default action; they are blocked from here
until the daemon takes them (vgpud.signals.EarlySignals) or the command turns out not to be
``serve`` (vgpud.cli.main). Only the interpreter's own start-up, before this runs, is left.
"""

from __future__ import annotations

import signal
from collections.abc import Sequence

INTERRUPTED = 130  # 128 + SIGINT, as shells report it


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``vgpud`` (see :func:`vgpud.cli.main`)."""
    # vgpud.signals.DEFERRED_SIGNALS, named here so as to import nothing first.
    signal.pthread_sigmask(signal.SIG_BLOCK, (signal.SIGUSR1, signal.SIGUSR2))
    try:
        from vgpud import cli  # noqa: PLC0415 (deferred on purpose: see above)
    except KeyboardInterrupt:
        return INTERRUPTED
    return cli.main(argv)
