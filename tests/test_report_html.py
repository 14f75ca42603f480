"""The report as a user sees it: report.html made from real tiny runs, its thumbnails decoded and compared with the
images they stand for, and the page rendered in a headless Chromium (every image loads, the key numbers are on it;
a screenshot for the docs).

The data check, calibration and label-error files are written here in the format the runs write them
(data_check.json, calibration.json, the scores of test_predictions.json, label_errors.json), with values made here,
so that every section of the page is exercised."""

import base64
import functools
import io
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
from conftest import quick_flags
from helpers import texture_folders

import run_finetune
from hf_transfer.cli.tools import main as tools
from hf_transfer.data.sources import digits_dataset
from hf_transfer.errors import UserError

# The two digits runs the page is made from take 15-20 s on 2 busy cores, shared by the tests that read them.
SLOW = pytest.mark.slow
# The docs' screenshot is rewritten only when asked for (HF_TRANSFER_DOCS_SCREENSHOT=1), so a test run leaves the
# checkout as it was.
DOCS_SCREENSHOT = Path(__file__).resolve().parents[1] / "docs" / "images" / "report.png"
THUMB = re.compile(r'<img class="thumb" alt="[^"]*" data-split="(\w+)" data-row="(\d+)" src="data:image/png;base64,'
                   r'([^"]+)">')


def _digits_run(out: Path, epochs: int, *flags: str) -> Path:
    run_finetune.main(["--model", "resnet18", "--from_scratch", "--image_size", "16", "--dataset_name", "digits",
                       "--max_train_samples", "160", "--max_eval_samples", "80", "--num_train_epochs", str(epochs),
                       "--output_dir", str(out), *quick_flags(), "--per_device_train_batch_size", "32", *flags])
    return out


@pytest.fixture(scope="module")
def digits_runs(tmp_path_factory):
    """Two real runs on digits, the second shorter (the same test rows) and as an earlier version wrote it (no data
    check, calibration or scores: the page must say how to make them); the first has every file the page shows."""
    root = tmp_path_factory.mktemp("report-runs")
    full = _digits_run(root / "digits-full", epochs=2)
    facts = _write_diagnostics(full)
    short = _digits_run(root / "digits-short", 1)
    for name in ("data_check.json", "data_check.html", "calibration.json"):
        (short / name).unlink()
    predictions = json.loads((short / "test_predictions.json").read_text())
    del predictions["scores"], predictions["label_scores"]
    (short / "test_predictions.json").write_text(json.dumps(predictions))
    return full, short, facts


@functools.cache
def _digits():
    return digits_dataset()


def _expected(split: str, row: int) -> np.ndarray:
    """The digits image of `row` in `split` (train rows numbered before validation is carved out), RGB, from the
    data set itself."""
    return np.asarray(_digits()[split][row]["image"].convert("RGB"))


def _ece(confidence: np.ndarray, correct: np.ndarray, edges: np.ndarray) -> tuple[float, list[dict]]:
    bins, ece = [], 0.0
    for lower, upper in zip(edges[:-1], edges[1:]):
        inside = (confidence > lower) & (confidence <= upper)
        count = int(inside.sum())
        accuracy = float(correct[inside].mean()) if count else 0.0
        mean = float(confidence[inside].mean()) if count else 0.0
        ece += count / len(confidence) * abs(accuracy - mean)
        bins.append({"lower": float(lower), "upper": float(upper), "count": count, "accuracy": accuracy,
                     "confidence": mean})
    return ece, bins


