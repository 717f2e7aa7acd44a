"""The report pages: plain HTML and CSS, the plots inline as SVG, the parts' pictures and clouds in an asset folder
next to the page (``m3dm.report.assets``), the filters and the detail view in a small script (``script.py``).

``run_page_pieces``: one run (metrics first, the run's details collapsed, per class its plots and defect types,
then every test part as a card that opens its detail view, with filters and sorting).
``comparison_page``: several runs side by side (metrics with deltas to the first run, overlaid curves, per part
the ranks of each run and their thumbnails side by side, the parts the runs disagree on first).
"""

from __future__ import annotations

import base64
import datetime
import html
import itertools
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np

from m3dm.report import figures
from m3dm.report.assets import AssetFolder, cloud_script, detail_panels, heat_colour_stops, jpeg
from m3dm.report.data import ClassData
from m3dm.report.runs import WEIGHT_KINDS, SavedRun, method_settings, metric_value
from m3dm.report.script import DETAIL_VIEW, SCRIPT

METRIC_NAMES = {"image_rocauc": "Image ROCAUC", "pixel_rocauc": "Pixel ROCAUC", "au_pro": "AU-PRO (FPR 0.3)",
                "au_pro_0.1": "AU-PRO (FPR 0.1)", "au_pro_0.05": "AU-PRO (FPR 0.05)",
                "au_pro_0.01": "AU-PRO (FPR 0.01)"}  # a run's metrics, those an older run lacks left out

STYLE = """
* { box-sizing: border-box; }
body { font-family: system-ui, sans-serif; margin: 1em; color: #222; max-width: 1400px; line-height: 1.35; }
h1 { font-size: 1.4em; overflow-wrap: anywhere; } h2 { border-bottom: 1px solid #ccc; margin-top: 1.6em; }
h3 { margin-bottom: .3em; }
.scroll { max-width: 100%; overflow-x: auto; }
table { border-collapse: collapse; margin: .5em 0 1em; font-size: .85em; }
th, td { border: 1px solid #ddd; padding: 2px 7px; text-align: left; vertical-align: top; }
th { background: #f3f3f3; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.up { color: #0a7a2f; } td.down { color: #b3261e; } tr.mean td { font-weight: bold; background: #fafafa; }
tr.changed td { background: #fff3c4; } tr.disagree td { background: #fdecea; }
tr.changed td:first-child::after { content: " (changed)"; color: #8a6d00; }
code { overflow-wrap: anywhere; }
.loud { background: #b3261e; color: white; font-weight: bold; padding: .8em 1em; font-size: 1.1em;
        border-radius: 4px; margin: 1em 0; }
.note { color: #555; font-size: .9em; }
.facts { display: grid; grid-template-columns: max-content 1fr; gap: 2px 1em; margin: .5em 0; font-size: .9em; }
.facts dt { font-weight: bold; } .facts dd { margin: 0; overflow-wrap: anywhere; }
details { margin: .6em 0; } summary { cursor: pointer; font-weight: bold; }
.figures { display: flex; flex-wrap: wrap; gap: .6em; }
.figures img { max-width: 100%; height: auto; border: 1px solid #eee; }
.gallery { display: flex; flex-wrap: wrap; gap: 6px; }
.part { margin: 0; padding: 3px; border: 2px solid #ddd; border-radius: 3px; font-size: .8em; width: 346px;
        max-width: 100%; cursor: pointer; }
.part:hover, .part:focus { outline: 2px solid #1a56c4; }
.part.defective { border-color: #e8a09a; } .part.good { border-color: #9fd3a8; }
.part.wrong { border-color: #b3261e; background: #fdecea; }
.part img { display: block; max-width: 100%; height: auto; }
.part figcaption { padding-top: 2px; overflow-wrap: anywhere; }
.tag { font-weight: bold; } .tag.fail { color: #b3261e; } .tag.pass { color: #0a7a2f; }
.tag.miss { color: white; background: #b3261e; padding: 0 .3em; border-radius: 2px; }
nav { display: flex; flex-wrap: wrap; gap: .2em .8em; }
#filters { display: flex; flex-wrap: wrap; gap: .4em 1em; align-items: end; padding: .5em; background: #f6f6f6;
           border-radius: 4px; }
#filters label { display: flex; flex-direction: column; font-size: .85em; }
#filters input { width: 7em; } #filter-count { font-weight: bold; }
.count { font-weight: normal; font-size: .8em; color: #555; }
body.inspecting { overflow: hidden; }
.detail { position: fixed; inset: 0; background: rgba(0,0,0,.55); z-index: 10; overflow: auto; padding: 1em; }
.detail[hidden] { display: none; }
.detail-box { background: white; border-radius: 6px; padding: .8em 1em; max-width: 1400px; margin: 0 auto; }
.detail-head { display: flex; flex-wrap: wrap; gap: .5em; } #detail-close { margin-left: auto; }
.detail-panels { display: flex; flex-wrap: wrap; gap: .8em; align-items: flex-start; }
.panel { margin: 0; max-width: 100%; } .panel img { display: block; width: 224px; max-width: 100%; height: auto;
         image-rendering: auto; border: 1px solid #ddd; }
.panel figcaption { font-size: .85em; max-width: 224px; }
.view3d { flex: 1 1 420px; } .view3d figcaption { max-width: none; }
.cloud { width: 100%; height: 460px; border: 1px solid #ddd; }
.modes button[aria-pressed="true"] { background: #1a56c4; color: white; }
.colourbar { height: 12px; margin-top: 4px; border: 1px solid #999; background: linear-gradient(to right, STOPS); }
.colourbar-labels { display: flex; justify-content: space-between; font-size: .9em; }
"""


