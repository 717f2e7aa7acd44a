"""``python -m m3dm.compare``: several methods on the same classes, one table per metric (see m3dm.app.compare)."""

import sys

from m3dm.app.compare import main

if __name__ == "__main__":
    sys.exit(main())