def _write_diagnostics(run: Path) -> dict:
    """data_check.json, calibration.json, scores in test_predictions.json and label_errors.json, as the runs write
    them, with values made here; returns what the page must show."""
    rng = np.random.default_rng(0)
    predictions = json.loads((run / "test_predictions.json").read_text())
    wrong = np.asarray(predictions["labels"]) != np.asarray(predictions["predictions"])
    scores = rng.uniform(0.4, 1.0, len(wrong))
    label_scores = np.where(wrong, rng.uniform(0.0, 0.3, len(wrong)), scores)
    predictions.update(scores=scores.tolist(), label_scores=label_scores.tolist())
    (run / "test_predictions.json").write_text(json.dumps(predictions))

    edges = np.linspace(0, 1, 11)
    ece_before, bins_before = _ece(scores, ~wrong, edges)
    calibrated = np.clip(scores - scores.mean() + (~wrong).mean(), 0.05, 1.0)  # as a temperature would shift them
    ece_after, bins_after = _ece(calibrated, ~wrong, edges)
    measured = {"before": {"ece": ece_before, "bins": bins_before}, "after": {"ece": ece_after, "bins": bins_after}}
    (run / "calibration.json").write_text(json.dumps({
        "temperature": 1.37, "fitted_on": "validation", "folded_into": "classifier.weight, classifier.bias",
        "test": measured, "validation": measured}))
    results = json.loads((run / "all_results.json").read_text())
    results.update(test_ece=ece_after, test_ece_uncalibrated=ece_before, calibration_temperature=1.37)
    (run / "all_results.json").write_text(json.dumps(results))

    train_rows = rng.choice(len(_digits()["train"]), 7, replace=False).tolist()
    leaks = [(train_rows[i], predictions["rows"][i]) for i in range(3)]
    findings = [{"check": "exact_duplicate", "severity": "error", "message": f"train row {a} is test row {b}",
                 "images": [{"split": "train", "row": a, "file": None}, {"split": "test", "row": b, "file": None}]}
                for a, b in leaks]
    findings.append({"check": "imbalance", "severity": "warning", "message": "class 3 has 2x fewer images than 1",
                     "images": []})
    (run / "data_check.json").write_text(json.dumps({
        "splits": {"train": {"images": 1437, "classes": {str(i): 143 for i in range(10)}},
                   "test": {"images": 360, "classes": {str(i): 36 for i in range(10)}}},
        "leaks": {"exact": len(leaks), "near": 0}, "findings": findings}))

    flagged = [{"split": "train", "row": row, "file": None, "given": "3", "suggested": "8",
                "given_probability": round(0.05 + 0.01 * i, 3), "suggested_probability": 0.9}
               for i, row in enumerate(train_rows[3:])]
    (run / "label_errors.json").write_text(json.dumps({
        "method": "confident learning on 5-fold out-of-sample probabilities", "folds": 5, "flagged": len(flagged),
        "checked": 1437, "images": flagged}))
    worst = int(np.argmin(np.where(wrong, label_scores, np.inf)))
    return {"leaks": leaks, "flagged": [image["row"] for image in flagged], "ece": (ece_before, ece_after),
            "worst": (predictions["rows"][worst], predictions["labels"][worst]), "wrong": int(wrong.sum())}


def _report(runs: list[Path], output: Path) -> str:
    tools(["report", *map(str, runs), "--output", str(output)])
    return (output / "report.html").read_text()