def esc(value) -> str:
    return html.escape(str(value), quote=True)


def fmt(value, digits: int = 3) -> str:
    value = metric_value(value)
    return "n/a" if value is None else f"{value:.{digits}f}"


def svg_img(data: bytes, alt: str, cls: str = "") -> str:
    """A plot (SVG: sharp at any zoom), inline."""
    source = base64.b64encode(data).decode("ascii")
    return f'<img class="{esc(cls)}" alt="{esc(alt)}" src="data:image/svg+xml;base64,{source}">'


def table(header: list[str], rows: Sequence[Sequence[object]], cls: str = "",
          row_classes: Sequence[str] | None = None) -> str:
    """An HTML table (scrolling sideways on narrow screens); cells are HTML already (``esc`` text cells), a cell
    ``(html, attributes)`` adds attributes; ``row_classes``: a class per row."""
    head = "".join(f"<th>{esc(h)}</th>" for h in header)

    def cell(c: object) -> str:
        return f"<td {c[1]}>{c[0]}</td>" if isinstance(c, tuple) else f"<td>{c}</td>"

    classes = row_classes or [""] * len(rows)
    body = "".join((f'<tr class="{k}">' if k else "<tr>") + "".join(cell(c) for c in row) + "</tr>"
                   for row, k in zip(rows, classes))
    return (f'<div class="scroll"><table class="{esc(cls)}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody>'
            "</table></div>")


def num(value, digits: int = 3, attributes: str = "") -> tuple[str, str]:
    return fmt(value, digits), f'class="num" {attributes}'.strip()


def score(value) -> tuple[str, str]:
    """An image score: five significant digits (scores of some methods are ~1e-6, of others ~1)."""
    value = metric_value(value)
    return "n/a" if value is None else f"{value:.5g}", 'class="num"'


def document_pieces(title: str, body: Iterable[str | Iterable[str]], script: dict | None = None) -> Iterator[str]:
    """The page in pieces, to be written one after the other; a body item that is not a string is
    one item in pieces (a section with its gallery cards). ``script``: the settings of the inspection script
    (``m3dm.report.script``), which is then added with its detail view."""
    generated = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    stops = ", ".join(f"{colour} {100 * position:g}%" for position, colour in heat_colour_stops())
    yield (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
           f'<meta name="viewport" content="width=device-width, initial-scale=1"><title>{esc(title)}</title>'
           f"<style>{STYLE.replace('STOPS', stops)}</style></head><body>\n<h1>{esc(title)}</h1>\n"
           f'<p class="note">Generated {generated} by m3dm.report; works offline (nothing is fetched).</p>\n')
    for number, item in enumerate(body):
        if number:
            yield "\n"
        yield from ([item] if isinstance(item, str) else item)
    if script is not None:
        settings = json.dumps(script).replace("</", "<\\/")
        yield (f'{DETAIL_VIEW}<script id="m3dm-config" type="application/json">{settings}</script>'
               f"<script>{SCRIPT}</script>")
    yield "\n</body></html>\n"


