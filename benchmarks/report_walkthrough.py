#!/usr/bin/env python
"""The report page made by the real tools, end to end, on a data set with known faults; the docs' screenshot.

    python benchmarks/report_walkthrough.py --output benchmarks/report-walkthrough-cpu-2core.json \
        --screenshot docs/images/report.png

The data: tests/faulty_data.py's digits as class folders (32 px PNGs; 30 test images copied into train, 10 of them
resized and re-encoded as JPEG; 5% of the training labels flipped). Then, as a user would, with the defaults:

    python run_finetune.py --model resnet18 --from_scratch --image_size 16 --train_dir ... --output_dir RUN
        (the data check at its start, calibration at its end)
    python -m hf_transfer label-errors RUN
    python -m hf_transfer report RUN --output REPORT
and the page opened in a headless Chromium (playwright driving the system's browser), every image checked drawn,
a full-page screenshot taken. Recorded: the leaks the run's data check found against the planted ones, the
label-error list's precision and recall against the flipped files, the accuracy and ECE before and after the
temperature, and the seconds each step took.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

RECIPE = ["--model", "resnet18", "--from_scratch", "--image_size", "16", "--disable_tqdm", "true",
          "--dataloader_num_workers", "0", "--report_to", "none", "--save_total_limit", "1"]


def screenshot(page: Path, path: Path) -> int:
    """Open `page` in a headless Chromium, check every image was drawn, save a full-page screenshot; the images."""
    from playwright.sync_api import sync_playwright

    executable = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        tab = browser.new_page(viewport={"width": 1200, "height": 900})
        tab.goto(page.as_uri())
        tab.wait_for_load_state("load")
        drawn = tab.evaluate("Array.from(document.images).map(i => i.complete && i.naturalWidth > 0)")
        path.parent.mkdir(parents=True, exist_ok=True)
        tab.screenshot(path=str(path), full_page=True)
        browser.close()
    if not all(drawn):
        raise SystemExit(f"{drawn.count(False)} of {len(drawn)} images were not drawn")
    return len(drawn)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default=None, help="JSON of the figures")
    parser.add_argument("--screenshot", default=None, help="where to save the page's screenshot (e.g. docs/images/report.png)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()

    from faulty_data import faulty_digits

    import run_finetune
    from hf_transfer.cli.tools import main as tools

    work = Path(args.workdir or tempfile.mkdtemp(prefix="hf-transfer-report-"))
    data = faulty_digits(work / "data", seed=args.seed)
    seconds = {}
    started = time.perf_counter()
    results = run_finetune.main([*RECIPE, "--train_dir", data.train, "--validation_dir", data.validation,
                                 "--test_dir", data.test, "--seed", str(args.seed), "--output_dir", str(work / "run")])
    seconds["run"] = time.perf_counter() - started
    started = time.perf_counter()
    tools(["label-errors", str(work / "run")])
    seconds["label_errors"] = time.perf_counter() - started
    started = time.perf_counter()
    tools(["report", str(work / "run"), "--output", str(work / "report")])
    seconds["report"] = time.perf_counter() - started
    images = screenshot(work / "report" / "report.html", Path(args.screenshot or work / "report.png"))

    check = json.loads((work / "run" / "data_check.json").read_text())
    errors = json.loads((work / "run" / "label_errors.json").read_text())
    flagged = [image["file"] for image in errors["images"]]
    hits = sum(file in data.flipped for file in flagged)
    summary = {
        "machine": {"cpu": platform.machine(), "python": platform.python_version()},
        "data": {"train_files": sum(1 for p in Path(data.train).rglob("*") if p.is_file()),
                 "planted_leaks": {"exact": sum(leak.kind == "exact" for leak in data.leaks),
                                   "near": sum(leak.kind == "near" for leak in data.leaks)},
                 "flipped": len(data.flipped)},
        "data_check_leaks": check["leaks"],
        "label_errors": {"flagged": len(flagged), "of_them_flipped": hits,
                         "precision": round(hits / max(1, len(flagged)), 3),
                         "recall": round(hits / max(1, len(data.flipped)), 3), "folds": errors["folds"]},
        "test_accuracy": results.get("test_accuracy"),
        "test_ece": {"before": results.get("test_ece_uncalibrated"), "after": results.get("test_ece"),
                     "temperature": results.get("calibration_temperature")},
        "page_images_drawn": images,
        "seconds": {k: round(v, 1) for k, v in seconds.items()},
    }
    text = json.dumps(summary, indent=2)
    print(text)
    if args.output:
        Path(args.output).write_text(text + "\n")


if __name__ == "__main__":
    main()
