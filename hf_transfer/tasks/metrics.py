"""Classification metrics, computed locally (no `evaluate.load`, which downloads its scripts).

`compute_metrics` is what the Trainer calls at each evaluation. `write_test_report` turns the
final test predictions into the per-class report and confusion matrix (JSON and PNG).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from sklearn.metrics import (
    average_precision_score,
    classification_report,
    confusion_matrix,
    precision_recall_fscore_support,
)


def classification_metrics(logits: np.ndarray, labels: np.ndarray, num_labels: int) -> dict[str, float]:
    """Accuracy, weighted and macro precision/recall/F1, and top-5 accuracy when there are > 5 classes."""
    logits, labels = np.asarray(logits), np.asarray(labels)
    predictions = logits.argmax(axis=-1)
    classes = list(range(num_labels))
    metrics = {"accuracy": float((predictions == labels).mean())}
    for average in ("weighted", "macro"):
        precision, recall, f1, _ = precision_recall_fscore_support(
            labels, predictions, labels=classes, average=average, zero_division=0
        )
        suffix = "" if average == "weighted" else "_macro"
        metrics.update({f"precision{suffix}": float(precision), f"recall{suffix}": float(recall),
                        f"f1{suffix}": float(f1)})
    if num_labels > 5:
        top5 = np.argsort(-logits, axis=-1)[:, :5]
        metrics["top5_accuracy"] = float((top5 == labels[:, None]).any(axis=-1).mean())
    return metrics


def sigmoid(logits: np.ndarray) -> np.ndarray:
    """Each label's score (several labels per image), as `pipeline` computes it, in float64."""
    return 1 / (1 + np.exp(-np.asarray(logits, dtype=np.float64)))


def _softmax(logits: np.ndarray) -> np.ndarray:
    logits = np.asarray(logits, dtype=np.float64)
    exp = np.exp(logits - logits.max(-1, keepdims=True))
    return exp / exp.sum(-1, keepdims=True)


def multilabel_metrics(logits: np.ndarray, labels: np.ndarray, threshold: float = 0.5) -> dict[str, float]:
    """Several labels per image (labels: multi-hot, N x C). Threshold-free: mAP, macro (the mean average precision
    of the classes that have a positive image) and micro (over all image-label pairs). At `threshold` on the sigmoid
    scores: F1, precision and recall micro-averaged (`f1`, ...) and macro-averaged (`f1_macro`), and `accuracy`, the
    share of images whose predicted label set is exactly right."""
    scores = sigmoid(logits)
    labels = np.asarray(labels).astype(np.int64)
    present = labels.sum(0) > 0
    metrics = {
        "map": float(average_precision_score(labels[:, present], scores[:, present], average="macro"))
        if present.any() else 0.0,
        "map_micro": float(average_precision_score(labels.ravel(), scores.ravel())) if labels.any() else 0.0,
    }
    predicted = (scores >= threshold).astype(np.int64)
    for average, suffix in (("micro", ""), ("macro", "_macro")):
        precision, recall, f1, _ = precision_recall_fscore_support(labels, predicted, average=average, zero_division=0)
        metrics.update({f"precision{suffix}": float(precision), f"recall{suffix}": float(recall),
                        f"f1{suffix}": float(f1)})
    metrics["accuracy"] = float((predicted == labels).all(-1).mean())
    metrics["threshold"] = float(threshold)
    return metrics


def write_multilabel_report(output_dir: str | Path, logits: np.ndarray, labels: np.ndarray, label_names: list[str],
                            threshold: float, rows: np.ndarray | None = None, prefix: str = "test",
                            files: list[str | None] | None = None) -> None:
    """Several labels per image: each class's average precision, and its precision, recall and F1 at `threshold`
    (`<prefix>_per_class.json`), and each image's true and predicted label sets with its scores
    (`<prefix>_predictions.json`)."""
    output_dir = Path(output_dir)
    scores = sigmoid(logits)
    labels = np.asarray(labels).astype(np.int64)
    predicted = (scores >= threshold).astype(np.int64)
    precision, recall, f1, support = precision_recall_fscore_support(labels, predicted, average=None, zero_division=0)
    report = {"threshold": threshold}
    for c, name in enumerate(label_names):
        ap = float(average_precision_score(labels[:, c], scores[:, c])) if labels[:, c].any() else None
        report[name] = {"average_precision": ap, "precision": float(precision[c]), "recall": float(recall[c]),
                        "f1-score": float(f1[c]), "support": int(support[c])}
    (output_dir / f"{prefix}_per_class.json").write_text(json.dumps(report, indent=2))
    rows = rows if rows is not None else np.arange(len(labels))
    by_row = {"rows": np.asarray(rows).tolist(), "threshold": threshold,
              "labels": [np.flatnonzero(r).tolist() for r in labels],
              "predictions": [np.flatnonzero(r).tolist() for r in predicted],
              "scores": np.round(scores, 4).tolist()}
    if files is not None and any(files):
        by_row["files"] = list(files)
    (output_dir / f"{prefix}_predictions.json").write_text(json.dumps(by_row))