def random_note(runs: list[SavedRun]) -> str:
    lines = []
    for run in runs:
        kinds = run.random_weights
        if kinds:
            what = ", ".join(WEIGHT_KINDS.get(k, k) for k in kinds)
            lines.append(f"{esc(run.method)}: RANDOM WEIGHTS ({esc(what)}, --random_init): these scores say nothing "
                         f"about the method with its pretrained backbones.")
    return f'<div class="loud" id="random-weights">{"<br>".join(lines)}</div>' if lines else ""


# --------------------------------------------------------------------------------------------- one run

def facts(pairs: list[tuple[str, str]]) -> str:
    """Label and value pairs (HTML values) as a compact list."""
    return '<dl class="facts">' + "".join(f"<dt>{esc(k)}</dt><dd>{v}</dd>" for k, v in pairs) + "</dl>"


def run_summary(run: SavedRun) -> str:
    """What the run was, in a few lines at the top: method, results folder, command line, commit, host."""
    names = {"command": "command line", "git_commit": "git commit", "host": "host"}
    pairs = [("method", f"<b>{esc(run.method)}</b>"), ("results", f"<code>{esc(run.folder.resolve())}</code>")]
    pairs += [(names[k], f"<code>{esc(v)}</code>") for k, v in run.provenance.items()]
    pairs += [(k, esc(run.record[k])) for k in ("model", "class", "thresholds") if k in run.record]
    outcomes = [result for _, result, _ in run.prediction_outcomes]
    if outcomes:
        errors = outcomes.count("error")
        counts = (f"{len(outcomes)}: {outcomes.count('pass')} PASS, {outcomes.count('fail')} FAIL, "
                  f"{errors} could not be scored")
        pairs.append(("parts", esc(counts) + (' (<a href="#errors">listed below</a>)' if errors else "")))
    return f'<section id="summary">{facts(pairs)}</section>'


def errors_section(run: SavedRun) -> str:
    """The parts of a predictions run that could not be scored, with their errors (they have no card)."""
    failed = [(name, error) for name, result, error in run.prediction_outcomes if result == "error"]
    if not failed:
        return ""
    rows = [[esc(name), esc(error)] for name, error in failed]
    return (f'<section id="errors"><h2>Parts that could not be scored ({len(failed)})</h2>'
            f'{table(["part", "error"], rows, "errors")}</section>')


def run_section(run: SavedRun) -> str:
    """The run's details, collapsed: time per stage (in pipeline order), weights, the settings of its method (those
    changed from the default marked) and the software versions."""
    settings = method_settings(run.method, run.config)
    config = table(["setting", "value"], [[esc(k), esc(v)] for k, v, _ in settings], "config",
                   ["changed" if changed else "" for _, _, changed in settings])
    versions = table(["package", "version"], [[esc(k), esc(v)] for k, v in run.versions.items()], "versions")
    weight_rows = [[esc(WEIGHT_KINDS.get(kind, kind)), esc(w.get("name")),
                    f'<span class="tag fail">RANDOM (seed {esc(w.get("seed"))})</span>' if w.get("source") == "random"
                    else "file", esc(w.get("path") or "-"), esc((w.get("sha256") or "-")[:16])]
                   for kind, w in run.weights.items()]
    weights = table(["weights", "name", "source", "path", "sha256"], weight_rows, "weights") if weight_rows else \
        '<p class="note">no weight record in the results</p>'
    total = sum(run.timings.values())
    timing_rows = [[esc(stage), num(seconds, 1), num(100 * seconds / total if total else None, 0)]
                   for stage, seconds in run.timings.items()]
    timing_rows.append(["<b>total</b>", num(total, 1), num(100.0 if total else None, 0)])
    timings = table(["stage", "seconds", "%"], timing_rows, "timings")
    changed = sum(c for _, _, c in settings)
    return (f'<section id="run"><details><summary>Run details: time per stage ({total:.1f} s), weights, '
            f"settings ({changed} changed from the default), versions</summary>"
            f"<h3>Time per stage</h3>{timings}<h3>Weights</h3>{weights}"
            f"<h3>Settings of {esc(run.method)}</h3>{config}<h3>Versions</h3>{versions}</details></section>")


def rounded_mean(values: Sequence[float | None]) -> float | None:
    """The mean of the defined values rounded to 3 digits, as the result tables make it; None if none is."""
    rounded = [round(v, 3) for v in values if v is not None]
    return sum(rounded) / len(rounded) if rounded else None


