"""``python -m asarm.train`` and ``torchrun -m asarm.train``: the same as ``asarm train``."""

import sys

from .cli import main

sys.exit(main())
