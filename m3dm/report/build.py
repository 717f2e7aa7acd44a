"""Build ``report.html`` from saved results folders: one folder gives its run's report, several a comparison."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

from m3dm.data.io import atomic_path
from m3dm.errors import DiskFullError
from m3dm.report.assets import AssetFolder
from m3dm.report.page import comparison_page_pieces, run_page_pieces
from m3dm.report.runs import load_run

log = logging.getLogger(__name__)

REPORT_NAME = "report.html"
COMPARISON_NAME = "comparison.html"


def default_output(folders: Sequence[str | Path]) -> Path:
    """``<folder>/report.html`` for one folder; ``comparison.html`` in the folders' common parent for several."""
    if len(folders) == 1:
        return Path(folders[0]) / REPORT_NAME
    parent = Path(os.path.commonpath([str(Path(f).resolve()) for f in folders]))
    return parent / COMPARISON_NAME


def build_report(folders: Sequence[str | Path], output: str | Path | None = None) -> Path:
    """Write the report of the saved results in ``folders`` to ``output`` (``default_output``) atomically and
    return its path. Needs only the files the run saved (results.json, per_sample.json, report_data/)."""
    if not folders:
        raise ValueError("no results folder given")
    runs = [load_run(folder) for folder in folders]
    output = Path(output) if output is not None else default_output(folders)
    output.parent.mkdir(parents=True, exist_ok=True)
    assets = AssetFolder(output)  # written as the page is made: a gallery of any size is never in memory whole
    pieces = run_page_pieces(runs[0], assets) if len(runs) == 1 else comparison_page_pieces(runs, assets)
    try:
        with atomic_path(output) as tmp, open(tmp, "w", encoding="utf-8") as page:
            page.writelines(pieces)
            page.flush()
            assets.commit()  # before the page is renamed into place: the page never points to missing files
    except BaseException:
        assets.discard()
        raise
    log.debug("report: %s (%.1f MB)", output, output.stat().st_size / 1e6)
    return output


def try_build_report(folder: str | Path) -> dict[str, Path]:
    """The report of a finished run, ``{"report": path}``; a failure is logged, not raised (the results are
    written already and the report can be built again with ``python -m m3dm.report``), except a full disk: a run
    whose report could not be written must not look successful."""
    try:
        return {"report": build_report([folder])}
    except DiskFullError:
        raise
    except Exception:
        log.exception("the report could not be built (rebuild it with python -m m3dm.report %s)", folder)
        return {}