def metrics_section(run: SavedRun) -> str:
    metrics = [m for m in METRIC_NAMES if any(m in v for v in run.per_class.values())]
    rows = [[f'<a href="#class-{esc(c)}">{esc(c)}</a>'] + [num(run.per_class[c].get(m)) for m in metrics]
            for c in run.classes if c in run.per_class]
    means = [num(rounded_mean([metric_value(run.per_class[c].get(m)) for c in run.per_class])) for m in metrics]
    rows.append(["<b>mean</b>"] + means)
    header = ["class"] + [METRIC_NAMES[m] for m in metrics]
    return (f'<section id="metrics"><h2>Metrics</h2>{table(header, rows, "metrics", [""] * (len(rows) - 1) + ["mean"])}'
            '<p class="note">n/a: undefined (no ground-truth masks, or a single label); the mean is over the classes '
            "where it is defined.</p></section>")


def defect_table(data: ClassData) -> str:
    threshold = data.failed is not None and data.has_labels
    header = ["defect type", "parts", "mean score", "Image ROCAUC (good vs type)", "AU-PRO (good and type)"]
    if threshold:
        header.append("failed")
    types = np.asarray(data.defect_types)
    rows = []
    for defect, m in data.defect_metrics.items():
        row = [esc(defect), num(m.get("n"), 0), score(m.get("mean_score")), num(m.get("image_rocauc")),
               num(m.get("au_pro"))]
        if threshold and data.failed is not None:
            chosen = types == defect
            row.append(num(int(data.failed[chosen].sum()), 0))
        rows.append(row)
    return table(header, rows, "defects")


def gallery_order(data: ClassData) -> tuple[list[int], np.ndarray]:
    """Parts by decreasing image score, the misclassified first where a threshold and labels exist; and the
    misclassified flags."""
    order = sorted(range(len(data.names)), key=lambda i: -data.scores[i])
    wrong = np.zeros(len(data.names), dtype=bool)
    if data.failed is not None and data.has_labels:
        wrong = data.failed != (data.labels == 1)
        order = sorted(order, key=lambda i: not wrong[i])
    return order, wrong


def verdict_tag(label: str, verdict: str) -> str:
    """PASS or FAIL, and whether it was right where the label is known: a PASS on a defective part is a miss."""
    if not verdict:
        return ""
    if label == "defective" and verdict == "pass":
        return ' <span class="tag miss">PASS: missed defect</span>'
    if label == "good" and verdict == "fail":
        return ' <span class="tag miss">FAIL: false alarm</span>'
    right = " (right)" if label in ("good", "defective") else ""
    return f' <span class="tag {verdict}">{verdict.upper()}{right}</span>'


def write_part_assets(assets: AssetFolder, key: str, data: ClassData, i: int) -> tuple[str, bool]:
    """The thumbnail strip of part ``i``, and its detail pictures and cloud where the data has them; the
    thumbnail's address, and whether the part has a ground-truth region in its detail pictures."""
    mask = None if data.masks is None else data.masks[i]
    strip = figures.part_thumbnail(data.rgb[i], data.maps[i], mask, data.depth[i], data.map_range)
    detail = data.detail(i)
    has_gt = False
    if detail is not None:
        rgb, mask = detail["rgb"], detail["mask"]
        for kind, pixels in detail_panels(rgb, detail["heat"], mask).items():
            assets.write(f"parts/{key}-{kind}.jpg", jpeg(pixels))
        assets.write(f"parts/{key}.js", cloud_script(key, detail["cloud"], detail["cloud_at"],
                                                     detail["cloud_scores"], rgb, mask))
        has_gt = mask is not None and bool(mask.any())
    return assets.write(f"parts/{key}.png", strip), has_gt


def prediction_picture(run: SavedRun, name: str, page: Path) -> str | None:
    """The address (from ``page``) of the full-size picture a run saved of part ``name``: ``pred_maps`` of
    main.py ``--save_preds``, ``heatmaps`` of m3dm.predict; None when there is none."""
    parts = name.split("/")
    if run.kind == "predict":
        path = run.folder / "heatmaps" / f"{name}.png"
    elif len(parts) == 4:
        path = run.folder / "pred_maps" / parts[0] / parts[2] / f"{parts[3]}.png"
    else:
        return None
    return Path(os.path.relpath(path, page.parent)).as_posix() if path.is_file() else None


