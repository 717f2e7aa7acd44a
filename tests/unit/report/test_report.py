"""report.html from saved results alone: sections with real content, every test part in the gallery, the note on
random weights, classes without masks, and the comparison of several folders (deltas equal the results' own).

The results are made-up runs written by the run's own writers (m3dm.report.synthetic); their test files do not
exist, so the report can only come from the saved files.
"""

import base64
import io
import json
import math
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from m3dm.app.report import main as report_main
from m3dm.report import build_report
from m3dm.report.data import REPORT_DATA_DIR, load_class_data
from m3dm.report.synthetic import write_synthetic_predictions, write_synthetic_results


class Page(HTMLParser):
    """The parts of a report the tests look at: sections (by id), their images and the gallery cards."""

    def __init__(self, text: str):
        super().__init__()
        self.section = None
        self.sections: dict[str, dict] = {}
        self.cells: list[dict] = []
        self.rank_cells: list[dict] = []
        self.text: list[str] = []
        self.source = text
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "section":
            self.section = attrs.get("id")
            self.sections[self.section] = {"images": [], "parts": [], "tables": 0}
        current = self.sections.get(self.section)
        if current is None:
            return
        if tag == "img":
            current["images"].append(attrs)
        elif tag == "figure" and "part" in attrs.get("class", "").split():
            current["parts"].append(attrs)
        elif tag == "table":
            current["tables"] += 1
        elif tag == "td" and "data-value" in attrs:
            self.cells.append(attrs)
        elif tag == "td" and "data-rank" in attrs:
            self.rank_cells.append(attrs)

    def handle_endtag(self, tag):
        if tag == "section":
            self.section = None

    def handle_data(self, data):
        self.text.append(data)


def decoded(image: dict, folder: Path) -> np.ndarray:
    """A picture of the page: inline, or a file of its asset folder (``folder``: the page's)."""
    prefix = "data:image/png;base64,"
    source = io.BytesIO(base64.b64decode(image["src"][len(prefix):])) if image["src"].startswith(prefix) else \
        folder / image["src"]
    picture = Image.open(source)
    assert picture.format == "PNG"
    return np.asarray(picture.convert("RGB"))


def svg_texts(image: dict) -> list[tuple[str, float]]:
    """``(text, font size in CSS pixels)`` of an inline SVG plot (its text is text, not paths)."""
    prefix = "data:image/svg+xml;base64,"
    assert image["src"].startswith(prefix)
    svg = base64.b64decode(image["src"][len(prefix):]).decode()
    assert svg.lstrip().startswith("<?xml") and "<svg" in svg
    width, view = re.search(r'<svg[^>]* width="([0-9.]+)pt"[^>]* viewBox="0 0 ([0-9.]+)', svg).groups()
    scale = float(width) * 4 / 3 / float(view)  # CSS pixels per SVG unit at the plot's own size (1 pt = 4/3 px)
    texts = re.findall(r'<text style="font-size: ([0-9.]+)px[^>]*>([^<]+)</text>', svg)
    return [(text, float(size) * scale) for size, text in texts]


N_PARTS = 10  # test parts per class


def non_trivial(pixels: np.ndarray) -> bool:
    """More than 20 colours: each RGB triple as one integer (np.unique over rows is many times slower)."""
    colours = pixels.reshape(-1, 3).astype(np.uint32) @ np.array([1 << 16, 1 << 8, 1], np.uint32)
    return len(np.unique(colours)) > 20


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    """A run of two classes, its folder also holding the data file of a class that its results do not list (as an
    earlier run of another class into the same --output_dir leaves one): the page must leave that class out."""
    folder = write_synthetic_results(tmp_path_factory.mktemp("run") / "results", ["alpha", "beta"], N_PARTS)
    shutil.copyfile(folder / REPORT_DATA_DIR / "alpha.npz", folder / REPORT_DATA_DIR / "ghost.npz")
    return folder


