import sys

from vgpud.cli import main

sys.exit(main())