def part_card(run: SavedRun, data: ClassData, i: int, rank: int, wrong: bool, key: str, thumb: str,
              has_gt: bool, page: Path) -> str:
    label = {0: "good", 1: "defective"}.get(int(data.labels[i]), "unlabelled")
    verdict = "" if data.failed is None else ("fail" if data.failed[i] else "pass")
    cls = " ".join(filter(None, ["part", label, "wrong" if wrong else ""]))
    normalised = None if data.normalised_scores is None else float(data.normalised_scores[i])
    shown = "" if normalised is None else f" (normalised {normalised:.3f})"
    attributes = {"name": data.names[i], "score": repr(float(data.scores[i])), "key": key,
                  "normalised": None if normalised is None else repr(normalised),
                  "class": data.class_name, "defect": data.defect_types[i], "label": label, "verdict": verdict,
                  "wrong": int(wrong), "rank": rank, "detail": int(data.has_detail), "gt": int(has_gt),
                  "low": repr(data.map_range[0]), "high": repr(data.map_range[1]),
                  "pred": prediction_picture(run, data.names[i], page)}
    data_attributes = " ".join(f'data-{k}="{esc(v)}"' for k, v in attributes.items() if v is not None)
    return (f'<figure class="{cls}" {data_attributes} tabindex="0">'
            f'<img class="thumb" loading="lazy" width="340" height="112" src="{esc(thumb)}" '
            f'alt="{esc(data.names[i])}: RGB with ground truth | heatmap | point cloud depth">'
            f'<figcaption>#{rank} <b>{esc(data.names[i])}</b><br><span class="facts-line">score '
            f"{data.scores[i]:.5g}{shown} · {label}{verdict_tag(label, verdict)}</span></figcaption></figure>")


def gallery(run: SavedRun, data: ClassData, assets: AssetFolder, prefix: str, page: Path) -> Iterator[str]:
    """The gallery in pieces: one per part card, its pictures written to ``assets`` as it goes (a class of any size
    is never in memory whole)."""
    order, wrong = gallery_order(data)
    threshold = "" if data.image_threshold is None else f", image threshold {data.image_threshold:.5g}"
    yield (f'<h3>Parts ({len(order)}{threshold}) <span class="count"></span></h3><p class="note">Sorted by image '
           f'score{", misclassified first" if wrong.any() else ""}; click a part (or Enter) to inspect it. Each: '
           f"RGB with the ground truth outlined in red | heatmap over the RGB (colour scale {data.map_range[0]:.3g} "
           f'to {data.map_range[1]:.3g}) | point cloud coloured by depth (near bright, no point grey).</p>'
           '<div class="gallery">')
    for rank, i in enumerate(order, 1):
        key = f"{prefix}-{i}"
        thumb, has_gt = write_part_assets(assets, key, data, i)
        yield part_card(run, data, i, rank, bool(wrong[i]), key, thumb, has_gt, page)
    yield "</div>"


def class_plots(run: SavedRun, data: ClassData) -> str:
    plots = []
    if data.has_labels and len(set(data.labels.tolist())) == 2:
        plots.append(svg_img(figures.roc_figure([(run.method, data.labels, data.scores)]), "ROC curve", "roc"))
    if data.has_labels and data.pro_curve is not None:
        plots.append(svg_img(figures.pro_figure([(run.method, *data.pro_curve)]), "PRO curve", "pro"))
    plots.append(svg_img(figures.histogram_figure(data.scores, data.labels, data.image_threshold),
                         "Image score histogram", "histogram"))
    return f'<div class="figures">{"".join(plots)}</div>'


def class_section(run: SavedRun, class_name: str, data: ClassData | None, assets: AssetFolder, prefix: str,
                  page: Path) -> Iterator[str]:
    """The section of one class in pieces (its gallery card by card)."""
    metrics = run.per_class.get(class_name, {})
    head = (f'<section class="class" id="class-{esc(class_name)}" data-class="{esc(class_name)}">'
            f"<h2>{esc(class_name)}</h2>")
    if metrics:
        ordered = [m for m in METRIC_NAMES if m in metrics] + [m for m in metrics if m not in METRIC_NAMES]
        head += "<p>" + " · ".join(f"{METRIC_NAMES.get(m, m)} {fmt(metrics[m])}" for m in ordered) + "</p>"
    if data is None:
        yield head + '<p class="note">no report data saved for this class</p></section>'
        return
    notes = []
    if data.has_labels and data.pro_curve is None:
        notes.append("PRO curve and pixel metrics: n/a (no ground-truth masks).")
    if data.image_threshold is None and data.has_labels:
        notes.append("No pass/fail threshold: the run neither saved nor loaded a model.")
    body = class_plots(run, data) + "".join(f'<p class="note">{esc(n)}</p>' for n in notes)
    if data.has_labels:
        body += f"<h3>By defect type</h3>{defect_table(data)}"
    yield head + body
    yield from gallery(run, data, assets, prefix, page)
    yield "</section>"


