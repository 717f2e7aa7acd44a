"""Metrics a test split cannot give (no masks, or only good parts) are None, "n/a" in the tables and null in
results.json, and the numbers of a split with masks are unchanged."""

import json
import logging

import numpy as np

from m3dm.evaluation.metrics import METRIC_NAMES, compute_metrics
from m3dm.evaluation.tables import class_line, markdown_table, write_results


def split(seed=0, n=6):
    rng = np.random.default_rng(seed)
    labels = np.array([0, 0, 0, 1, 1, 1][:n])
    masks = np.zeros((n, 8, 8), np.uint8)
    masks[labels == 1, 2:5, 2:5] = 1
    maps = rng.random((n, 8, 8)).astype(np.float32) + masks
    return labels, maps.max(axis=(1, 2)), masks, maps


def test_without_masks_only_image_metrics(caplog):
    labels, scores, masks, maps = split()
    full = compute_metrics(labels, scores, masks, maps)
    with caplog.at_level(logging.INFO, logger="m3dm.evaluation.metrics"):
        image_only = compute_metrics(labels, scores, np.zeros_like(masks), maps, masks_available=False, name="widget")
    assert image_only == {**dict.fromkeys(METRIC_NAMES), "image_rocauc": full["image_rocauc"]}
    assert "widget: defective test parts without ground-truth masks (no gt/ folder): image metrics only" in caplog.text
    assert all(full[k] is not None for k in METRIC_NAMES)


def test_only_good_test_parts_give_no_metric(caplog):
    labels, scores, masks, maps = split()
    good = labels == 0
    with caplog.at_level(logging.WARNING, logger="m3dm.evaluation.metrics"):
        metrics = compute_metrics(labels[good], scores[good], masks[good], maps[good], name="widget")
    assert metrics == dict.fromkeys(METRIC_NAMES)
    assert "widget: every test part is good (3 parts): no image or pixel metric is available" in caplog.text


def test_tables_and_json_say_not_available(tmp_path):
    labels, scores, masks, maps = split()
    per_class = {"masked": compute_metrics(labels, scores, masks, maps),
                 "unmasked": compute_metrics(labels, scores, masks, maps, masks_available=False)}
    image = per_class["masked"]["image_rocauc"]
    line = class_line("unmasked", "M", per_class["unmasked"])
    assert line == f"Class: unmasked, M Image ROCAUC: {image:.3f}, M Pixel ROCAUC: n/a, M AU-PRO: n/a"
    pixel_table = markdown_table("M", per_class, "pixel_rocauc")
    pixel = round(per_class["masked"]["pixel_rocauc"], 3)
    assert pixel_table.splitlines()[2].split("|")[2:5] == [f" {pixel:.3f}  ", " n/a      ", f" {pixel:.3f} "]
    write_results(tmp_path, "M", per_class, {})
    record = json.loads((tmp_path / "results.json").read_text())
    assert record["per_class"]["unmasked"]["au_pro"] is None
    assert record["mean"]["pixel_rocauc"] == pixel  # the mean of the available values
    assert record["mean"]["image_rocauc"] == round(image, 3)
    assert "n/a" in (tmp_path / "au_pro_results.md").read_text()


def test_a_class_resumed_from_an_older_run_lacks_the_newer_au_pros(tmp_path):
    """A class file of a run made before AU-PRO@10% and @5% existed: "n/a" in their tables, left out of their mean,
    and every other number as before."""
    labels, scores, masks, maps = split()
    new = compute_metrics(labels, scores, masks, maps)
    older = {k: v for k, v in compute_metrics(*split(seed=1)).items() if k not in ("au_pro_0.1", "au_pro_0.05")}
    write_results(tmp_path, "M", {"older": older, "new": new}, {})
    record = json.loads((tmp_path / "results.json").read_text())
    assert record["mean"]["au_pro_0.05"] == round(new["au_pro_0.05"], 3)
    assert record["mean"]["au_pro"] == (round(older["au_pro"], 3) + round(new["au_pro"], 3)) / 2
    tables = (tmp_path / "au_pro_results.md").read_text().split("# ")[1:]
    assert [t.splitlines()[0] for t in tables] == ["AU-PRO@30%", "AU-PRO@10%", "AU-PRO@5%", "AU-PRO@1%"]
    assert "n/a" in tables[2] and "n/a" not in tables[0]
