import sys

from vgpud.entry import main

sys.exit(main())