def filter_section(run: SavedRun) -> str:
    """The filters and sorting of every part card (``m3dm.report.script``)."""
    classes = "".join(f'<option value="{esc(c)}">{esc(c)}</option>' for c in run.classes)
    defects = sorted({row["defect_type"] for row in run.samples}) or []
    defect_options = "".join(f'<option value="{esc(d)}">{esc(d)}</option>' for d in defects)
    verdicts = run.kind == "predict" or any(row.get("result") in ("pass", "fail") for row in run.samples)
    labelled = verdicts and run.kind != "predict"
    outcomes = [("", "all")] + ([("wrong", "misclassified"), ("right", "correct")] if labelled else []) \
        + [("fail", "FAIL"), ("pass", "PASS")]
    outcome_options = "".join(f'<option value="{v}">{t}</option>' for v, t in outcomes)
    outcome_field = f'<label>outcome<select name="outcome">{outcome_options}</select></label>' if verdicts else \
        '<input type="hidden" name="outcome" value="">'
    sorts = (("rank", "misclassified, then score" if labelled else "score, highest first"),
             ("high", "score, highest first"), ("low", "score, lowest first"), ("name", "name"))
    sort_options = "".join(f'<option value="{v}">{t}</option>' for v, t in sorts)
    defect_field = (f'<label>defect type<select name="defect"><option value="">all</option>{defect_options}</select>'
                    "</label>") if defects else '<input type="hidden" name="defect" value="">'
    return (f'<section id="parts"><h2>Parts</h2><form id="filters" onsubmit="return false">'
            f'<label>class<select name="cls"><option value="">all</option>{classes}</select></label>{defect_field}'
            f"{outcome_field}"
            '<label>score from<input name="low" type="number" step="any" inputmode="decimal"></label>'
            '<label>score to<input name="high" type="number" step="any" inputmode="decimal"></label>'
            f'<label>sort<select name="sort">{sort_options}</select></label><button type="reset">clear</button>'
            '<span id="filter-count" aria-live="polite"></span></form></section>')


def run_page_pieces(run: SavedRun, assets: AssetFolder) -> Iterator[str]:
    """The page of one run in pieces (``document_pieces``), its parts' files written to ``assets`` as it goes: one
    class's data is read at a time, its thumbnails from a spool file (``load_class_data(spool=True)``), so that no
    run is too large for memory."""
    classes = run.classes
    nav = "<nav>" + ('<a href="#metrics">metrics</a>' if run.per_class else "") + '<a href="#run">run details</a>' \
        + '<a href="#parts">parts</a>' + "".join(f'<a href="#class-{esc(c)}">{esc(c)}</a>' for c in classes) \
        + "</nav>"
    body = [nav, random_note([run])]
    if run.per_class:
        body.append(metrics_section(run))
    body += [run_summary(run), errors_section(run), run_section(run), filter_section(run)]
    sections = (class_section(run, c, run.class_data(c, spool=True), assets, f"c{k}", assets.page)
                for k, c in enumerate(classes))
    title = f"M3DM {'predictions' if run.kind == 'predict' else 'report'}: {run.method}"
    script = {"viewer": assets.viewer(), "parts": assets.href("parts/"), "stops": heat_colour_stops()}
    return document_pieces(title, itertools.chain(body, sections), script)


# ------------------------------------------------------------------------------------------- comparison

def run_labels(runs: list[SavedRun]) -> list[str]:
    """Each run's method name, with its folder name where two runs share a method."""
    methods = [r.method for r in runs]
    return [m if methods.count(m) == 1 else f"{m} ({r.folder.name})" for m, r in zip(methods, runs)]


