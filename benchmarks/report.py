"""Time to build report.html of a 10-class x 100-part run from its saved results (target: under 10 s on 2 cores),
and the time to its first view in headless Chromium (target: under 2 s) where /usr/bin/chromium and playwright are
installed.

    python benchmarks/report.py [--classes 10] [--parts 100] [--repeat 3]

The saved results are the files main.py writes (results.json, per_sample.csv/.json, report_data/<class>.npz),
written by the same writer functions from synthetic arrays (m3dm.report.synthetic). Prints the time to write them
(not part of the target: a run writes each class's file as the class ends), the best build time over the
repeats, each build's time and the size of the page; then the comparison of two such folders.
"""

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch

from m3dm.report import build_report
from m3dm.report.synthetic import write_synthetic_results


def timed_builds(folders: list[Path], output: Path, repeat: int) -> tuple[list[float], list[float]]:
    """Wall-clock and CPU seconds of this process per build (the build runs on one core: on a machine shared
    with other jobs the CPU time is what the build costs alone)."""
    walls, cpus = [], []
    for _ in range(repeat):
        start, cpu = time.perf_counter(), time.process_time()
        build_report(folders, output)
        walls.append(time.perf_counter() - start)
        cpus.append(time.process_time() - cpu)
    return walls, cpus


def first_view(page: Path) -> str:
    """Seconds from opening the page in headless Chromium to its load event and to its first contentful paint."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        return "first view: not measured (playwright is not installed)"
    if not Path("/usr/bin/chromium").is_file():
        return "first view: not measured (no /usr/bin/chromium)"
    args = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run"]
    with sync_playwright() as driver:
        browser = driver.chromium.launch(executable_path="/usr/bin/chromium", args=args)
        tab = browser.new_page(viewport={"width": 1280, "height": 900})
        start = time.perf_counter()
        tab.goto(page.resolve().as_uri())
        loaded = time.perf_counter() - start
        paint = tab.evaluate("performance.getEntriesByName('first-contentful-paint')[0].startTime") / 1000
        cards = tab.evaluate("document.querySelectorAll('figure.part').length")
        browser.close()
    return (f"first view in headless Chromium: load event {loaded:.2f} s, first contentful paint {paint:.2f} s "
            f"({cards} cards)")


def describe(walls: list[float], cpus: list[float]) -> str:
    return (f"best {min(walls):.2f} s wall ({', '.join(f'{t:.2f}' for t in walls)}), "
            f"CPU {min(cpus):.2f} s ({', '.join(f'{t:.2f}' for t in cpus)})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--parts", type=int, default=100, help="test parts per class")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(2)
    classes = [f"class_{i:02d}" for i in range(args.classes)]
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        first = write_synthetic_results(Path(tmp) / "a", classes, args.parts)
        second = write_synthetic_results(Path(tmp) / "b", classes, args.parts, method="Point_MAE", seed=1)
        print(f"saved results of 2 runs x {args.classes} classes x {args.parts} parts written in "
              f"{time.perf_counter() - start:.1f} s")
        data = sum(p.stat().st_size for p in (first / "report_data").glob("*.npz"))
        print(f"report data of one run: {data / 1e6:.1f} MB")
        report = first / "report.html"
        times = timed_builds([first], report, args.repeat)
        assets = sum(p.stat().st_size for p in (first / "report_files").rglob("*") if p.is_file())
        print(f"report.html of {args.classes} x {args.parts} parts: {describe(*times)}, "
              f"{report.stat().st_size / 1e6:.1f} MB, report_files/ {assets / 1e6:.1f} MB")
        print(first_view(report))
        comparison = Path(tmp) / "comparison.html"
        times = timed_builds([first, second], comparison, args.repeat)
        print(f"comparison.html of two runs: {describe(*times)}, {comparison.stat().st_size / 1e6:.1f} MB")
        print(f"load average (1, 5, 15 min): {', '.join(f'{x:.1f}' for x in os.getloadavg())} on "
              f"{os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
