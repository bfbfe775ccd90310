"""The one thing pyproject.toml cannot say: the optional C fast path for config reads.

``vgpud/server/fast_reads.c`` is compiled (cffi's API mode; needs a C compiler and Python's
headers). It is optional: without a compiler the build goes on and vgpud serves every access
from Python, a little slower (README "Performance"); the daemon logs which at start.
"""

import sys
from pathlib import Path

from setuptools import setup

sys.path.insert(0, str(Path(__file__).parent / "vgpud" / "server"))
from fast_reads_build import ffibuilder

extension = ffibuilder.distutils_extension(tmpdir="build/cffi")
extension.optional = True  # a build without a C compiler still installs (see above)
setup(ext_modules=[extension])
