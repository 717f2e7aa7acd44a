"""The preprocessing progress bar is drawn unless asked not to (``-q``, the demo's quiet preprocessing)."""

from __future__ import annotations

from m3dm.preprocess.common import JobResult, run_jobs


def _one_point(job: str) -> JobResult:
    return JobResult(job, valid_points=1)


def test_no_progress_bar_without_progress(capsys):
    assert [r.name for r in run_jobs(["a", "b"], _one_point, workers=1, desc="quiet bar", progress=False)] == ["a", "b"]
    assert "quiet bar" not in capsys.readouterr().err
    run_jobs(["a", "b"], _one_point, workers=1, desc="loud bar")
    assert "loud bar" in capsys.readouterr().err