@pytest.fixture(scope="module")
def page(saved) -> Page:
    """The page that the command writes into the folder (each report costs ~1 s CPU of matplotlib plots: the tests
    share this one wherever they look at different parts of it)."""
    assert report_main([str(saved), "-q"]) == 0
    return Page((saved / "report.html").read_text())


@pytest.fixture(scope="module")
def unmasked(tmp_path_factory) -> Path:
    """A run without ground-truth masks (pixel metrics NaN or null), without a threshold, with trained weights."""
    folder = write_synthetic_results(tmp_path_factory.mktemp("run") / "unmasked", ["alpha"], 8, masks=False,
                                     threshold=False, random_weights=False)
    results = json.loads((folder / "results.json").read_text())
    assert math.isnan(results["per_class"]["alpha"]["au_pro"])
    results["per_class"]["alpha"]["pixel_rocauc"] = None  # either form: NaN or null
    (folder / "results.json").write_text(json.dumps(results))
    return folder


@pytest.fixture(scope="module")
def unmasked_page(unmasked) -> Page:
    return Page(build_report([unmasked]).read_text())


def test_every_test_part_is_in_its_class_gallery_misclassified_first(saved, page):
    rows = json.loads((saved / "per_sample.json").read_text())
    for class_name in ("alpha", "beta"):
        cards = page.sections[f"class-{class_name}"]["parts"]
        names = ["/".join((r["class"], r["split"], r["defect_type"], r["stem"])) for r in rows
                 if r["class"] == class_name]
        assert sorted(c["data-name"] for c in cards) == sorted(names) and len(cards) == len(names) == N_PARTS
        by_name = {"/".join((r["class"], r["split"], r["defect_type"], r["stem"])): r for r in rows}
        wrong = [("wrong" in c["class"].split()) for c in cards]
        expected = [(by_name[c["data-name"]]["result"] == "fail") != (by_name[c["data-name"]]["label"] == 1)
                    for c in cards]
        assert wrong == expected and any(wrong)
        assert wrong == sorted(wrong, reverse=True)  # the misclassified first
        for group in (True, False):  # each group by decreasing score
            scores = [float(c["data-score"]) for c, w in zip(cards, wrong) if w == group]
            assert scores == sorted(scores, reverse=True)


def test_every_section_has_real_content(saved, page):
    run = page.sections["run"]
    assert run["tables"] == 4  # weights, time per stage, versions, configuration
    assert page.sections["metrics"]["tables"] == 1
    text = " ".join(page.text)
    for needle in ("vit_base_patch8_224_dino", "Point_MAE", "extract", "torch", "python", "timm"):
        assert needle in text
    for class_name in ("alpha", "beta"):
        section = page.sections[f"class-{class_name}"]
        kinds = [image["class"] for image in section["images"]]
        assert kinds.count("roc") == kinds.count("pro") == kinds.count("histogram") == 1
        assert kinds.count("thumb") == N_PARTS
        assert section["tables"] == 1  # by defect type
        for image in section["images"]:
            if image["class"] == "thumb":
                assert non_trivial(decoded(image, saved)), image["src"]
            else:  # plots: SVG, every text at least 10 px
                texts = svg_texts(image)
                assert len(texts) > 10 and min(size for _, size in texts) >= 10, texts
        thumb = decoded(next(i for i in section["images"] if i["class"] == "thumb"), saved)
        assert thumb.shape[0] == 112 and thumb.shape[1] == 3 * 112 + 4  # three panels side by side


def test_random_weights_are_announced_loudly_and_only_then(page, unmasked_page):
    assert '<div class="loud" id="random-weights">' in page.source
    assert "RANDOM WEIGHTS (RGB backbone, point backbone, --random_init)" in " ".join(page.text)
    assert "RANDOM WEIGHTS" not in unmasked_page.source  # a run with trained weights


