"""``python -m tfcurv``: the ``tfcurv`` command (see :mod:`tfcurv.cli`)."""

import sys

from tfcurv.cli import main

if __name__ == "__main__":
    sys.exit(main())
