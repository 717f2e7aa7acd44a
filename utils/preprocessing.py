"""Preprocess raw MVTec 3D-AD into a new dataset root (the reference's script name; ``m3dm-preprocess``).

    python utils/preprocessing.py datasets/mvtec3d            # writes datasets/mvtec3d_preprocessed
    python utils/preprocessing.py SRC --output_root DST --workers 2
The work is done by ``m3dm.app.preprocess``.
"""

import sys

from m3dm.app.preprocess import mvtec_main as main

if __name__ == "__main__":
    sys.exit(main())
