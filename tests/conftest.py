"""Shared fixtures: small synthetic datasets (built once per test session) and the real-data location."""

import argparse
import os
from pathlib import Path

import pytest

from m3dm.data.synthetic import write_eyecandies, write_mvtec3d

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def pytest_configure(config):
    """With pytest-xdist (``-n``), each worker process gets its share of the cores for its threads (torch's
    intra-op threads, OpenBLAS's and OpenMP's): two workers each running two threads on two cores would spend their
    time waiting for each other. Measured on a busy 2-core machine: NumPy's ``pinv`` of a 157 x 256 matrix took
    1.6 s of CPU on OpenBLAS's two threads, 0.01 s on one."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        import torch
        from threadpoolctl import threadpool_limits  # scikit-learn's dependency

        threads = max(1, (os.cpu_count() or 1) // workers)
        for variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ[variable] = str(threads)  # the libraries loaded later (Open3D's OpenMP), the processes started
        torch.set_num_threads(threads)
        threadpool_limits(threads)  # those loaded already (NumPy's OpenBLAS)
REAL_MVTEC_SUBSET = PROJECT_ROOT.parent / "shared" / "data" / "mvtec3d_cable_gland_subset"


def preprocessed_mvtec(folder: Path, classes: tuple[str, ...] = ("gadget",), **counts) -> Path:
    """Synthetic MVTec 3D-AD ``classes`` at 96 px (``counts``: n_train, n_val, n_test_good, n_test_defect),
    preprocessed as utils/preprocessing.py does; returns the preprocessed root."""
    from m3dm.preprocess.mvtec3d import preprocess_dataset

    raw = write_mvtec3d(folder / "raw", classes=classes, size=96, progress=False, **counts)
    return preprocess_dataset(raw, workers=1).output


def evaluate_in_process(argv: list[str], forbid_fit: bool = False):
    """``main.py argv`` in this process (it must succeed); returns the ClassResult of its one evaluated class.
    ``forbid_fit``: fitting fails the test (a ``--load_model`` run must not fit)."""
    import main as main_module  # the whole app: only the tests that run it pay for the import
    from m3dm.app.run import ClassRun

    results = []
    evaluate = ClassRun.evaluate

    def no_fit(self):
        raise AssertionError("--load_model must not fit")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ClassRun, "evaluate", lambda self: results.append(evaluate(self)) or results[-1])
        if forbid_fit:
            patch.setattr(ClassRun, "fit", no_fit)
        assert main_module.main(argv) == 0
    (result,) = results
    return result


def reference_fusion_pretrain_args() -> argparse.Namespace:
    """The ``args`` the reference's fusion_pretrain.py pickles into its checkpoints: its flags' defaults and what
    its distributed set-up adds, numbers and strings in an argparse namespace."""
    return argparse.Namespace(
        batch_size=64, epochs=10, accum_iter=1, input_size=224, weight_decay=1.5e-6, lr=0.0005, blr=0.002,
        min_lr=0.0, warmup_epochs=1, data_path="datasets/patch_lib", output_dir="./output_dir",
        log_dir="./output_dir", device="cuda", seed=0, resume="", start_epoch=0, num_workers=10, pin_mem=True,
        world_size=1, local_rank=-1, dist_on_itp=False, dist_url="env://", rank=0, gpu=0, distributed=True,
        dist_backend="nccl")


def random_uff_checkpoint(folder: Path, rgb_dim: int = 192) -> Path:
    """A random-weight UFF block (seeded) in the reference's checkpoint format (model, AdamW and loss-scaler states,
    epoch, the pickled argparse namespace of its flags); 192 is the tiny ViT's RGB width."""
    import torch

    from m3dm.uff.block import FeatureFusionBlock

    torch.manual_seed(1)
    block = FeatureFusionBlock(rgb_dim=rgb_dim)
    optimizer = torch.optim.AdamW(block.parameters(), lr=0.0005, betas=(0.9, 0.95))
    scaler = {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000,
              "_growth_tracker": 0}
    path = folder / "checkpoint-0.pth"
    torch.save({"model": block.state_dict(), "optimizer": optimizer.state_dict(), "epoch": 0, "scaler": scaler,
                "args": reference_fusion_pretrain_args()}, path)
    return path


@pytest.fixture(scope="session")
def uff_checkpoint(tmp_path_factory) -> Path:
    """A random UFF block in the reference's checkpoint format, for the tests of the Fusion methods."""
    return random_uff_checkpoint(tmp_path_factory.mktemp("uff"))


@pytest.fixture(scope="session")
def o3d():
    """Open3D, for the tests that compare with it (they skip without it); imported when such a test first runs
    rather than at collection, where it costs every test process about 1.4 s."""
    return pytest.importorskip("open3d", reason="compared with Open3D, which is not installed")


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
