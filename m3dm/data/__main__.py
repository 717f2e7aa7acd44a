"""``python -m m3dm.data check ROOT``: a shim, like ``m3dm.predict``; the command line is
``m3dm.app.dataset_check``."""

import sys

from m3dm.app.dataset_check import main

if __name__ == "__main__":
    sys.exit(main())
