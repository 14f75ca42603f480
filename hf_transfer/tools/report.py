"""The comparison report: finished runs side by side, from their own files.

`python -m hf_transfer report runs/resnet50 runs/vit runs/distilled --output reports/cnn-vs-vit`
reads each output directory (results JSON, trainer state, confusion matrix, weights header),
prints a Markdown table and writes it with the plots: the tutorial's "key differences between
CNN and ViT", made of measurements.
"""

from __future__ import annotations

import json
from pathlib import Path

from tqdm.auto import tqdm

from ..errors import UserError
from ..tasks.metrics import draw_confusion_matrix
from .deployment import exported_table, markdown
from .report_html import write_html

COLUMNS = [
    ("run", "run", "{}"),
    ("model", "model", "{}"),
    ("parameters_m", "params (M)", "{:.2f}"),
    ("test_accuracy", "test acc", "{:.4f}"),
    ("test_map", "test mAP", "{:.4f}"),
    ("test_f1", "test F1", "{:.4f}"),
    ("train_runtime_s", "train time (s)", "{:.1f}"),
    ("train_images_per_s", "train img/s", "{:.1f}"),
    ("eval_images_per_s", "eval img/s", "{:.1f}"),
    ("peak_memory_mb", "peak mem (MB)", "{:.0f}"),
    ("epochs_to_best", "epochs to best", "{:g}"),
    ("test_teacher_accuracy", "teacher acc", "{:.4f}"),
    ("test_agreement", "agreement", "{:.4f}"),
]


def _read(run: Path, name: str) -> dict:
    path = run / name
    if not path.exists():
        raise UserError(f"'{run}' is not a finished run: {name} is missing")
    return json.loads(path.read_text())


def count_parameters(run: Path) -> int:
    """The model's parameters (not its buffers), counted on a weightless copy built from the saved config."""
    import torch
    from transformers import AutoConfig, AutoModelForImageClassification

    with torch.device("meta"):
        model = AutoModelForImageClassification.from_config(AutoConfig.from_pretrained(run))
    return sum(p.numel() for p in model.parameters())


def _model_name(run: Path) -> str:
    config = _read(run, "config.json")
    return config.get("architecture") or (config.get("architectures") or [config.get("model_type", "?")])[0]


def _evaluated_model(run: Path) -> Path | None:
    """The model folder an evaluation-only run (--do_train false) evaluated, which holds its config (the run's own
    folder holds none); None for a run that trained."""
    saved = json.loads((run / "run_args.json").read_text()) if (run / "run_args.json").is_file() else {}
    if saved.get("command") != "evaluate":
        return None
    model = Path((saved.get("shaping") or {}).get("model.model_name_or_path") or "")
    if not (model / "config.json").is_file():
        raise UserError(f"'{run}' is an evaluation of {model}, which no longer holds the model's config.json: "
                        "evaluate it again from where the model is now")
    return model


def _epochs_to_best(state: dict) -> float | None:
    evals = [h for h in state["log_history"] if "eval_accuracy" in h]
    if not evals:
        return None
    best_step = state.get("best_global_step")
    best = next((h for h in evals if h["step"] == best_step), None) or max(evals, key=lambda h: h["eval_accuracy"])
    return round(best["epoch"], 2)


def summarize(run: str | Path) -> dict:
    run = Path(run)
    evaluated = _evaluated_model(run)  # an evaluation-only run: no training to report, the model is elsewhere
    train = _read(run, "train_results.json") if evaluated is None else {}
    evaluation = _read(run, "eval_results.json")
    test = _read(run, "test_results.json") if (run / "test_results.json").exists() else {}
    state = _read(run, "trainer_state.json") if evaluated is None else {"log_history": []}
    model = evaluated or run
    return {
        "run": run.name,
        "path": str(run),
        "model": _model_name(model),
        "parameters_m": count_parameters(model) / 1e6,
        "test_accuracy": test.get("test_accuracy"),
        "test_map": test.get("test_map"),
        "test_f1": test.get("test_f1"),
        "train_runtime_s": train.get("train_runtime"),
        "train_images_per_s": train.get("train_samples_per_second"),
        "eval_images_per_s": evaluation.get("eval_samples_per_second"),
        "peak_memory_mb": train.get("train_peak_memory_mb"),
        "peak_memory_of": train.get("train_peak_memory_of"),
        "epochs_to_best": _epochs_to_best(state),
        "test_teacher_accuracy": test.get("test_teacher_accuracy"),
        "test_agreement": test.get("test_agreement"),
    }