def delta_cell(value: float | None, reference: float | None, attributes: str) -> tuple[str, str]:
    if value is None or reference is None:
        return "n/a", f'class="num delta" {attributes}'
    delta = value - reference
    trend = "up" if delta > 0 else "down" if delta < 0 else ""
    return f"{delta:+.3f}", f'class="num delta {trend}" {attributes} data-value="{delta!r}"'


def comparison_metrics(runs: list[SavedRun], labels: list[str]) -> str:
    """Per metric: each run's value per class (deltas to the first run: the same metric, the same scale) and the
    mean of each run over the classes they share."""
    classes = list(dict.fromkeys(c for r in runs for c in r.classes if c in r.per_class))
    metrics = [m for m in METRIC_NAMES if any(m in v for r in runs for v in r.per_class.values())]
    parts = []
    for metric in metrics:
        header = ["class", labels[0]]
        for label in labels[1:]:
            header += [label, f"Δ {label} − {labels[0]}"]
        rows = []
        values = [[metric_value(run.per_class.get(c, {}).get(metric)) for c in classes] for run in runs]
        for k, c in enumerate(classes):
            reference = values[0][k]
            row = [esc(c), num(reference)]
            for run_values, label in zip(values[1:], labels[1:]):
                attributes = f'data-metric="{esc(metric)}" data-class="{esc(c)}" data-run="{esc(label)}"'
                row += [num(run_values[k]), delta_cell(run_values[k], reference, attributes)]
            rows.append(row)
        shared = [k for k in range(len(classes)) if all(v[k] is not None for v in values)]
        means = [rounded_mean([v[k] for k in shared]) for v in values]
        mean_row = ["<b>mean</b>", num(means[0])]
        for mean in means[1:]:
            mean_row += [num(mean), delta_cell(mean, means[0], "")]
        rows.append(mean_row)
        parts.append(f"<h3>{esc(METRIC_NAMES[metric])}</h3>"
                     f"{table(header, rows, 'comparison', [''] * (len(rows) - 1) + ['mean'])}")
    return (f'<section id="metrics"><h2>Metrics side by side</h2>{"".join(parts)}<p class="note">mean: over the '
            "classes where every run has the metric (of the values rounded to 3 digits, as the result tables).</p>"
            "</section>")


def ranks(scores: dict[str, tuple[int, float]]) -> dict[str, int]:
    """1 for the highest image score of the class (ties in name order)."""
    ordered = sorted(scores, key=lambda name: (-scores[name][1], name))
    return {name: rank for rank, name in enumerate(ordered, 1)}


def verdicts(run: SavedRun, class_name: str) -> dict[str, str]:
    """``name -> "pass" | "fail"`` of a class's parts where the run had a threshold (per-sample rows)."""
    return {"/".join((r["class"], r["split"], r["defect_type"], r["stem"])): r["result"] for r in run.samples
            if r["class"] == class_name and r.get("result") in ("pass", "fail")}


def comparison_thumbnails(runs: list[SavedRun], class_name: str, names: list[str], assets: AssetFolder,
                          prefix: str) -> list[dict[str, str]]:
    """Per run, ``name -> address`` of the thumbnail strip of each part of ``names`` (one run's class data read
    at a time, its thumbnails from a spool file)."""
    wanted = set(names)
    found: list[dict[str, str]] = []
    for k, run in enumerate(runs):
        data = run.class_data(class_name, spool=True)
        addresses = {}
        if data is not None:
            for i, name in enumerate(data.names):
                if name in wanted:
                    mask = None if data.masks is None else data.masks[i]
                    strip = figures.part_thumbnail(data.rgb[i], data.maps[i], mask, data.depth[i], data.map_range)
                    addresses[name] = assets.write(f"runs/{k}/{prefix}-{i}.png", strip)
        found.append(addresses)
    return found


