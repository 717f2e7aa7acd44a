"""Shared fixtures: small synthetic datasets (built once per test session) and the real-data location."""

from pathlib import Path

import pytest

from m3dm.data.synthetic import write_eyecandies, write_mvtec3d

PROJECT_ROOT = Path(__file__).resolve().parents[1]
REAL_MVTEC_SUBSET = PROJECT_ROOT.parent / "shared" / "data" / "mvtec3d_cable_gland_subset"


@pytest.fixture(scope="session")
def raw_mvtec(tmp_path_factory) -> Path:
    """Raw synthetic MVTec 3D-AD: one class, 96 px, 3 train / 1 validation / 1 good + 1 per defect test."""
    root = tmp_path_factory.mktemp("raw") / "mvtec3d"
    return write_mvtec3d(root, classes=("gadget",), size=96, n_train=3, n_val=1, n_test_good=1,
                         n_test_defect=1, progress=False)


@pytest.fixture(scope="session")
def raw_eyecandies(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("raw") / "eyecandies"
    return write_eyecandies(root, classes=("CandyCane",), size=96, n_train=2, n_test=4, progress=False)


@pytest.fixture
def real_mvtec_subset() -> Path:
    if not (REAL_MVTEC_SUBSET / "cable_gland").is_dir():
        pytest.skip(f"real MVTec 3D-AD samples not found at {REAL_MVTEC_SUBSET}")
    return REAL_MVTEC_SUBSET
