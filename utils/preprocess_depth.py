"""Convert depth-sensor data (depth images + intrinsics + RGB) into the MVTec 3D-AD layout (``m3dm-preprocess-depth``).

    python utils/preprocess_depth.py datasets/own_depth --depth_scale 0.001 --intrinsics camera.yaml
The work is done by ``m3dm.app.preprocess``.
"""

import sys

from m3dm.app.preprocess import depth_main as main

if __name__ == "__main__":
    sys.exit(main())
