"""The report as one HTML page that opens offline in any browser: every figure and thumbnail inline (data: URIs),
the style inline, no script, no font and nothing else from the network.

Per run: the key numbers, the data check's findings with the leaked pairs side by side, the training curves, the
confusion matrix, the reliability diagram, the latency and size table of its latest export (`export`), and the test
images the model gets most wrong and the likely label errors as thumbnails. For several runs first: the comparison
table, how often the runs agree on the test images, and the classes on which they differ most. A section whose file a
run lacks says so in one line, with the command that makes it.
"""

from __future__ import annotations

import json
import shlex
from html import escape
from pathlib import Path

from . import report_plots
from .deployment import cells, exported_table
from .run_images import RunImages, data_uri, thumbnail_uri

MOST_WRONG = 20  # test images shown as the worst errors
LABEL_ERRORS = 20  # likely label errors shown
LEAKED_PAIRS = 30  # duplicate findings shown side by side
KEY_NUMBERS = [  # (results key, what the page calls it, format)
    ("test_accuracy", "test accuracy", "{:.4f}"),
    ("test_map", "test mAP", "{:.4f}"),
    ("test_f1", "test F1", "{:.4f}"),
    ("test_ece", "test ECE (calibrated)", "{:.4f}"),
    ("test_ece_uncalibrated", "test ECE (uncalibrated)", "{:.4f}"),
    ("calibration_temperature", "temperature", "{:.3f}"),
    ("eval_accuracy", "validation accuracy", "{:.4f}"),
    ("test_teacher_accuracy", "teacher test accuracy", "{:.4f}"),
    ("test_agreement", "agreement with the teacher", "{:.4f}"),
    ("train_samples", "training images", "{:d}"),
    ("test_samples", "test images", "{:d}"),
    ("train_runtime", "training time (s)", "{:.1f}"),
]

STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0 auto; max-width: 1200px;
       padding: 1em 2em; color: #222; }
