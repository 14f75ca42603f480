"""Calibration: how far a model's probabilities are from how often it is right, and one temperature that fixes most
of it (temperature scaling, Guo et al. 2017).

- `expected_calibration_error`: the predictions grouped into equal-width confidence bins; each bin's gap between its
  mean confidence and its accuracy, weighted by its share of the images (`reliability_bins` are the bins themselves,
  what a reliability diagram draws).
- `fit_temperature`: the one T > 0 that minimises the negative log-likelihood of the validation labels under
  logits / T. Dividing every logit by the same T keeps their order: the top-1 does not change.
- `fold_temperature`: the classifier's last Linear layer divided by T, so that the saved model itself returns
  logits / T; every consumer of its weights (`pipeline`, an ONNX export, the Hub widget) gets the calibrated scores.

One class per image: the confidence is the top softmax probability and "right" means the top-1 is the label.
Several labels per image: every image-label pair is a yes/no prediction whose confidence is its sigmoid score and
whose outcome is whether the label is there (a bin's "accuracy" is then the share of positives among its pairs), and
one temperature is fitted for all classes (the binary cross-entropy over all pairs): a validation split has a few
positives per class, too few to fit a temperature per class without fitting their noise.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import minimize_scalar
from scipy.special import expit, log_expit, log_softmax, softmax
from torch import nn

TEMPERATURE_KEY = "calibration_temperature"  # in a saved model's config.json: the temperature folded into it

# 15 equal-width bins: what Guo et al. (2017) and most papers since report ECE with, so that figures compare; on a
# test split of a few hundred images fewer images fall in each bin than with 10, which makes ECE a little noisier.
BINS = 15
# The search range of T: 0.05 sharpens a logit gap of 1 into 20, 20 flattens a gap of 20 into 1. Beyond these a model's
# probabilities are not worth calibrating by a temperature.
T_RANGE = (0.05, 20.0)


def probabilities(logits: np.ndarray, multi_label: bool = False) -> np.ndarray:
    """Softmax over the classes, or each label's sigmoid (several labels per image), in float64 as `pipeline` gives."""
    logits = np.asarray(logits, dtype=np.float64)
    return expit(logits) if multi_label else softmax(logits, axis=-1)


