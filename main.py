"""M3DM: fit and evaluate per class (MVTec 3D-AD, Eyecandies, or the built-in synthetic data with --demo).

Same flags and defaults as the reference's main.py (see docs/quirks.md for --fix_quirks), plus --classes,
--device, --batch_size, --num_workers, --output_dir, checkpoint paths, --random_init, --demo and -v/-q. Installed
as the ``m3dm`` command; the work is done by ``m3dm.app.cli``.
"""

import sys

from m3dm.app.cli import main

if __name__ == "__main__":
    sys.exit(main())
