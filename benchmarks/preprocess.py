"""Throughput of MVTec 3D-AD preprocessing at the real resolution (800x800), against the reference algorithm.

    python benchmarks/preprocess.py [--samples 8] [--size 800] [--baseline_samples 1]

Prints samples/second for 1 worker and for all cores, the projected time for the whole of MVTec 3D-AD
(about 4,150 clouds), and the same per-sample pipeline run the reference's way (Open3D DBSCAN, serial) for a
ratio measured in the same run.
"""

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from m3dm.data.io import read_organized_pc
from m3dm.data.synthetic import write_mvtec3d
from m3dm.preprocess import mvtec3d as prep
from m3dm.preprocess.common import default_workers

MVTEC3D_CLOUDS = 4150


def reference_style_seconds(xyz_path: Path) -> float:
    """One sample the reference's way: same steps, Open3D's DBSCAN (full radius neighbourhoods)."""
    import open3d as o3d
    from PIL import Image

    start = time.perf_counter()
    cloud = read_organized_pc(xyz_path)
    rgb = np.array(Image.open(str(xyz_path).replace("xyz", "rgb").replace(".tiff", ".png")))
    plane = prep.fit_background_plane(prep.edge_band_points(cloud))
    cloud, rgb = prep.remove_plane(cloud, rgb, plane)
    cloud = prep.pad_to_square(cloud)
    points = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(cloud[prep.valid_mask(cloud)].astype(np.float64)))
    np.asarray(points.cluster_dbscan(eps=prep.DBSCAN_EPS, min_points=prep.DBSCAN_MIN_POINTS))
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--size", type=int, default=800)
    parser.add_argument("--baseline_samples", type=int, default=1)
    args = parser.parse_args()
    cores = default_workers()
    with tempfile.TemporaryDirectory() as tmp:
        source = write_mvtec3d(Path(tmp) / "raw", classes=("gadget",), size=args.size, n_train=args.samples,
                               n_val=0, n_test_good=0, n_test_defect=0, progress=False)
        rates = {}
        for workers in sorted({1, cores}):
            summary = prep.preprocess_dataset(source, Path(tmp) / f"out{workers}", workers=workers)
            assert summary.processed == args.samples and not summary.errors, summary.report()
            rates[workers] = summary.processed / summary.seconds
        xyz = sorted(source.rglob("*.tiff"))[: args.baseline_samples]
        baseline = np.mean([reference_style_seconds(p) for p in xyz])
    print(f"\nMVTec 3D-AD preprocessing, {args.size}x{args.size}, {args.samples} synthetic samples, {cores} cores")
    for workers, rate in rates.items():
        print(f"  {workers} worker(s): {rate:.2f} samples/s ({1 / rate:.2f} s/sample); whole dataset "
              f"({MVTEC3D_CLOUDS} clouds): {MVTEC3D_CLOUDS / rate / 60:.1f} min")
    print(f"  reference-style (Open3D DBSCAN, 1 process): {baseline:.2f} s/sample; whole dataset "
          f"{MVTEC3D_CLOUDS * baseline / 3600:.1f} h")
    print(f"  speed-up vs reference: {baseline * rates[1]:.1f}x (1 worker), {baseline * rates[cores]:.1f}x "
          f"({cores} workers)")


if __name__ == "__main__":
    main()
