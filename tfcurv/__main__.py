"""``python -m tfcurv``: the ``tfcurv`` command (see :mod:`tfcurv.cli`)."""

import sys

from tfcurv.cli import main

sys.exit(main())
