"""Convert raw Eyecandies into the MVTec 3D-AD layout (the reference's script name; ``m3dm-preprocess-eyecandies``).

    python utils/preprocess_eyecandies.py --dataset_path datasets/eyecandies \
        --target_dir datasets/eyecandies_preprocessed
The work is done by ``m3dm.app.preprocess``.
"""

import sys

from m3dm.app.preprocess import eyecandies_main as main

if __name__ == "__main__":
    sys.exit(main())