h1 { border-bottom: 2px solid #ccc; } h2 { margin-top: 2em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 0.5em 0; } td, th { border: 1px solid #ccc; padding: 3px 8px; }
th { background: #f2f2f2; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.numbers { display: flex; flex-wrap: wrap; gap: 0.6em; }
.number { border: 1px solid #ccc; border-radius: 6px; padding: 0.4em 0.8em; min-width: 8em; }
.number b { display: block; font-size: 1.4em; }
.missing { color: #8a6d00; background: #fff8dc; padding: 0.3em 0.6em; border-left: 4px solid #e0b000; }
.error { color: #a00; } .warning { color: #8a6d00; } .info { color: #555; }
.grid { display: flex; flex-wrap: wrap; gap: 0.8em; }
figure { margin: 0; padding: 0.3em; border: 1px solid #ddd; border-radius: 4px; width: 140px; font-size: 0.85em; }
figure img.thumb { width: 128px; height: 128px; object-fit: contain; image-rendering: pixelated; background: #eee; }
.pair { display: flex; gap: 0.3em; align-items: flex-start; border: 2px solid #d55; border-radius: 6px;
        padding: 0.3em; }
img.plot { max-width: 100%; } img.matrix { max-width: 520px; }
nav a { margin-right: 1em; }
"""


def write_html(runs: list[Path], table: list[tuple[str, list[str]]], output: Path) -> Path:
    """Write `output/report.html` for `runs` (the comparison `table` as (title, cells by
    run) columns) and return its path."""
    parts = [_comparison(runs, table, output)] if len(runs) > 1 else []
    parts += [_run_section(run, index) for index, run in enumerate(runs)]
    nav = " ".join(f'<a href="#run{i}">{escape(run.name)}</a>' for i, run in enumerate(runs))
    title = "Run report: " + ", ".join(run.name for run in runs)
    page = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>'
            f"<style>{STYLE}</style></head><body><h1>{escape(title)}</h1><nav>{nav}</nav>"
            + "".join(parts) + "</body></html>\n")
    path = output / "report.html"
    path.write_text(page, encoding="utf-8")
    return path


# ---------------------------------------------------------------- several runs


def _comparison(runs: list[Path], table: list[tuple[str, list[str]]], output: Path) -> str:
    head = "".join(f"<th>{escape(title)}</th>" for title, _ in table)
    body = "".join("<tr>" + "".join(f'<td class="num">{escape(cells[i])}</td>' for _, cells in table) + "</tr>"
                   for i in range(len(runs)))
    curves = output / "curves.png"
    parts = ['<section id="comparison"><h2>Comparison</h2>', f"<table><tr>{head}</tr>{body}</table>"]
    if curves.is_file():
        parts.append(f'<img class="plot" alt="training curves of every run" src="{data_uri(curves.read_bytes())}">')
    parts += [_agreement(runs), _per_class_differences(runs), "</section>"]
    return "".join(parts)


def _agreement(runs: list[Path]) -> str:
    """Share of the test images on which two runs predict the same (a distilled run against its teacher: how much
    of the teacher the student learned), over the rows both predicted."""
    predictions = {run: _json(run, "test_predictions.json") for run in runs}
    have = [run for run in runs if predictions[run]]
    if len(have) < 2:
        return _missing("Agreement: fewer than two runs have test_predictions.json (written by a run's test "
                        "evaluation; a run without a test split has none).")
    by_row = {run: dict(zip(predictions[run]["rows"], map(json.dumps, predictions[run]["predictions"])))
              for run in have}
    head = "".join(f"<th>{escape(run.name)}</th>" for run in have)
    lines = []
    for a in have:
        cells = []
        for b in have:
            common = by_row[a].keys() & by_row[b].keys()
            share = sum(by_row[a][r] == by_row[b][r] for r in common) / len(common) if common else None
            cells.append(f'<td class="num">{share:.4f}</td>' if share is not None else "<td>no common rows</td>")
        lines.append(f"<tr><th>{escape(a.name)}</th>{''.join(cells)}</tr>")
    return ("<h3>Agreement on the test images</h3><p>Share of the test images on which two runs predict the same "
            "(a student against its teacher: how much of the teacher it learned).</p>"
            f"<table><tr><th></th>{head}</tr>{''.join(lines)}</table>")


def _per_class_differences(runs: list[Path]) -> str:
    reports = {run: _json(run, "test_per_class.json") for run in runs}
    have = [run for run in runs if reports[run]]
    if len(have) < 2:
        return _missing("Per-class differences: fewer than two runs have test_per_class.json (written by a run's "
                        "test evaluation).")
    summary = {"accuracy", "macro avg", "weighted avg", "micro avg", "samples avg"}
    classes = [name for name in reports[have[0]] if name not in summary and isinstance(reports[have[0]][name], dict)]
    f1 = {name: [reports[run].get(name, {}).get("f1-score") for run in have] for name in classes}
    spread = {name: max(v for v in values if v is not None) - min(v for v in values if v is not None)
              for name, values in f1.items() if any(v is not None for v in values)}
    order = sorted(spread, key=lambda name: -spread[name])
    head = "".join(f"<th>{escape(run.name)}</th>" for run in have)
    lines = ["<tr><td>" + escape(name) + "</td>"
             + "".join(f'<td class="num">{v:.4f}</td>' if v is not None else "<td>-</td>" for v in f1[name])
             + f'<td class="num">{spread[name]:.4f}</td></tr>' for name in order]
    return ("<h3>Per-class differences</h3><p>Test F1 of each class, the classes on which the runs differ most "
            f"first.</p><table><tr><th>class</th>{head}<th>largest difference</th></tr>{''.join(lines)}</table>")


# ---------------------------------------------------------------- one run


def _run_section(run: Path, index: int) -> str:
    images = RunImages(run)
    labels = _label_names(run)
    parts = [f'<section id="run{index}"><h2>{escape(run.name)}</h2><p><code>{escape(str(run))}</code></p>',
             _key_numbers(run), _data_check(run, images, labels), _curves(run), _confusion(run),
             _calibration(run), _deployment(run), _most_wrong(run, images, labels), _label_errors(run, images)]
    if images.problem:
        parts.append(_missing(f"Some pictures are not shown: {images.problem}."))
    return "".join(parts) + "</section>"


def _key_numbers(run: Path) -> str:
    results = _json(run, "all_results.json") or {}
    check = _json(run, "data_check.json")
    cards = [(title, fmt.format(results[key])) for key, title, fmt in KEY_NUMBERS if results.get(key) is not None]
    if check:
        leaks = check.get("leaks", {})
        cards.append(("leaked validation/test images (exact / near)", f"{leaks.get('exact', 0)} / {leaks.get('near', 0)}"))
    if not cards:
        return _missing("No all_results.json: the run did not finish.")
    boxes = "".join(f'<div class="number">{escape(title)}<b>{escape(value)}</b></div>' for title, value in cards)
    return f'<h3>Key numbers</h3><div class="numbers">{boxes}</div>'


def _data_check(run: Path, images: RunImages, labels: list[str]) -> str:
    check = _json(run, "data_check.json")
    if check is None:
        return _missing("Data check: no data_check.json. Make it with <code>python -m hf_transfer check-data "
                        f"{escape(_data_flags(run))} --output_dir {escape(str(run))}</code>.")
    leaks = check.get("leaks", {})
    splits = check.get("splits", {})
    split_rows = "".join(f"<tr><td>{escape(name)}</td><td class='num'>{facts.get('images', '-')}</td>"
                         f"<td class='num'>{len(facts.get('classes', {}))}</td></tr>" for name, facts in splits.items())
    findings = check.get("findings", [])
    finding_rows = "".join(f"<tr class='{escape(f.get('severity', 'info'))}'><td>{escape(f.get('severity', ''))}"
                           f"</td><td>{escape(f.get('check', ''))}</td><td>{escape(f.get('message', ''))}</td></tr>"
                           for f in findings)
    duplicates = [f for f in findings if f.get("check") in ("exact_duplicate", "near_duplicate")]
    pairs = "".join(_pair(f, images) for f in duplicates[:LEAKED_PAIRS])
    more = (f"<p>{len(duplicates) - LEAKED_PAIRS} more in {escape(str(run / 'data_check.json'))}.</p>"
            if len(duplicates) > LEAKED_PAIRS else "")
    return (f"<h3>Data check</h3><p><b>{leaks.get('exact', 0)}</b> exact and <b>{leaks.get('near', 0)}</b> near "
            f"duplicates across splits (leaks); {len(findings)} findings.</p>"
            f"<table><tr><th>split</th><th>images</th><th>classes</th></tr>{split_rows}</table>"
            + (f"<table><tr><th>severity</th><th>check</th><th>finding</th></tr>{finding_rows}</table>"
               if findings else "<p>No findings.</p>")
            + (f"<h4>Duplicates side by side</h4><div class='grid'>{pairs}</div>{more}" if pairs else ""))


def _pair(finding: dict, images: RunImages) -> str:
    distance = f" (distance {finding['distance']})" if finding.get("distance") is not None else ""
    pictures = "".join(_thumbnail(images, image, [f"{image['split']} row {image['row']}"])
                       for image in finding.get("images", []))
    return (f"<div class='pair' title='{escape(finding.get('message', ''))}'>{pictures}"
            f"<small>{escape(finding['check'].replace('_', ' '))}{escape(distance)}</small></div>")


def _curves(run: Path) -> str:
    state = _json(run, "trainer_state.json")
    if state is None or not state.get("log_history"):
        return _missing("Training curves: no trainer_state.json with a log history (the run did not train).")
    metric = "accuracy" if any("eval_accuracy" in h for h in state["log_history"]) else "map"
    png = report_plots.curves(state["log_history"], metric)
    return f'<h3>Training curves</h3><img class="plot" alt="training curves" src="{data_uri(png)}">'


def _confusion(run: Path) -> str:
    path = run / "test_confusion_matrix.png"
    if not path.is_file():
        return _missing("Confusion matrix: no test_confusion_matrix.png (written by a run's test evaluation; the "
                        "run had no test split or ran with --do_predict false).")
    return (f'<h3>Confusion matrix (test split)</h3><img class="plot matrix" alt="confusion matrix" '
            f'src="{data_uri(path.read_bytes())}">')


def _calibration(run: Path) -> str:
    calibration = _json(run, "calibration.json")
    if calibration is None or "test" not in calibration:
        return _missing("Calibration: no calibration.json (written after the test evaluation when calibration is "
                        "on; evaluate the run again with this version: <code>python run_finetune.py "
                        f"--model_name_or_path {escape(str(run))} --do_train false {escape(_data_flags(run))} "
                        "--output_dir NEW_DIR</code>).")
    test = calibration["test"]
    before, after = test.get("before", {}), test.get("after")
    temperature = calibration.get("temperature")
    png = report_plots.reliability(before, after, temperature)
    line = f"Expected calibration error on the test split: <b>{before.get('ece', float('nan')):.4f}</b> before"
    if after:
        line += (f", <b>{after.get('ece', float('nan')):.4f}</b> after dividing the logits by the temperature "
                 f"<b>{temperature:.3f}</b> fitted on {escape(str(calibration.get('fitted_on', '?')))}")
    if calibration.get("folded_into"):
        line += f" (folded into {escape(calibration['folded_into'])}: the saved model gives these probabilities)"
    return (f"<h3>Calibration</h3><p>{line}.</p>"
            f'<img class="plot" alt="reliability diagram" src="{data_uri(png)}">')


def _deployment(run: Path) -> str:
    table = exported_table(run)
    if table is None:
        return _missing("Deployment: no latency table (deployment.json, written by an export). Measure the "
                        "model's size and latency in ONNX fp32 and int8 (a distilled student's beside its teacher's) with "
                        f"<code>python -m hf_transfer export {escape(shlex.quote(str(run)))} --quantize int8</code>.")
    titles, rows, note = cells(table)
    head = "".join(f"<th>{escape(title)}</th>" for title in titles)
    body = "".join("<tr>" + "".join(f"<td{'' if i < 2 else ' class=num'}>{escape(cell)}</td>"
                                    for i, cell in enumerate(row)) + "</tr>" for row in rows)
    return (f"<h3>Deployment: latency and size</h3><table><tr>{head}</tr>{body}</table>"
            f"<p><small>{escape(note.replace('`', ''))}"
            + (f" Files: <code>{escape(table['files'])}</code>." if table.get("files") else "") + "</small></p>")


def _most_wrong(run: Path, images: RunImages, labels: list[str]) -> str:
    predictions = _json(run, "test_predictions.json")
    if predictions is None:
        return _missing("Worst errors: no test_predictions.json (written by a run's test evaluation; the run had "
                        "no test split).")
    wrong, order = worst_errors(predictions)
    if not wrong:
        return "<h3>Worst errors</h3><p>The model gets every test image right.</p>"
    files = predictions.get("files") or [None] * len(predictions["rows"])
    figures = []
    for i in wrong[:MOST_WRONG]:
        caption = [f"true: {_names(predictions['labels'][i], labels)}",
                   f"predicted: {_names(predictions['predictions'][i], labels)}"]
        if _scalar(predictions.get("scores"), i) is not None:
            caption.append(f"score {predictions['scores'][i]:.3f}")
        if _scalar(predictions.get("label_scores"), i) is not None:
            caption.append(f"p(true) {predictions['label_scores'][i]:.3f}")
        caption.append(f"test row {predictions['rows'][i]}")
        figures.append(_thumbnail(images, {"split": "test", "row": predictions["rows"][i], "file": files[i]}, caption))
    note = "" if _scalar(predictions.get("scores"), 0) is not None else _missing(
        "test_predictions.json has no scores (runs of earlier versions): the errors are ordered by the most "
        "frequent confusions instead of by how sure the model was.")
    return (f"<h3>Worst errors ({len(wrong)} of {len(predictions['rows'])} test images wrong; {order})</h3>{note}"
            f"<div class='grid'>{''.join(figures)}</div>")


def worst_errors(predictions: dict) -> tuple[list[int], str]:
    """Positions of the wrongly predicted test images, worst first, and how they are ordered: by the probability
    the model gave the true label (lowest first), else by its confidence in its wrong answer, else (no scores) the
    most frequent confusions (true, predicted) first, a systematic error before a one-off."""
    given, predicted = predictions["labels"], predictions["predictions"]
    wrong = [i for i in range(len(given)) if _as_set(given[i]) != _as_set(predicted[i])]
    label_scores, scores = predictions.get("label_scores"), predictions.get("scores")
    if wrong and _scalar(label_scores, wrong[0]) is not None:
        return sorted(wrong, key=lambda i: label_scores[i]), "lowest probability of the true label first"
    if wrong and _scalar(scores, wrong[0]) is not None:
        return sorted(wrong, key=lambda i: -scores[i]), "most confident first"
    pair = [json.dumps([given[i], predicted[i]]) for i in range(len(given))]
    counts = {p: pair.count(p) for p in set(pair[i] for i in wrong)}
    return sorted(wrong, key=lambda i: (-counts[pair[i]], pair[i], i)), "most frequent confusions first"


def _label_errors(run: Path, images: RunImages) -> str:
    found = _json(run, "label_errors.json")
    if found is None:
        return _missing("Likely label errors: no label_errors.json. Make it with <code>python -m hf_transfer "
                        f"label-errors {escape(str(run))}</code>.")
    figures = []
    for image in found.get("images", [])[:LABEL_ERRORS]:
        caption = [f"given: {image.get('given')}", f"suggested: {image.get('suggested')}"]
        if image.get("given_probability") is not None:
            caption.append(f"p(given) {image['given_probability']:.3f}")
        if image.get("suggested_probability") is not None:
            caption.append(f"p(suggested) {image['suggested_probability']:.3f}")
        caption.append(f"{image['split']} row {image['row']}")
        figures.append(_thumbnail(images, image, caption))
    return (f"<h3>Likely label errors</h3><p>{found.get('flagged', len(found.get('images', [])))} of "
            f"{found.get('checked', '?')} images flagged ({escape(str(found.get('method', '')))}); the most disputed "
            f"first.</p><div class='grid'>{''.join(figures)}</div>")


# ---------------------------------------------------------------- pieces


def _thumbnail(images: RunImages, image: dict, caption: list[str]) -> str:
    text = "<br>".join(escape(str(line)) for line in caption)
    try:
        picture = images.picture(image["split"], image["row"], image.get("file"))
    except (OSError, ValueError) as exc:  # a file that no longer decodes: said on the figure, the page still made
        picture, text = None, text + f"<br><span class='error'>unreadable: {escape(str(exc))}</span>"
    where = f' title="{escape(image["file"])}"' if image.get("file") else ""
    if picture is None:
        return f"<figure{where}><div class='missing'>no picture</div><figcaption>{text}</figcaption></figure>"
    return (f'<figure{where}><img class="thumb" alt="{escape(image["split"])} row {int(image["row"])}" '
            f'data-split="{escape(image["split"])}" data-row="{int(image["row"])}" src="{thumbnail_uri(picture)}">'
            f"<figcaption>{text}</figcaption></figure>")


def _missing(sentence: str) -> str:
    return f'<p class="missing">{sentence}</p>'


def _json(run: Path, name: str) -> dict | None:
    path = run / name
    return json.loads(path.read_text()) if path.is_file() else None


def _label_names(run: Path) -> list[str]:
    matrix = _json(run, "test_confusion_matrix.json")
    if matrix and matrix.get("labels"):
        return list(matrix["labels"])
    config = _json(run, "config.json") or {}
    id2label = config.get("id2label") or {}
    return [id2label[k] for k in sorted(id2label, key=int)] or list(config.get("label_names") or [])


def _names(value, labels: list[str]) -> str:
    ids = value if isinstance(value, list) else [value]
    named = [labels[i] if isinstance(i, int) and 0 <= i < len(labels) else str(i) for i in ids]
    return ", ".join(named) if named else "(none)"


def _as_set(value):
    return frozenset(value) if isinstance(value, list) else value


def _scalar(values, i: int):
    """values[i] when it is one number (a single-label score), else None (absent, or a multi-label list)."""
    if not values or i >= len(values) or isinstance(values[i], (list, dict)):
        return None
    return values[i]


def _data_flags(run: Path) -> str:
    """The data flags the run was given, as they are typed (`--dataset_name digits`), for the commands the page
    suggests; a placeholder when the run did not record them."""
    saved = _json(run, "run_args.json") or {}
    data = (saved.get("resolved") or {}).get("data") or {}
    names = ("dataset_name", "dataset_config_name", "train_dir", "validation_dir", "test_dir", "image_column",
             "label_column")
    flags = " ".join(f"--{name} {data[name]}" for name in names if data.get(name) not in (None, ""))
    return flags or "<the run's data flags>"
