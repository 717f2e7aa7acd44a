"""The report pages in a real browser: Debian's Chromium, headless, driven by playwright (``install.sh`` installs
Chromium; requirements.txt pins playwright). A run's report, a comparison page and a predictions report, built from
made-up saved results (``m3dm.report.synthetic``), and the report a small main.py run writes: no console error and
no request but for the page's own files; the 3D view draws a cloud; a filter changes the parts shown and their
count; the detail view opens and steps to the next part from the keyboard; nothing is wider than a 390 px phone
screen."""

import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import main as main_module
from m3dm.preprocess.mvtec3d import preprocess_dataset
from m3dm.report import build_report
from m3dm.report.synthetic import write_synthetic_predictions, write_synthetic_results

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# what a test machine without a GPU or network needs; SwiftShader draws WebGL (the 3D view) on the CPU
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
N_PARTS = 8

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not Path(CHROMIUM).is_file(),
                                                   reason="no Chromium at /usr/bin/chromium (install.sh installs it)")]


@pytest.fixture(scope="module")
def browser():
    # imported here, not when the tests are collected: every test process of the quick tier would pay for it
    playwright_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (requirements.txt)")
    with playwright_api.sync_playwright() as driver:
        chromium = driver.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def pages(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pages")
    run = write_synthetic_results(root / "run", ["alpha", "beta"], N_PARTS)
    other = write_synthetic_results(root / "other", ["alpha", "beta"], N_PARTS, method="Point_MAE", seed=3)
    predictions = write_synthetic_predictions(root / "predictions", N_PARTS)
    return {"run": build_report([run]), "comparison": build_report([run, other]),
            "predict": build_report([predictions])}


class Visit:
    """One page open in a fresh tab, with its console errors and every URL it requested."""

    def __init__(self, browser, path: Path, width: int = 1280):
        self.tab = browser.new_page(viewport={"width": width, "height": 900})
        self.errors: list[str] = []
        self.requests: list[str] = []
        self.tab.on("console", lambda message: self.errors.append(message.text) if message.type == "error" else None)
        self.tab.on("pageerror", lambda error: self.errors.append(str(error)))
        self.tab.on("request", lambda request: self.requests.append(request.url))
        start = time.perf_counter()
        self.tab.goto(path.resolve().as_uri())
        self.seconds = time.perf_counter() - start
        self.folder = path.parent.resolve()

    def assert_offline_and_clean(self) -> None:
        assert not self.errors, self.errors
        outside = [url for url in self.requests if not url.startswith(self.folder.as_uri() + "/")]
        assert not outside, outside  # nothing from the network, nothing outside the page's folder

    def shown(self) -> list[str]:
        return self.tab.eval_on_selector_all("figure.part:not([hidden])", "cards => cards.map(c => c.dataset.name)")

    def width(self) -> int:
        return self.tab.evaluate("document.documentElement.scrollWidth")


def canvas_pixels(visit: Visit, tmp_path: Path) -> np.ndarray:
    """A screenshot of the 3D view once plotly has drawn it."""
    visit.tab.wait_for_selector("#detail-3d canvas", timeout=30_000)
    visit.tab.wait_for_function("document.getElementById('detail-3d-note').textContent.includes('points')",
                                timeout=30_000)
    visit.tab.wait_for_timeout(300)  # the frame after the draw
    shot = tmp_path / "view.png"
    visit.tab.locator("#detail-3d").screenshot(path=str(shot))
    return np.asarray(Image.open(shot).convert("RGB"))


def assert_drawn(pixels: np.ndarray) -> None:
    """Many distinct colours (the points along the colour scale), not a blank or single-colour canvas."""
    colours = len(np.unique(pixels.reshape(-1, 3), axis=0))
    coloured = (pixels.max(axis=2).astype(int) - pixels.min(axis=2) > 60).sum()  # saturated: not white or grey
    assert colours > 50 and coloured > 500, (colours, coloured)


def test_the_run_report_filters_and_opens_the_detail_view_with_the_cloud_in_3d(browser, pages, tmp_path):
    visit = Visit(browser, pages["run"])
    every = visit.shown()
    assert len(every) == 2 * N_PARTS
    assert visit.tab.inner_text("#filter-count") == f"{2 * N_PARTS} of {2 * N_PARTS} parts shown"
    visit.tab.select_option("select[name=cls]", "beta")
    assert visit.shown() and all(name.startswith("beta/") for name in visit.shown())
    assert visit.tab.inner_text("#filter-count") == f"{N_PARTS} of {2 * N_PARTS} parts shown"
    visit.tab.select_option("select[name=outcome]", "wrong")
    wrong = visit.shown()
    assert 0 < len(wrong) < N_PARTS and all(visit.tab.get_attribute(f'figure[data-name="{n}"]', "data-wrong") == "1"
                                            for n in wrong)
    visit.tab.click("button[type=reset]")
    visit.tab.fill("input[name=low]", "0.8")
    high = visit.shown()
    assert 0 < len(high) < 2 * N_PARTS and all(
        float(visit.tab.get_attribute(f'figure[data-name="{n}"]', "data-score")) >= 0.8 for n in high)
    visit.tab.click("button[type=reset]")
    visit.tab.select_option("select[name=sort]", "low")
    scores = [float(visit.tab.get_attribute(f'figure[data-name="{n}"]', "data-score")) for n in visit.shown()
              if n.startswith("alpha/")]
    assert scores == sorted(scores)

    first = visit.shown()[0]
    visit.tab.click(f'figure[data-name="{first}"]')
    assert visit.tab.is_visible("#detail") and visit.tab.inner_text("#detail-title") == first
    for kind in ("rgb", "gt", "heat"):  # the full-size pictures, loaded
        assert visit.tab.evaluate(f"document.getElementById('detail-{kind}').naturalWidth") == 224
    by_score = canvas_pixels(visit, tmp_path)
    assert_drawn(by_score)
    visit.tab.click("button[data-mode=rgb]")  # the same points in the part's colours
    assert not np.array_equal(canvas_pixels(visit, tmp_path), by_score)
    visit.tab.keyboard.press("ArrowRight")
    assert visit.tab.inner_text("#detail-title") == visit.shown()[1]
    visit.tab.keyboard.press("Escape")
    assert not visit.tab.is_visible("#detail")
    visit.assert_offline_and_clean()


def test_the_pages_fit_a_phone_screen(browser, pages):
    for name, path in pages.items():
        visit = Visit(browser, path, width=390)
        assert visit.width() <= 390, name
        if name != "comparison":  # the detail view too
            visit.tab.click("figure.part >> nth=0")
            assert visit.width() <= 390, name
        visit.assert_offline_and_clean()


def test_the_comparison_page_shows_each_runs_thumbnails(browser, pages):
    visit = Visit(browser, pages["comparison"])
    count = visit.tab.eval_on_selector_all("img.thumb", "images => images.map(i => { i.loading = 'eager'; }).length")
    assert count == 2 * 2 * N_PARTS  # two runs, two classes
    visit.tab.wait_for_function("Array.from(document.images).every(i => i.complete && i.naturalWidth > 0)",
                                timeout=30_000)
    assert visit.tab.locator("tr.disagree").count() > 0
    visit.assert_offline_and_clean()


def test_the_predictions_report_opens_a_part_in_3d(browser, pages, tmp_path):
    visit = Visit(browser, pages["predict"])
    assert len(visit.shown()) == N_PARTS
    visit.tab.select_option("select[name=outcome]", "fail")
    failed = visit.shown()
    assert 0 < len(failed) < N_PARTS
    visit.tab.click(f'figure[data-name="{failed[0]}"]')
    assert visit.tab.inner_text("#detail-title") == failed[0]
    assert_drawn(canvas_pixels(visit, tmp_path))
    visit.assert_offline_and_clean()


def test_the_report_of_a_real_run_opens_a_part_in_3d(browser, raw_mvtec, tmp_path):
    # the report main.py writes itself (small configuration, random weights), not made-up saved results
    dataset = preprocess_dataset(raw_mvtec, output=tmp_path / "data", workers=1).output
    out = tmp_path / "run"
    assert main_module.main(["--dataset_path", str(dataset), "--output_dir", str(out), "--rgb_backbone_name",
                             "vit_tiny_patch16_224", "--num_group", "32", "--group_size", "16", "--random_init",
                             "--device", "cpu", "--method_name", "DINO+Point_MAE", "-q"]) == 0
    visit = Visit(browser, out / "report.html")
    parts = visit.shown()
    assert parts and all(name.startswith("gadget/") for name in parts)
    visit.tab.click(f'figure[data-name="{parts[0]}"]')
    assert visit.tab.inner_text("#detail-title") == parts[0]
    assert_drawn(canvas_pixels(visit, tmp_path))
    visit.assert_offline_and_clean()