class ComputeMetrics:
    """`compute_metrics` for the Trainer: the run's task's metrics (a class, so it pickles; it holds the task,
    whose multi-label threshold is chosen after training)."""

    def __init__(self, task):
        self.task = task

    def __call__(self, eval_prediction) -> dict[str, float]:
        logits = eval_prediction.predictions
        logits = logits[0] if isinstance(logits, tuple) else logits
        return self.task.metrics(logits, eval_prediction.label_ids)


def write_test_report(output_dir: str | Path, logits: np.ndarray, labels: np.ndarray, label_names: list[str],
                      rows: np.ndarray | None = None, prefix: str = "test", files: list[str | None] | None = None) -> None:
    """Per-class report, confusion matrix (JSON + PNG) and per-image predictions of the test split; `files`: the
    image file of each row, where the images are files (an image folder), listed beside the rows."""
    output_dir = Path(output_dir)
    predictions = np.asarray(logits).argmax(axis=-1)
    classes = list(range(len(label_names)))
    report = classification_report(labels, predictions, labels=classes, target_names=label_names,
                                   output_dict=True, zero_division=0)
    matrix = confusion_matrix(labels, predictions, labels=classes)
    (output_dir / f"{prefix}_per_class.json").write_text(json.dumps(report, indent=2))
    (output_dir / f"{prefix}_confusion_matrix.json").write_text(
        json.dumps({"labels": label_names, "matrix": matrix.tolist()}, indent=2)
    )
    rows = rows if rows is not None else np.arange(len(labels))
    labels = np.asarray(labels)
    probabilities = _softmax(logits)
    given = probabilities[np.arange(len(labels)), np.clip(labels, 0, None)]
    # The model's probability of its top-1 and of the given label: the saved model's scores, as `pipeline` gives them.
    predictions_by_row = {"rows": rows.tolist(), "labels": labels.tolist(), "predictions": predictions.tolist(),
                          "scores": np.round(probabilities.max(-1), 6).tolist(),
                          "label_scores": [round(float(p), 6) if label >= 0 else None
                                           for p, label in zip(given, labels.tolist())]}
    if files is not None and any(files):
        predictions_by_row["files"] = list(files)
    (output_dir / f"{prefix}_predictions.json").write_text(json.dumps(predictions_by_row))
    plot_confusion_matrix(matrix, label_names, output_dir / f"{prefix}_confusion_matrix.png")


def plot_confusion_matrix(matrix: np.ndarray, label_names: list[str], path: Path, title: str | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    size = max(4.0, 0.5 * len(label_names) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    draw_confusion_matrix(ax, matrix, label_names, title or "confusion matrix (test split)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def draw_confusion_matrix(ax, matrix: np.ndarray, label_names: list[str], title: str) -> None:
    """Draw into a matplotlib axis: counts in the cells when there are few classes."""
    matrix = np.asarray(matrix)
    ax.imshow(matrix, cmap="Blues")
    ticks = range(len(label_names))
    ax.set_xticks(ticks, label_names, rotation=90)
    ax.set_yticks(ticks, label_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if len(label_names) <= 30:
        threshold = matrix.max() / 2 if matrix.size else 0
        for i in ticks:
            for j in ticks:
                ax.text(j, i, int(matrix[i, j]), ha="center", va="center", fontsize=7,
                        color="white" if matrix[i, j] > threshold else "black")
    ax.set_title(title)