def confidences(logits: np.ndarray, labels: np.ndarray, multi_label: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(confidence, outcome) per prediction: the top probability and whether the top-1 is the label; several labels
    per image: each image-label pair's sigmoid score and whether the label is there."""
    scores = probabilities(logits, multi_label)
    labels = np.asarray(labels)
    if multi_label:
        return scores.ravel(), labels.astype(bool).ravel()
    return scores.max(-1), scores.argmax(-1) == labels


def reliability_bins(confidence: np.ndarray, outcome: np.ndarray, bins: int = BINS) -> list[dict]:
    """Equal-width bins of [0, 1] by confidence: each one's bounds, count, accuracy (the share of outcomes that came
    true) and mean confidence; an empty bin has count 0 and None for both. A confidence of exactly 1 is in the last."""
    confidence, outcome = np.asarray(confidence, dtype=np.float64), np.asarray(outcome, dtype=np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    out = []
    for b in range(bins):
        inside = which == b
        count = int(inside.sum())
        out.append({"lower": round(float(edges[b]), 6), "upper": round(float(edges[b + 1]), 6), "count": count,
                    "accuracy": float(outcome[inside].mean()) if count else None,
                    "confidence": float(confidence[inside].mean()) if count else None})
    return out


def expected_calibration_error(confidence: np.ndarray, outcome: np.ndarray, bins: int = BINS) -> float:
    """Sum over the bins of |accuracy - mean confidence| x the bin's share of the predictions (0: calibrated)."""
    table = reliability_bins(confidence, outcome, bins)
    total = sum(b["count"] for b in table)
    return float(sum(b["count"] * abs(b["accuracy"] - b["confidence"]) for b in table if b["count"]) / max(total, 1))


def calibration_summary(logits: np.ndarray, labels: np.ndarray, multi_label: bool = False, bins: int = BINS) -> dict:
    """{"ece": ..., "bins": [...]} of these predictions (calibration.json's "before"/"after")."""
    confidence, outcome = confidences(logits, labels, multi_label)
    return {"ece": expected_calibration_error(confidence, outcome, bins),
            "bins": reliability_bins(confidence, outcome, bins)}


def negative_log_likelihood(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0,
                            multi_label: bool = False) -> float:
    """Mean NLL of the labels under logits / temperature: cross-entropy per image, or binary cross-entropy per
    image-label pair (several labels per image)."""
    scaled = np.asarray(logits, dtype=np.float64) / temperature
    labels = np.asarray(labels)
    if multi_label:
        positive = labels.astype(bool)
        return float(-np.where(positive, log_expit(scaled), log_expit(-scaled)).mean())
    return float(-log_softmax(scaled, axis=-1)[np.arange(len(labels)), labels].mean())


def fit_temperature(logits: np.ndarray, labels: np.ndarray, multi_label: bool = False) -> tuple[float, str | None]:
    """(T, reason): the temperature in `T_RANGE` that minimises the validation NLL (a bounded search over log T: the
    NLL is smooth and has one minimum in T there), or (1.0, why not) when there is nothing to fit: no image, or one
    class per image and every prediction right (then the NLL falls without end as T -> 0, and a T fitted so would make
    the model certain of every answer, mistakes included)."""
    logits, labels = np.asarray(logits, dtype=np.float64), np.asarray(labels)
    if multi_label:
        labels = labels.astype(np.int64)
    else:
        keep = labels >= 0  # an image without a label says nothing about calibration
        logits, labels = logits[keep], labels[keep]
    if len(labels) == 0:
        return 1.0, "no labelled validation image"
    if not multi_label and (logits.argmax(-1) == labels).all():
        return 1.0, f"every one of the {len(labels)} validation images is predicted right: no error to calibrate on"
    low, high = np.log(T_RANGE[0]), np.log(T_RANGE[1])
    found = minimize_scalar(lambda log_t: negative_log_likelihood(logits, labels, float(np.exp(log_t)), multi_label),
                            bounds=(low, high), method="bounded", options={"xatol": 1e-5})
    return float(np.exp(found.x)), None


def fold_temperature(linears: list[nn.Linear], temperature: float) -> None:
    """Divide the weight and bias of these last layers by `temperature` in place: the model's logits become
    logits / temperature (up to float rounding), their order unchanged."""
    with torch.no_grad():
        for linear in linears:
            linear.weight.div_(temperature)
            if linear.bias is not None:
                linear.bias.div_(temperature)


def unfold_temperature(linears: list[nn.Linear], temperature: float) -> None:
    """The inverse of `fold_temperature`: the logits the model had before it was calibrated (a distillation teacher's
    targets as they were when it trained)."""
    fold_temperature(linears, 1.0 / temperature)


def plot_reliability(before: list[dict], after: list[dict] | None, path, title: str, ece_before: float,
                     ece_after: float | None = None, temperature: float | None = None) -> None:
    """The reliability diagram: each bin's accuracy against its confidence, before and after the temperature."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    draw_reliability(ax, before, after, title, ece_before, ece_after, temperature)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def draw_reliability(ax, before: list[dict], after: list[dict] | None, title: str, ece_before: float,
                     ece_after: float | None = None, temperature: float | None = None) -> None:
    """Draw into a matplotlib axis: bars of accuracy per confidence bin, the diagonal a calibrated model follows."""
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="calibrated")
    series = [(before, "before" if after is not None else "model", ece_before, "tab:red")]
    if after is not None:
        series.append((after, f"after (T={temperature:.2f})" if temperature else "after", ece_after, "tab:blue"))
    for i, (table, name, ece, colour) in enumerate(series):
        full = [b for b in table if b["count"]]
        width = (table[0]["upper"] - table[0]["lower"]) / len(series)
        ax.bar([b["lower"] + i * width for b in full], [b["accuracy"] for b in full], width=width, align="edge",
               color=colour, alpha=0.6, label=f"{name}: ECE {ece:.3f}")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.set_title(title)
    ax.legend(loc="upper left", fontsize=8)
