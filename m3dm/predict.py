"""``python -m m3dm.predict``: score new parts with a saved class model (see m3dm.app.predict)."""

import sys

from m3dm.app.predict import main

if __name__ == "__main__":
    sys.exit(main())
