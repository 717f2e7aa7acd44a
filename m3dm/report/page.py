"""The report as one self-contained HTML page (plain HTML and CSS, every picture inline as a base64 PNG).

``run_page``: one run (its record, metrics, per-class plots, defect types and the gallery of every test part).
``comparison_page``: several runs side by side (metrics with deltas to the first run, overlaid curves, per-sample
score and rank changes).
"""

from __future__ import annotations

import base64
import datetime
import html
import itertools
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np

from m3dm.report import figures
from m3dm.report.data import ClassData
from m3dm.report.runs import WEIGHT_KINDS, SavedRun, metric_value

METRIC_NAMES = {"image_rocauc": "Image ROCAUC", "pixel_rocauc": "Pixel ROCAUC", "au_pro": "AU-PRO (FPR 0.3)",
                "au_pro_0.1": "AU-PRO (FPR 0.1)", "au_pro_0.05": "AU-PRO (FPR 0.05)",
                "au_pro_0.01": "AU-PRO (FPR 0.01)"}  # a run's metrics, those an older run lacks left out

STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; max-width: 1400px; }
h1 { font-size: 1.5em; } h2 { border-bottom: 1px solid #ccc; margin-top: 1.8em; } h3 { margin-bottom: .3em; }
table { border-collapse: collapse; margin: .5em 0 1em; font-size: .85em; }
th, td { border: 1px solid #ddd; padding: 2px 7px; text-align: left; vertical-align: top; }
th { background: #f3f3f3; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.up { color: #0a7a2f; } td.down { color: #b3261e; }
.loud { background: #b3261e; color: white; font-weight: bold; padding: .8em 1em; font-size: 1.1em;
        border-radius: 4px; margin: 1em 0; }
.note { color: #666; font-size: .9em; }
.figures img { margin: 0 .6em .6em 0; border: 1px solid #eee; }
.gallery { display: flex; flex-wrap: wrap; gap: 6px; }
.part { margin: 0; padding: 3px; border: 2px solid #ddd; border-radius: 3px; font-size: .72em; width: 340px; }
.part.defective { border-color: #e8a09a; } .part.good { border-color: #9fd3a8; }
.part.wrong { border-color: #b3261e; background: #fdecea; }
.part img { display: block; } .part figcaption { padding-top: 2px; }
.tag { font-weight: bold; } .tag.fail { color: #b3261e; } .tag.pass { color: #0a7a2f; }
nav a { margin-right: .8em; }
"""


def esc(value) -> str:
    return html.escape(str(value), quote=True)


def fmt(value, digits: int = 3) -> str:
    value = metric_value(value)
    return "n/a" if value is None else f"{value:.{digits}f}"


def png_img(data: bytes, alt: str, cls: str = "") -> str:
    source = base64.b64encode(data).decode("ascii")
    return f'<img class="{esc(cls)}" alt="{esc(alt)}" src="data:image/png;base64,{source}">'


def table(header: list[str], rows: Sequence[Sequence[object]], cls: str = "") -> str:
    """An HTML table; cells are HTML already (``esc`` text cells), a cell ``(html, attributes)`` adds attributes."""
    head = "".join(f"<th>{esc(h)}</th>" for h in header)

    def cell(c: object) -> str:
        return f"<td {c[1]}>{c[0]}</td>" if isinstance(c, tuple) else f"<td>{c}</td>"

    body = "".join("<tr>" + "".join(cell(c) for c in row) + "</tr>" for row in rows)
    return f'<table class="{esc(cls)}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def num(value, digits: int = 3, attributes: str = "") -> tuple[str, str]:
    return fmt(value, digits), f'class="num" {attributes}'.strip()


def score(value) -> tuple[str, str]:
    """An image score: five significant digits (scores of some methods are ~1e-6, of others ~1)."""
    value = metric_value(value)
    return "n/a" if value is None else f"{value:.5g}", 'class="num"'


def document(title: str, body: list[str]) -> str:
    return "".join(document_pieces(title, body))


def document_pieces(title: str, body: Iterable[str | Iterable[str]]) -> Iterator[str]:
    """The page in pieces, to be written one after the other (``document``); a body item that is not a string is
    one item in pieces (a section with its gallery cards)."""
    generated = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    yield (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>'
           f"<style>{STYLE}</style></head><body>\n<h1>{esc(title)}</h1>\n"
           f'<p class="note">Generated {generated} by m3dm.report; self-contained (no network).</p>\n')
    for number, item in enumerate(body):
        if number:
            yield "\n"
        yield from ([item] if isinstance(item, str) else item)
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

def run_section(run: SavedRun) -> str:
    """Configuration, versions, weights and the time per stage of one run."""
    config = table(["setting", "value"], [[esc(k), esc(v)] for k, v in sorted(run.config.items())], "config")
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
    extra = "".join(f"<p>{esc(k)}: {esc(run.record[k])}</p>" for k in ("model", "class", "thresholds")
                    if k in run.record)
    return (f'<section id="run"><h2>Run</h2><p>Method <b>{esc(run.method)}</b>, results in '
            f"<code>{esc(run.folder.resolve())}</code></p>{extra}"
            f'<h3>Weights</h3>{weights}<h3>Time per stage</h3>{timings}<h3>Versions</h3>{versions}'
            f"<details><summary>Configuration ({len(run.config)} settings)</summary>{config}</details></section>")


def metrics_section(run: SavedRun) -> str:
    metrics = [m for m in METRIC_NAMES if any(m in v for v in run.per_class.values())]
    rows = [[f'<a href="#class-{esc(c)}">{esc(c)}</a>'] + [num(run.per_class[c].get(m)) for m in metrics]
            for c in run.classes if c in run.per_class]
    means = []
    for m in metrics:
        values = [metric_value(run.per_class[c].get(m)) for c in run.per_class]
        rounded = [round(v, 3) for v in values if v is not None]  # as the result tables: mean of rounded values
        means.append(num(sum(rounded) / len(rounded) if rounded else None))
    rows.append(["<b>mean</b>"] + means)
    header = ["class"] + [METRIC_NAMES[m] for m in metrics]
    return (f'<section id="metrics"><h2>Metrics</h2>{table(header, rows, "metrics")}<p class="note">n/a: undefined '
            "(no ground-truth masks, or a single label); the mean is over the classes where it is defined.</p>"
            "</section>")


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


def gallery(data: ClassData) -> Iterator[str]:
    """The gallery in pieces: one per part card (a class of any size is never in memory whole)."""
    order, wrong = gallery_order(data)
    threshold = "" if data.image_threshold is None else f", image threshold {data.image_threshold:.5g}"
    yield (f'<h3>Gallery ({len(order)} parts{threshold})</h3><p class="note">Sorted by image score'
           f'{", misclassified first" if wrong.any() else ""}. Each: RGB with the ground truth outlined in red | '
           f"heatmap over the RGB (colour scale {data.map_range[0]:.3g} to {data.map_range[1]:.3g}) | point cloud "
           f'coloured by depth (near bright, no point grey).</p><div class="gallery">')
    for rank, i in enumerate(order, 1):
        label = {0: "good", 1: "defective"}.get(int(data.labels[i]), "unlabelled")
        verdict = "" if data.failed is None else ("fail" if data.failed[i] else "pass")
        mask = None if data.masks is None else data.masks[i]
        picture = figures.part_thumbnail(data.rgb[i], data.maps[i], mask, data.depth[i], data.map_range)
        cls = " ".join(filter(None, ["part", label, "wrong" if wrong[i] else ""]))
        tags = f' <span class="tag {verdict}">{verdict.upper()}</span>' if verdict else ""
        tags += ' <span class="tag fail">misclassified</span>' if wrong[i] else ""
        yield (f'<figure class="{cls}" data-name="{esc(data.names[i])}" data-score="{float(data.scores[i])!r}">'
               f"{png_img(picture, 'RGB with ground truth | heatmap | point cloud depth', 'thumb')}"
               f"<figcaption>#{rank} <b>{esc(data.names[i])}</b><br>score {data.scores[i]:.5g} · {label}"
               f"{tags}</figcaption></figure>")
    yield "</div>"


def class_section(run: SavedRun, class_name: str, data: ClassData | None) -> Iterator[str]:
    """The section of one class in pieces (its gallery card by card)."""
    metrics = run.per_class.get(class_name, {})
    head = f'<section class="class" id="class-{esc(class_name)}"><h2>{esc(class_name)}</h2>'
    if metrics:
        head += "<p>" + " · ".join(f"{METRIC_NAMES.get(m, m)} {fmt(v)}" for m, v in metrics.items()) + "</p>"
    if data is None:
        yield head + '<p class="note">no report data saved for this class</p></section>'
        return
    plots = []
    if data.has_labels and len(set(data.labels.tolist())) == 2:
        plots.append(png_img(figures.roc_figure([(run.method, data.labels, data.scores)]), "ROC curve", "roc"))
    if data.has_labels and data.pro_curve is not None:
        plots.append(png_img(figures.pro_figure([(run.method, *data.pro_curve)]), "PRO curve", "pro"))
    plots.append(png_img(figures.histogram_figure(data.scores, data.labels, data.image_threshold),
                         "Image score histogram", "histogram"))
    notes = []
    if data.has_labels and data.pro_curve is None:
        notes.append("PRO curve and pixel metrics: n/a (no ground-truth masks).")
    if data.image_threshold is None and data.has_labels:
        notes.append("No pass/fail threshold: the run neither saved nor loaded a model.")
    body = f'<div class="figures">{"".join(plots)}</div>'
    body += "".join(f'<p class="note">{esc(n)}</p>' for n in notes)
    if data.has_labels:
        body += f"<h3>By defect type</h3>{defect_table(data)}"
    yield head + body
    yield from gallery(data)
    yield "</section>"


def run_page(run: SavedRun) -> str:
    return "".join(run_page_pieces(run))


def run_page_pieces(run: SavedRun) -> Iterator[str]:
    """The page of one run in pieces (``document_pieces``): one class's data is read at a time, its thumbnails
    from a spool file (``load_class_data(spool=True)``), so that no run is too large for memory."""
    classes = run.classes
    nav = "<nav>" + '<a href="#run">run</a>' + ('<a href="#metrics">metrics</a>' if run.per_class else "") + \
        "".join(f'<a href="#class-{esc(c)}">{esc(c)}</a>' for c in classes) + "</nav>"
    body = [nav, random_note([run]), run_section(run)]
    if run.per_class:
        body.append(metrics_section(run))
    sections = (class_section(run, c, run.class_data(c, spool=True)) for c in classes)
    title = f"M3DM {'predictions' if run.kind == 'predict' else 'report'}: {run.method}"
    return document_pieces(title, itertools.chain(body, sections))


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
    classes = list(dict.fromkeys(c for r in runs for c in r.classes if c in r.per_class))
    metrics = [m for m in METRIC_NAMES if any(m in v for r in runs for v in r.per_class.values())]
    parts = []
    for metric in metrics:
        header = ["class", labels[0]]
        for label in labels[1:]:
            header += [label, f"Δ {label} − {labels[0]}"]
        rows = []
        for c in classes:
            reference = metric_value(runs[0].per_class.get(c, {}).get(metric))
            row = [esc(c), num(reference)]
            for run, label in zip(runs[1:], labels[1:]):
                value = metric_value(run.per_class.get(c, {}).get(metric))
                attributes = f'data-metric="{esc(metric)}" data-class="{esc(c)}" data-run="{esc(label)}"'
                row += [num(value), delta_cell(value, reference, attributes)]
            rows.append(row)
        parts.append(f"<h3>{esc(METRIC_NAMES[metric])}</h3>{table(header, rows, 'comparison')}")
    return f'<section id="metrics"><h2>Metrics side by side</h2>{"".join(parts)}</section>'


def ranks(scores: dict[str, tuple[int, float]]) -> dict[str, int]:
    """1 for the highest image score of the class (ties in name order)."""
    ordered = sorted(scores, key=lambda name: (-scores[name][1], name))
    return {name: rank for rank, name in enumerate(ordered, 1)}


def comparison_samples(runs: list[SavedRun], labels: list[str], class_name: str) -> str:
    """Per part present in every run: its score in each, the score delta and the rank change to the first run."""
    scores = [run.sample_scores(class_name) for run in runs]
    common = [name for name in scores[0] if all(name in s for s in scores[1:])]
    if not common:
        return '<p class="note">no test part in common</p>'
    rank = [ranks({n: s[n] for n in common}) for s in scores]
    header = ["part", "label", f"score {labels[0]}", f"rank {labels[0]}"]
    for other in labels[1:]:
        header += [f"score {other}", "Δ score", f"rank {other}", "Δ rank"]
    ordered = sorted(common, key=lambda n: (-max(abs(r[n] - rank[0][n]) for r in rank), rank[0][n]))
    rows = []
    for name in ordered:
        label, reference = scores[0][name]
        row = [esc(name), esc({0: "good", 1: "defective"}.get(label, "?")), score(reference), num(rank[0][name], 0)]
        for k, label_k in enumerate(labels[1:], 1):
            value = scores[k][name][1]
            attributes = f'data-sample="{esc(name)}" data-run="{esc(label_k)}"'
            row += [score(value), (f"{value - reference:+.5g}", f'class="num score-delta" {attributes} '
                                                                  f'data-value="{value - reference!r}"'),
                    num(rank[k][name], 0), (f"{rank[k][name] - rank[0][name]:+d}", f'class="num rank-delta" '
                                                                                   f"{attributes}")]
        rows.append(row)
    return (f'<p class="note">{len(common)} parts in every run; rank 1 = highest score of the class; largest rank '
            f"changes first.</p>{table(header, rows, 'samples')}")


def comparison_page(runs: list[SavedRun], output: Path) -> str:
    labels = run_labels(runs)
    run_rows = []
    for run, label in zip(runs, labels):
        link = Path(os.path.relpath(run.folder / "report.html", output.parent)).as_posix()
        report = f'<a href="{esc(link)}">report</a>' if (run.folder / "report.html").is_file() else "-"
        run_rows.append([f"<b>{esc(label)}</b>", f"<code>{esc(run.folder.resolve())}</code>", report,
                         esc(", ".join(run.random_weights) or "no"), num(sum(run.timings.values()), 1),
                         esc(", ".join(run.classes))])
    body = [random_note(runs), '<section id="runs"><h2>Runs</h2>'
            + table(["run", "folder", "own report", "random weights", "total s", "classes"], run_rows, "runs")
            + f'<p class="note">Deltas are each run minus {esc(labels[0])}.</p></section>',
            comparison_metrics(runs, labels)]
    shared = [c for c in runs[0].classes if all(c in r.classes for r in runs[1:])]
    for class_name in shared:
        found = [run.class_data(class_name) for run in runs]
        datas = [d for d in found if d is not None]
        plots = []
        if len(datas) == len(found) and all(d.has_labels and len(set(d.labels.tolist())) == 2 for d in datas):
            plots.append(png_img(figures.roc_figure([(lab, d.labels, d.scores) for lab, d in zip(labels, datas)]),
                                 "ROC curves", "roc"))
            curves = [(lab, *d.pro_curve) for lab, d in zip(labels, datas) if d.pro_curve is not None]
            if curves:
                plots.append(png_img(figures.pro_figure(curves), "PRO curves", "pro"))
        body.append(f'<section class="class" id="class-{esc(class_name)}"><h2>{esc(class_name)}</h2>'
                    f'<div class="figures">{"".join(plots)}</div><h3>Per part</h3>'
                    f"{comparison_samples(runs, labels, class_name)}</section>")
    return document("M3DM comparison: " + " vs ".join(labels), body)
