"""The runner's NumPy FPFH (``m3dm_runner.fpfh``) against the pipeline's Open3D FPFH on a preprocessed dataset.

    python benchmarks/fpfh_check.py PREPROCESSED_FOLDER [--img_size 224]

For every part (train, validation and test) of every class: the normals (share of points bit-identical, against
Open3D's ``estimate_normals`` as the pipeline calls it), the per-point histograms (largest absolute
difference, share of points bit-identical) and the pooled ``(28², 33)`` patches the banks see (largest absolute
and relative difference), with both implementations' times. Results are in benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def open3d_normals(points: np.ndarray) -> np.ndarray:
    from m3dm.features.fpfh import FPFHParams
    from m3dm.runtime import import_open3d

    o3d = import_open3d("the check")
    params = FPFHParams()
    cloud = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(np.asarray(points, dtype=np.float64)))
    cloud.estimate_normals(o3d.geometry.KDTreeSearchParamHybrid(radius=params.normal_radius,
                                                                max_nn=params.normal_max_nn))
    return np.asarray(cloud.normals)


def runner_normals(points: np.ndarray) -> np.ndarray:
    from m3dm_runner import fpfh as runner

    params = runner.FPFHParams()
    points = np.asarray(points, dtype=np.float64)
    near = runner.hybrid_search(points, params.feature_radius, params.feature_max_nn)  # as fpfh_of_points
    return runner.estimate_normals(points, near.narrowed(params.normal_radius, params.normal_max_nn))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--img_size", type=int, default=224)
    args = parser.parse_args()
    from m3dm.app.parts import discover_parts, load_part
    from m3dm.features import fpfh as pipeline
    from m3dm_runner import fpfh as runner
    from m3dm_runner.pointops import valid_points

    folders = sorted(p for p in args.folder.glob("*/*/*") if (p / "rgb").is_dir())
    parts = discover_parts([str(f) for f in folders], [], [])
    print("| part | points | normals bit-identical | points bit-identical "
          "| histogram, largest abs. difference | patches, largest abs. "
          "difference | patches, largest rel. difference | Open3D (s) | NumPy (s) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for part in parts:
        cloud = load_part(part, args.img_size).pc
        points, pixels = valid_points(cloud.numpy())
        start = time.perf_counter()
        expected = pipeline.fpfh_of_points(points)
        expected_patches = pipeline.FPFHFeatures()(cloud).numpy()
        o3d_time = time.perf_counter() - start
        start = time.perf_counter()
        got = runner.fpfh_of_points(points)
        got_patches = runner.fpfh_patches(points, pixels, args.img_size, 28, aligned=False)
        numpy_time = time.perf_counter() - start
        rows = np.abs(got - expected).max(axis=1)
        normals_same = (open3d_normals(points) == runner_normals(points)).all(axis=1).mean()
        patch_diff = np.abs(got_patches - expected_patches)
        relative = patch_diff.max() / np.abs(expected_patches).max()
        assert part.xyz is not None
        label = "/".join((*part.xyz.parts[-4:-2], part.xyz.stem))  # <split>/<defect>/<stem>
        print(f"| {label} | {len(points)} | {normals_same:.4f} "
              f"| {(rows == 0).mean():.4f} | {rows.max():.3g} | {patch_diff.max():.3g} "
              f"| {relative:.3g} | {o3d_time:.2f} | {numpy_time:.2f} |", flush=True)


if __name__ == "__main__":
    main()