def comparison_samples(runs: list[SavedRun], labels: list[str], class_name: str, assets: AssetFolder,
                       prefix: str) -> str:
    """Per part present in every run: its rank in each run (scores of different methods are on unrelated scales,
    their ranks are not), the rank's percentile, the verdict and the thumbnails side by side; the parts whose
    verdicts differ first, then by how far their ranks differ."""
    scores = [run.sample_scores(class_name) for run in runs]
    common = [name for name in scores[0] if all(name in s for s in scores[1:])]
    if not common:
        return '<p class="note">no test part in common</p>'
    rank = [ranks({n: s[n] for n in common}) for s in scores]
    said = [verdicts(run, class_name) for run in runs]
    disagree = {n: len({v.get(n) for v in said}) > 1 for n in common}
    spread = {n: max(r[n] for r in rank) - min(r[n] for r in rank) for n in common}
    ordered = sorted(common, key=lambda n: (not disagree[n], -spread[n], rank[0][n]))
    thumbs = comparison_thumbnails(runs, class_name, common, assets, prefix)
    header = ["part", "label"]
    for label in labels:
        header += [f"rank {label}", f"{label}"]
    header.append("rank spread")
    rows, classes = [], []
    for name in ordered:
        truth = {0: "good", 1: "defective"}.get(scores[0][name][0], "?")
        row: list[object] = [esc(name), esc(truth)]
        for k, label in enumerate(labels):
            attributes = f'data-sample="{esc(name)}" data-run="{esc(label)}" data-rank="{rank[k][name]}"'
            row.append((f"{rank[k][name]}<br><small>top {100 * rank[k][name] / len(common):.0f} %</small><br>"
                        f"{verdict_tag(truth, said[k].get(name, ''))}", f'class="num rank" {attributes}'))
            thumb = thumbs[k].get(name)
            row.append(f'<img class="thumb" loading="lazy" width="340" height="112" src="{esc(thumb)}" '
                       f'alt="{esc(label)}: {esc(name)}">' if thumb else "-")
        row.append((str(spread[name]), f'class="num spread" data-sample="{esc(name)}" data-value="{spread[name]}"'))
        rows.append(row)
        classes.append("disagree" if disagree[name] else "")
    n_disagree = sum(disagree.values())
    return (f'<p class="note">{len(common)} parts in every run; rank 1 = highest score of the class in that run '
            f"(scores of different methods are on unrelated scales: their ranks compare, the raw scores do not). "
            f"{n_disagree} part(s) with different pass/fail verdicts first (highlighted), then the largest rank "
            f"spreads.</p>{table(header, rows, 'samples', classes)}")


def comparison_page_pieces(runs: list[SavedRun], assets: AssetFolder) -> Iterator[str]:
    """The comparison page in pieces, the thumbnails written to ``assets`` class by class."""
    labels = run_labels(runs)
    output = assets.page
    run_rows = []
    for run, label in zip(runs, labels):
        link = Path(os.path.relpath(run.folder / "report.html", output.parent)).as_posix()
        report = f'<a href="{esc(link)}">report</a>' if (run.folder / "report.html").is_file() else "-"
        run_rows.append([f"<b>{esc(label)}</b>", f"<code>{esc(run.folder.resolve())}</code>", report,
                         esc(", ".join(run.random_weights) or "no"), num(sum(run.timings.values()), 1),
                         esc(", ".join(run.classes))])
    body: list[str | Iterable[str]] = [
        random_note(runs), comparison_metrics(runs, labels),
        '<section id="runs"><h2>Runs</h2>'
        + table(["run", "folder", "own report", "random weights", "total s", "classes"], run_rows, "runs")
        + f'<p class="note">Metric deltas are each run minus {esc(labels[0])}.</p></section>']
    shared = [c for c in runs[0].classes if all(c in r.classes for r in runs[1:])]
    body += (comparison_class(runs, labels, c, assets, f"c{k}") for k, c in enumerate(shared))
    return document_pieces("M3DM comparison: " + " vs ".join(labels), body)


def comparison_class(runs: list[SavedRun], labels: list[str], class_name: str, assets: AssetFolder,
                     prefix: str) -> Iterator[str]:
    found = [run.class_data(class_name) for run in runs]
    datas = [d for d in found if d is not None]
    plots = []
    if len(datas) == len(found) and all(d.has_labels and len(set(d.labels.tolist())) == 2 for d in datas):
        plots.append(svg_img(figures.roc_figure([(lab, d.labels, d.scores) for lab, d in zip(labels, datas)]),
                             "ROC curves", "roc"))
        curves = [(lab, *d.pro_curve) for lab, d in zip(labels, datas) if d.pro_curve is not None]
        if curves:
            plots.append(svg_img(figures.pro_figure(curves), "PRO curves", "pro"))
    del found, datas
    yield (f'<section class="class" id="class-{esc(class_name)}"><h2>{esc(class_name)}</h2>'
           f'<div class="figures">{"".join(plots)}</div><h3>Per part</h3>')
    yield comparison_samples(runs, labels, class_name, assets, prefix)
    yield "</section>"