def test_the_report_data_keeps_the_evaluation_order_and_scores(saved):
    rows = json.loads((saved / "per_sample.json").read_text())
    data = load_class_data(saved / REPORT_DATA_DIR / "alpha.npz")
    alpha = [r for r in rows if r["class"] == "alpha"]
    assert data.names == ["/".join((r["class"], r["split"], r["defect_type"], r["stem"])) for r in alpha]
    assert data.scores.tolist() == [r["image_score"] for r in alpha]
    assert data.failed.tolist() == [r["result"] == "fail" for r in alpha]
    assert data.rgb.shape == (N_PARTS, 112, 112, 3) and data.maps.shape == data.depth.shape == (N_PARTS, 112, 112)


def test_a_class_without_masks_shows_na_and_no_pixel_plot(unmasked_page):
    section = unmasked_page.sections["class-alpha"]
    kinds = [image["class"] for image in section["images"]]
    assert "pro" not in kinds and kinds.count("roc") == 1 and kinds.count("thumb") == 8
    text = " ".join(unmasked_page.text)
    assert "n/a" in text and "no ground-truth masks" in text
    assert "misclassified" not in text  # no threshold: sorted by score only


def test_the_command_rebuilds_the_report_and_compares_folders(saved, page, tmp_path, capsys):
    other = write_synthetic_results(tmp_path / "other", ["alpha", "beta", "gamma"], N_PARTS, method="Point_MAE", seed=3)
    assert (saved / "report.html").stat().st_size > 0  # written by the command, in the page fixture
    output = tmp_path / "cmp.html"
    assert report_main([str(saved), str(other), "--output", str(output), "-q"]) == 0
    page = Page(output.read_text())
    first, second = (json.loads((f / "results.json").read_text()) for f in (saved, other))
    metric_cells = [c for c in page.cells if "data-metric" in c]
    assert {c["data-run"] for c in metric_cells} == {"Point_MAE"}
    assert len(metric_cells) == 2 * 6  # the two shared classes, six metrics
    for cell in metric_cells:
        c, m = cell["data-class"], cell["data-metric"]
        assert float(cell["data-value"]) == second["per_class"][c][m] - first["per_class"][c][m]
    rows = [json.loads((f / "per_sample.json").read_text()) for f in (saved, other)]
    for class_name in ("alpha", "beta"):  # per part: each run's rank of its score in the class, never a raw delta
        ranks = {}
        for label, run_rows in zip(("DINO+Point_MAE", "Point_MAE"), rows):
            mine = sorted((r for r in run_rows if r["class"] == class_name), key=lambda r: -r["image_score"])
            ranks.update({(label, "/".join((r["class"], r["split"], r["defect_type"], r["stem"]))): k
                          for k, r in enumerate(mine, 1)})
        cells = [c for c in page.rank_cells if c["data-sample"].startswith(f"{class_name}/")]
        assert len(cells) == 2 * N_PARTS
        assert {(c["data-run"], c["data-sample"]): int(c["data-rank"]) for c in cells} == ranks
        spreads = [c for c in page.cells if c.get("data-sample", "").startswith(f"{class_name}/")]
        assert len(spreads) == N_PARTS
        assert [int(c["data-value"]) for c in spreads] == [abs(ranks[("DINO+Point_MAE", c["data-sample"])]
                                                              - ranks[("Point_MAE", c["data-sample"])])
                                                          for c in spreads]
        thumbs = [i for i in page.sections[f"class-{class_name}"]["images"] if i["class"] == "thumb"]
        assert len(thumbs) == 2 * N_PARTS and all(non_trivial(decoded(i, output.parent)) for i in thumbs)
    assert "M3DM comparison: DINO+Point_MAE vs Point_MAE" in " ".join(page.text)
    assert {f"class-{c}" for c in ("alpha", "beta")} <= set(page.sections) and "class-gamma" not in page.sections


