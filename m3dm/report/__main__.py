"""``python -m m3dm.report``: build the HTML report of saved results (see m3dm.app.report)."""

import sys

from m3dm.app.report import main

if __name__ == "__main__":
    sys.exit(main())