def table_columns(rows: list[dict]) -> list[tuple[str, list[str]]]:
    """The comparison's columns that some run has a value for: (title, the runs' formatted cells)."""
    columns = [c for c in COLUMNS if any(row.get(c[0]) is not None for row in rows)]
    return [(title, [fmt.format(row[key]) if row.get(key) is not None else "-" for row in rows])
            for key, title, fmt in columns]


def markdown_table(rows: list[dict]) -> str:
    columns = table_columns(rows)
    lines = ["| " + " | ".join(title for title, _ in columns) + " |", "|" + "---|" * len(columns)]
    for i in range(len(rows)):
        lines.append("| " + " | ".join(cells[i] for _, cells in columns) + " |")
    return "\n".join(lines)


def build_report(runs: list[str | Path], output: str | Path) -> str:
    """Write report.md, summary.json, curves.png, confusion_matrices.png and report.html (report_html.py: the same
    and each run's pictures, in one page that opens offline) into `output`; return the Markdown table."""
    if not runs:
        raise UserError("name at least one run directory")
    rows = [summarize(run) for run in tqdm(runs, desc="reading runs", leave=False, disable=len(runs) < 3)]
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    table = markdown_table(rows)
    memory = {row["peak_memory_of"] for row in rows if row.get("peak_memory_of")}
    notes = [
        "Test metrics on each run's test split; images/s from the Trainer (training, and evaluation on the "
        "validation split); peak memory of " + (", ".join(sorted(memory)) or "unknown") + "; epochs to best = "
        "the epoch whose validation accuracy chose the final checkpoint.",
    ]
    deployed = [(Path(run), exported_table(Path(run))) for run in runs]
    deployment = [f"## Deployment of {run}: latency and size\n\n{markdown(latency)}"
                  + (f" Files: `{latency['files']}`." if latency.get("files") else "") + "\n"
                  for run, latency in deployed if latency]  # written by export
    text = "\n".join(["# Run comparison", "", table, "", *notes, "", *deployment, "![curves](curves.png)", "",
                      "![confusion matrices](confusion_matrices.png)", ""])
    (output / "report.md").write_text(text)
    (output / "summary.json").write_text(json.dumps(rows, indent=2))
    _plot_curves([Path(r) for r in runs], output / "curves.png")
    _plot_confusion_matrices([Path(r) for r in runs], output / "confusion_matrices.png")
    write_html([Path(r) for r in runs], table_columns(rows), output)
    return table


def _plot_curves(runs: list[Path], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for run in runs:
        if not (run / "trainer_state.json").is_file():  # an evaluation-only run (summarize let only these through)
            continue
        history = _read(run, "trainer_state.json")["log_history"]
        train = [(h["epoch"], h["loss"]) for h in history if "loss" in h]
        evals = [(h["epoch"], h["eval_loss"], h["eval_accuracy"]) for h in history if "eval_accuracy" in h]
        if train:
            axes[0].plot(*zip(*train), label=run.name)
        if evals:
            epochs, losses, accuracies = zip(*evals)
            axes[1].plot(epochs, losses, marker="o", label=run.name)
            axes[2].plot(epochs, accuracies, marker="o", label=run.name)
    for ax, title in zip(axes, ("training loss", "validation loss", "validation accuracy")):
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_confusion_matrices(runs: list[Path], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with_matrix = [run for run in runs if (run / "test_confusion_matrix.json").exists()]
    fig, axes = plt.subplots(1, max(1, len(with_matrix)), figsize=(5 * max(1, len(with_matrix)), 5), squeeze=False)
    for ax, run in zip(axes[0], with_matrix):
        data = _read(run, "test_confusion_matrix.json")
        draw_confusion_matrix(ax, data["matrix"], data["labels"], run.name)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