def test_results_of_a_run_before_the_10_and_5_percent_au_pros_still_make_a_report(saved, tmp_path):
    """An older run's results.json has AU-PRO at 30 and 1 % only: its report shows those, and compared with a
    newer run the two newer metrics are shown for the newer run, "n/a" for the older one."""
    older = write_synthetic_results(tmp_path / "older", ["alpha"], N_PARTS, seed=4)  # one class says it
    record = json.loads((older / "results.json").read_text())
    for metrics in [*record["per_class"].values(), record["mean"]]:
        del metrics["au_pro_0.1"], metrics["au_pro_0.05"]
    (older / "results.json").write_text(json.dumps(record))
    alone = " ".join(Page(build_report([older]).read_text()).text)
    assert "AU-PRO (FPR 0.3)" in alone and "AU-PRO (FPR 0.01)" in alone and "AU-PRO (FPR 0.1)" not in alone
    compared = Page(build_report([older, saved], output=tmp_path / "cmp.html").read_text())
    assert "AU-PRO (FPR 0.05)" in " ".join(compared.text)
    deltas = {c["data-metric"] for c in compared.cells if "data-metric" in c}  # cells with a number only
    assert deltas == {"image_rocauc", "pixel_rocauc", "au_pro", "au_pro_0.01"}


def test_a_predictions_report_counts_and_lists_the_parts_that_could_not_be_scored(tmp_path):
    folder = write_synthetic_predictions(tmp_path / "predictions", 4, errors=2)
    page = Page(build_report([folder]).read_text())
    rows = [json.loads(line) for line in (folder / "predictions.jsonl").read_text().splitlines()]
    scored = [r for r in rows if r["result"] != "error"]
    assert sorted(c["data-name"] for c in page.sections["class-gadget"]["parts"]) == sorted(r["name"] for r in scored)
    cards = page.sections["class-gadget"]["parts"]  # each with its normalised score, above 0.5 exactly on a fail
    assert all(0 <= float(c["data-normalised"]) <= 1 for c in cards)
    assert [float(c["data-normalised"]) > 0.5 for c in cards] == [c["data-verdict"] == "fail" for c in cards]
    assert sum(f"(normalised {float(c['data-normalised']):.3f})" in " ".join(page.text) for c in cards) == len(cards)
    text = " ".join(page.text)
    counts = [sum(r["result"] == kind for r in rows) for kind in ("pass", "fail", "error")]
    assert f"6: {counts[0]} PASS, {counts[1]} FAIL, 2 could not be scored" in text
    assert page.sections["errors"]["tables"] == 1
    for row in rows[-2:]:
        assert row["name"] in text and row["error"] in text


def test_a_folder_without_results_is_one_clear_error(tmp_path, capsys):
    assert report_main([str(tmp_path)]) == 2
    assert f"{tmp_path}: no saved results" in capsys.readouterr().err


def chromium() -> str | None:
    return next((path for name in ("chromium", "chromium-browser", "google-chrome") if (path := shutil.which(name))),
                None)


@pytest.mark.slow
@pytest.mark.skipif(chromium() is None, reason="no headless Chromium on this machine (apt-get install chromium)")
def test_the_report_renders_in_a_headless_chromium(saved, page, tmp_path):
    import subprocess

    shot = tmp_path / "report.png"
    subprocess.run([chromium(), "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    "--window-size=1200,1600", f"--screenshot={shot}", (saved / "report.html").resolve().as_uri()],
                   check=True, capture_output=True, timeout=120)
    pixels = np.asarray(Image.open(shot).convert("RGB"))
    assert pixels.shape == (1600, 1200, 3)
    banner = (pixels[..., 0] > 150) & (pixels[..., 1] < 70) & (pixels[..., 2] < 70)  # the red random-weights note
    assert banner.sum() > 20_000 and non_trivial(pixels)


def test_report_data_of_an_earlier_run_into_the_same_folder_is_left_out(saved, page):
    """A class's data file that this run's results do not list (an earlier run of another class into the same
    --output_dir) stays out of the report."""
    assert (saved / REPORT_DATA_DIR / "ghost.npz").is_file()  # put there by the fixture
    assert "class-alpha" in page.sections and "class-beta" in page.sections
    assert "class-ghost" not in page.sections
