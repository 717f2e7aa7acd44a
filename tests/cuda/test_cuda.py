"""The GPU path (docs/gpu.md) against the CPU path. Run on a machine with a CUDA GPU: ``pytest -m cuda``
(these and the CUDA tests that live beside the CPU tests they mirror), or ``bash benchmarks/gpu_check.sh``.

Point ops and searches must give the CPU's answers; the pipeline on CUDA the CPU's metrics to 3 decimals for
every method; models move between devices; UFF pretraining runs with NCCL. Without a GPU every test here is
skipped, saying so (CI has none).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import preprocessed_mvtec

from m3dm.runtime import use_device

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(),
                                 reason="needs a CUDA GPU (none on this machine): run `pytest -m cuda` on a GPU "
                                        "machine")]

ROOT = Path(__file__).resolve().parents[2]
SMALL = ["--rgb_backbone_name", "vit_tiny_patch16_224", "--num_group", "64", "--group_size", "32",
         "--random_init", "--batch_size", "2", "-q"]
METHODS = {"DINO": "single", "Point_MAE": "single", "DINO+Point_MAE": "multiple", "DINO+Point_MAE+add": "single",
           "Fusion": "single", "DINO+Point_MAE+Fusion": "multiple"}


@pytest.fixture(autouse=True)
def exact_float32():
    """What the command lines do once (``runtime.use_device``): the in-process comparisons below need it too."""
    use_device(torch.device("cuda"))


@pytest.fixture
def torch_point_ops(monkeypatch):
    """The pure-PyTorch FPS and kNN on CUDA (the optional extensions are compared separately)."""
    from m3dm.features import pointops

    monkeypatch.setattr(pointops, "_pointnet2_utils", None)
    monkeypatch.setattr(pointops, "_CudaKNN", None)
    return pointops


def clouds(seed: int = 0, sizes=(4000, 5200, 3100)) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 3, generator=generator) for n in sizes]


# ---------------------------------------------------------------------------------------------- point ops

def test_fps_and_knn_on_cuda_equal_the_cpu(torch_point_ops):
    points, lengths = torch_point_ops.pad_clouds(clouds())
    cpu_idx = torch_point_ops.farthest_point_sample(points, 256)
    gpu_idx = torch_point_ops.farthest_point_sample(points.cuda(), 256)
    assert torch.equal(cpu_idx, gpu_idx.cpu())
    centres = torch_point_ops.gather_points(points, cpu_idx)
    cpu_dist, cpu_knn = torch_point_ops.knn(centres, points, 32, lengths=lengths)
    gpu_dist, gpu_knn = torch_point_ops.knn(centres.cuda(), points.cuda(), 32, lengths=lengths.cuda())
    assert torch.equal(cpu_knn, gpu_knn.cpu())  # the same sets, in the same order
    assert torch.equal(cpu_dist, gpu_dist.cpu())


def test_batched_grouping_on_cuda_equals_one_cloud_at_a_time_on_the_cpu(torch_point_ops):
    batch = clouds(1)
    points, lengths = torch_point_ops.pad_clouds([c.cuda() for c in batch])
    neighbourhoods, centres = torch_point_ops.group_points(points, 128, 32, lengths)
    for b, cloud in enumerate(batch):
        alone_n, alone_c = torch_point_ops.group_points(cloud[None], 128, 32)
        assert torch.equal(centres[b].cpu(), alone_c[0])
        assert torch.equal(neighbourhoods[b].cpu(), alone_n[0])


def test_optional_cuda_extensions_agree_with_the_torch_path():
    from m3dm.features import pointops

    if pointops._pointnet2_utils is None and pointops._CudaKNN is None:
        pytest.skip("neither pointnet2_ops nor knn_cuda is installed")
    points = torch.randn(2, 4000, 3, device="cuda")
    idx = pointops.farthest_point_sample(points, 256)
    centres = pointops.gather_points(points, idx)
    _, knn_idx = pointops.knn(centres, points, 32)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pointops, "_pointnet2_utils", None)
        patch.setattr(pointops, "_CudaKNN", None)
        torch_idx = pointops.farthest_point_sample(points, 256)
        _, torch_knn = pointops.knn(centres, points, 32)
    assert torch.equal(idx, torch_idx)
    assert torch.equal(knn_idx.sort(dim=-1).values, torch_knn.sort(dim=-1).values)  # same neighbour sets


# ------------------------------------------------------------------------------------------ memory banks

def bank_rows(rows: int = 6000, dim: int = 96, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(40, dim, generator=generator)
    return centres[torch.randint(0, 40, (rows,), generator=generator)] + 0.3 * torch.randn(rows, dim,
                                                                                           generator=generator)


def test_exact_coreset_on_cuda_selects_the_cpu_indices_in_float32():
    from m3dm.memory.coreset import GreedyCoreset, PlainGreedy

    rows = bank_rows()
    cpu = GreedyCoreset(PlainGreedy(), "cpu", fp16=False).select(rows, 600, random_state=0, progress=False)
    gpu = GreedyCoreset(PlainGreedy(), "cuda", fp16=False).select(rows, 600, random_state=0, progress=False)
    assert torch.equal(cpu, gpu)


def test_default_coreset_on_cuda_against_the_cpu_default_in_float16():
    """The reference keeps the projected bank in float16; the GPU rounds the float16 norms its own way, so equal
    running minima can break the other way: the selections agree from the start and overlap almost entirely
    (the bound documented in docs/gpu.md)."""
    from m3dm.memory.defaults import default_coreset

    rows = bank_rows()
    cpu = default_coreset("cpu").select(rows, 600, random_state=0, progress=False)
    gpu = default_coreset("cuda").select(rows, 600, random_state=0, progress=False)
    first_difference = int((cpu != gpu).nonzero()[0]) if not torch.equal(cpu, gpu) else len(cpu)
    overlap = len(set(cpu.tolist()) & set(gpu.tolist())) / len(cpu)
    print(f"float16 coreset, CUDA vs CPU: first difference at step {first_difference}, overlap {overlap:.4f}")
    assert first_difference >= 50 and overlap >= 0.95


def test_screened_and_plain_search_agree_on_cuda(monkeypatch):
    """The screening's bound holds on CUDA only with IEEE float32 products and float32 sums of bfloat16 products
    (TF32 and reduced-precision bfloat16 reductions off: torch's defaults are not, m3dm.runtime's
    exact_float32_on_cuda sets them for every CUDA run); with them off, the screening must run (not fall back to
    the plain path, which would pass this test without testing it) and give the plain path's answer."""
    from m3dm.memory.screened import ScreenedBank
    from m3dm.memory.search import ExactSearch

    bank = bank_rows(20000, 768).cuda()
    queries = bank[torch.randint(0, len(bank), (3000,))] + 0.05 * torch.randn(3000, 768, device="cuda")
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_bf16_reduced_precision_reduction", False)
    distances, indices, stats = ScreenedBank(bank).search_with_stats(queries)
    assert stats.screened_queries == len(queries) and stats.plain_blocks == 0 and stats.union_rows, stats
    plain = ExactSearch().fit(bank).search(queries)
    assert torch.equal(indices, plain[1])
    assert torch.equal(distances, plain[0])
    cpu = ExactSearch().fit(bank.cpu()).search(queries.cpu())
    assert torch.equal(cpu[1], plain[1].cpu())
    torch.testing.assert_close(cpu[0], plain[0].cpu(), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------- pipeline

@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return preprocessed_mvtec(tmp_path_factory.mktemp("cuda"), n_train=5, n_val=1, n_test_good=3, n_test_defect=2)


def run_main(dataset: Path, out: Path, method: str, uff: Path, device: str, *extra: str) -> dict:
    import main as main_module

    flags = ["--method_name", method, "--memory_bank", METHODS[method]]
    if "Fusion" in method:
        flags += ["--use_uff", "--fusion_module_path", str(uff)]
    argv = ["--dataset_path", str(dataset), "--output_dir", str(out), *SMALL, "--device", device, *flags, *extra]
    assert main_module.main(argv) == 0
    return json.loads((out / "results.json").read_text())


def maps(out: Path) -> dict:
    with np.load(out / "maps" / "gadget.npz") as archive:
        return {key: archive[key] for key in archive.files}


@pytest.mark.parametrize("method", list(METHODS))
def test_pipeline_on_cuda_gives_the_cpu_metrics(dataset, uff_checkpoint, tmp_path, method):
    cpu = run_main(dataset, tmp_path / "cpu", method, uff_checkpoint, "cpu")
    gpu = run_main(dataset, tmp_path / "gpu", method, uff_checkpoint, "cuda")
    for metric, value in cpu["results"]["gadget"].items():
        assert round(gpu["results"]["gadget"][metric], 3) == pytest.approx(round(value, 3), abs=1e-3), metric


@pytest.mark.parametrize(("fit_on", "load_on"), [("cuda", "cpu"), ("cpu", "cuda")])
def test_a_model_saved_on_one_device_scores_the_same_on_the_other(dataset, uff_checkpoint, tmp_path, fit_on,
                                                                   load_on):
    method = "DINO+Point_MAE"
    fitted = tmp_path / "fit"
    run_main(dataset, fitted, method, uff_checkpoint, fit_on, "--save_model", "--save_maps")
    loaded = tmp_path / "load"
    run_main(dataset, loaded, method, uff_checkpoint, load_on, "--save_maps", "--load_model",
             str(fitted / "models"))
    a, b = maps(fitted), maps(loaded)
    np.testing.assert_allclose(b["image_scores"], a["image_scores"], rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(b["maps"], a["maps"], rtol=1e-3, atol=1e-3)


# ---------------------------------------------------------------------------------------- pretraining

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_fusion_pretrain_runs_with_nccl_on_one_gpu(tmp_path):
    data = tmp_path / "dumps"
    data.mkdir()
    generator = torch.Generator().manual_seed(0)
    for i in range(4):  # main.py --save_feature's files: xyz (N, 1152) then RGB (N, 768) rows per sample
        torch.save(torch.randn(64, 1152 + 768, generator=generator), data / f"gadget{i}.pt")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1", "--master_addr=127.0.0.1",
               f"--master_port={free_port()}", "fusion_pretrain.py", "--data_path", str(data),
               "--output_dir", str(tmp_path / "out"), "--batch_size", "2", "--epochs", "1", "--device", "cuda",
               "--num_workers", "0"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "out" / "checkpoint-0.pth").exists()
