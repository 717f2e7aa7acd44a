"""benchmarks/gpu.py keeps working without a GPU: its tiny size on the CPU writes every figure."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_gpu_benchmark_runs_on_the_cpu_at_the_tiny_size(tmp_path):
    out = tmp_path / "gpu.json"
    done = subprocess.run([sys.executable, "benchmarks/gpu.py", "--device", "cpu", "--tiny", "--batch_size", "2",
                           "--json", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=900,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert done.returncode == 0, done.stderr[-3000:]
    figures = json.loads(out.read_text())
    assert set(figures["extract_per_s"]) == {"1", "2", "4"}
    assert all(rate > 0 for rate in figures["extract_per_s"].values())
    assert figures["fit_s"] > 0 and figures["test_per_s"] > 0 and figures["xyz_coreset_s"] > 0
    xyz_rows = figures["bank_rows_and_finalize_s"][0][0]
    assert xyz_rows == 4 * 56 * 56  # the four training samples' xyz patches, before the coreset
    assert 0.0 <= figures["metrics"]["image_rocauc"] <= 1.0
    assert "| test samples/s, DINO+Point_MAE+Fusion |" in done.stdout