def _thumbnails(page: str) -> list[tuple[str, int, np.ndarray]]:
    return [(split, int(row), np.asarray(PIL.Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB")))
            for split, row, data in THUMB.findall(page)]


def _section(page: str, title: str) -> str:
    start = page.index(f"<h3>{title}")
    end = page.find("<h3>", start + 1)
    return page[start:end if end > 0 else len(page)]


@SLOW
def test_every_section_of_a_run_with_all_its_files(digits_runs, tmp_path):
    run, _, facts = digits_runs
    page = _report([run], tmp_path / "report")
    assert not re.search(r'(src|href)="(https?:)?//', page) and "<script" not in page  # nothing from the network

    leaks = _thumbnails(_section(page, "Data check"))
    assert [(s, r) for s, r, _ in leaks] == [(s, r) for a, b in facts["leaks"] for s, r in (("train", a), ("test", b))]
    for split, row, picture in leaks:  # the pictures are the rows' own images (8x8 digits, kept whole)
        np.testing.assert_array_equal(picture, _expected(split, row))
    assert "<b>3</b> exact and <b>0</b> near" in page and "class 3 has 2x fewer images than 1" in page

    worst = _thumbnails(_section(page, "Worst errors"))
    row, label = facts["worst"]
    assert len(worst) == min(20, facts["wrong"]) and worst[0][:2] == ("test", row)
    np.testing.assert_array_equal(worst[0][2], _expected("test", row))
    assert f"true: {label}" in _section(page, "Worst errors") and "lowest probability of the true label first" in page

    flagged = _thumbnails(_section(page, "Likely label errors"))
    assert [r for _, r, _ in flagged] == facts["flagged"]
    for split, row, picture in flagged:
        np.testing.assert_array_equal(picture, _expected(split, row))

    before, after = facts["ece"]
    assert f"<b>{before:.4f}</b> before" in page and f"<b>{after:.4f}</b> after" in page
    assert "reliability diagram" in page and "no calibration.json" not in page and "no label_errors.json" not in page


@SLOW
def test_a_run_without_the_diagnostics_says_what_is_missing_and_how_to_make_it(digits_runs, tmp_path):
    _, run, _ = digits_runs
    page = _report([run], tmp_path / "report")
    assert "Data check: no data_check.json. Make it with <code>python -m hf_transfer check-data --dataset_name " \
           f"digits --output_dir {run}</code>" in page
    assert f"no label_errors.json. Make it with <code>python -m hf_transfer label-errors {run}</code>" in page
    assert "Calibration: no calibration.json" in page and "has no scores" in page
    assert "Deployment: no latency table (deployment.json, written by an export)" in page
    assert f"<code>python -m hf_transfer export {run} --quantize int8</code>" in page
    predictions = json.loads((run / "test_predictions.json").read_text())
    for split, row, picture in _thumbnails(page):  # ordered without scores, still the right pictures
        np.testing.assert_array_equal(picture, _expected(split, row))
        assert predictions["labels"][predictions["rows"].index(row)] != predictions["predictions"][
            predictions["rows"].index(row)]


@SLOW
def test_two_runs_compared_agreement_and_per_class_differences(digits_runs, tmp_path):
    first, second, _ = digits_runs
    page = _report([first, second], tmp_path / "report")
    a, b = (json.loads((run / "test_predictions.json").read_text()) for run in (first, second))
    assert a["rows"] == b["rows"]
    agreement = float(np.mean(np.asarray(a["predictions"]) == np.asarray(b["predictions"])))
    assert f'<td class="num">{agreement:.4f}</td>' in _section(page, "Agreement on the test images")
    f1 = [json.loads((run / "test_per_class.json").read_text()) for run in (first, second)]
    spread = max(abs(f1[0][c]["f1-score"] - f1[1][c]["f1-score"]) for c in map(str, range(10)))
    differences = _section(page, "Per-class differences")
    assert re.findall(r'<td class="num">([\d.]+)</td></tr>', differences)[0] == f"{spread:.4f}"
    results = json.loads((first / "all_results.json").read_text())
    assert f"{results['test_accuracy']:.4f}" in page.split('id="run0"')[0]  # in the comparison table


def test_thumbnails_of_an_image_folder_run_come_from_its_files(tmp_path):
    data = texture_folders(tmp_path / "data", {"train": 4, "test": 3})
    run = tmp_path / "run"
    run_finetune.main(["--model", "resnet18", "--from_scratch", "--image_size", "16", "--train_dir",
                       str(data / "train"), "--test_dir", str(data / "test"), "--output_dir", str(run),
                       "--max_steps", "2", *quick_flags()])
    predictions = json.loads((run / "test_predictions.json").read_text())
    shutil.move(data / "train", tmp_path / "moved")  # the training images are not needed: the test files are named
    page = _report([run], tmp_path / "report")
    shown = _thumbnails(page)
    wrong = sum(a != b for a, b in zip(predictions["labels"], predictions["predictions"]))
    assert len(shown) == min(20, wrong) > 0
    for split, row, picture in shown:
        assert split == "test"
        file = predictions["files"][predictions["rows"].index(row)]
        np.testing.assert_array_equal(picture, np.asarray(PIL.Image.open(file).convert("RGB")))
        assert f'title="{file}"' in page


def test_an_evaluation_only_run_is_reported_beside_the_run_it_evaluated(tmp_path):
    """The page tells a run without calibration.json to evaluate it again into a new folder (--do_train false);
    that folder was then refused ("not a finished run: train_results.json is missing")."""
    data = texture_folders(tmp_path / "data", {"train": 4, "test": 3})
    run, evaluation = tmp_path / "run", tmp_path / "evaluation"
    folders = ["--train_dir", str(data / "train"), "--test_dir", str(data / "test")]
    run_finetune.main(["--model", "resnet18", "--from_scratch", "--image_size", "16", *folders, "--output_dir",
                       str(run), "--max_steps", "2", *quick_flags()])
    run_finetune.main(["--model_name_or_path", str(run), "--do_train", "false", *folders, "--output_dir",
                       str(evaluation), *quick_flags()])
    page = _report([run, evaluation], tmp_path / "report")
    table = (tmp_path / "report" / "report.md").read_text()
    accuracy = json.loads((evaluation / "all_results.json").read_text())["test_accuracy"]
    row = next(line for line in table.splitlines() if line.startswith("| evaluation |"))
    assert f"{accuracy:.4f}" in row and "resnet18" in row  # the evaluated model's architecture
    section = page[page.index('id="run1"'):]
    assert f"<b>{accuracy:.4f}</b>" in section and "the run did not train" in section
    assert '<td class="num">1.0000</td>' in _section(page, "Agreement on the test images")  # the same model


def test_the_leak_count_is_named_for_the_splits_it_counts(tmp_path):
    """data_check.json's leak counts are validation and test images seen by an earlier split; the page called them
    "leaked test images", so a validation image copied from train read as a test leak."""
    from hf_transfer.tools.report_html import _key_numbers

    (tmp_path / "all_results.json").write_text(json.dumps({"test_accuracy": 0.9}))
    image = {"split": "train", "row": 3, "file": None}
    (tmp_path / "data_check.json").write_text(json.dumps({
        "splits": {}, "leaks": {"exact": 1, "near": 0},
        "findings": [{"check": "exact_duplicate", "severity": "error", "message": "the same image in train (row 3) "
                      "and validation (row 9)", "images": [image, {**image, "split": "validation", "row": 9}]}]}))
    numbers = _key_numbers(tmp_path)
    assert "leaked validation/test images (exact / near)<b>1 / 0</b>" in numbers and "leaked test" not in numbers


def test_a_folder_that_is_not_a_run_is_refused_in_one_line(tmp_path):
    with pytest.raises(UserError, match=r"'.*not-a-run' is not a finished run: train_results.json is missing"):
        tools(["report", str(tmp_path / "not-a-run"), "--output", str(tmp_path / "report")])


# ---------------------------------------------------------------- in a browser

# Each image's natural width once drawn, 0 where it did not load or decode: a PNG cut short still has its size
# (the header) but leaves its last pixel unpainted, so the last pixel must be opaque (the page's images all are).
PAINTED = """Array.from(document.images).map(image => {
    if (!image.complete || !image.naturalWidth) return 0;
    const canvas = document.createElement("canvas");
    canvas.width = image.naturalWidth;
    canvas.height = image.naturalHeight;
    const context = canvas.getContext("2d");
    context.drawImage(image, 0, 0);
    const last = context.getImageData(image.naturalWidth - 1, image.naturalHeight - 1, 1, 1).data;
    return last[3] === 255 ? image.naturalWidth : 0;
})"""


def _browser() -> str | None:
    """A Chromium to drive: $HF_TRANSFER_CHROMIUM, the system's, or playwright's own download."""
    for candidate in (os.environ.get("HF_TRANSFER_CHROMIUM"), shutil.which("chromium"),
                      shutil.which("chromium-browser"), shutil.which("google-chrome")):
        if candidate and Path(candidate).is_file():
            return candidate
    try:
        from playwright.sync_api import sync_playwright

        with sync_playwright() as p:
            return p.chromium.executable_path if Path(p.chromium.executable_path).is_file() else None
    except Exception:  # playwright absent or its browser not downloaded
        return None


@pytest.fixture(scope="module")
def browser():
    pytest.importorskip("playwright", reason="the browser test drives Chromium with playwright: pip install playwright")
    executable = _browser()
    if executable is None:
        pytest.skip("no Chromium found (apt-get install chromium, or playwright install chromium; or set "
                    "HF_TRANSFER_CHROMIUM to its path)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        launched = p.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        yield launched
        launched.close()


@SLOW
def test_the_page_in_a_browser_loads_every_image_and_shows_the_key_numbers(digits_runs, browser, tmp_path):
    run, _, facts = digits_runs
    _report([run], tmp_path / "report")
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    requests = []
    page.on("request", lambda request: requests.append(request.url))
    page.goto((tmp_path / "report" / "report.html").as_uri())
    page.wait_for_load_state("load")
    widths = page.evaluate(PAINTED)
    text = page.inner_text("body")
    results = json.loads((run / "all_results.json").read_text())
    assert len(widths) >= 3 + 2 * len(facts["leaks"]) + len(facts["flagged"]) and all(widths), widths
    for number in (f"{results['test_accuracy']:.4f}", f"{facts['ece'][0]:.4f}", f"{facts['ece'][1]:.4f}",
                   f"{len(facts['leaks'])} / 0"):
        assert number in text, number
    assert [url for url in requests if not url.startswith(("file:", "data:"))] == []
    screenshot = DOCS_SCREENSHOT if os.environ.get("HF_TRANSFER_DOCS_SCREENSHOT") == "1" else tmp_path / "report.png"
    page.screenshot(path=str(screenshot), full_page=True)
    page.close()
    assert PIL.Image.open(screenshot).size[0] == 1200
