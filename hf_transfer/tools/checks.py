"""How an exported file is judged before it is served.

An fp32 file (ONNX, OpenVINO) computes the same function as the PyTorch model, so its logits must match PyTorch's on
the same prepared images: each image's largest logit difference within a tolerance of the size of that image's logits,
and the same top-1 class on every image (`against_pytorch`). A smaller precision (int8, fp16) computes a different
function by design, so it is judged by the answers a user gets from it, against the fp32 file's (`against_fp32`): the
top-1 class for one class per image; for several labels per image, the decision per class at the threshold the model
carries (`sigmoid(logit) >= threshold`, as `pipeline` and `predict` decide), and the score those answers earn on the
test split (accuracy; micro-F1 at the threshold, with mAP beside it).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch


def relative_differences(got: np.ndarray, expected: np.ndarray) -> np.ndarray:
    """Each image's largest |logit difference| per unit of its largest |logit| (at least 1). float32 rounding grows
    with the size of the values: a fine-tuned real-weights model whose logits reach 30 differs by 3e-4 between two
    correct runtimes, with the same top-1 on every image, where logits near 1 differ by 1e-5. Per image, so that one
    image's large logits do not widen the allowance for the others."""
    relative = np.abs(got - expected).max(-1) / np.maximum(1.0, np.abs(expected).max(-1))
    return np.where(np.isfinite(got).all(-1), relative, np.inf)  # a NaN logit is no match (max() would skip it)


@dataclass
class Match:
    """An fp32 file's logits against PyTorch's on the same images."""

    max_abs_logit_diff: float
    max_relative_logit_diff: float
    top1_disagreements: int
    logits: np.ndarray  # the file's own, every image: what a smaller precision and the score are judged against

    def refusal(self, runtime: str, source: str, tolerance: float) -> str | None:
        """Why the file must not be served (None: within `tolerance`, the same top-1 on every image)."""
        if self.max_relative_logit_diff <= tolerance and not self.top1_disagreements:
            return None
        return (f"the {runtime} model differs from PyTorch on {source}: largest logit difference "
                f"{self.max_relative_logit_diff:.2e} per unit of the image's logits (absolute "
                f"{self.max_abs_logit_diff:.2e}; allowed {tolerance:g}), top-1 different on {self.top1_disagreements} "
                f"of {len(self.logits)} images")


def against_pytorch(model, batches: list[torch.Tensor], run: Callable[[np.ndarray], np.ndarray]) -> Match:
    """`run` (a runtime's call: pixel_values array -> logits array) against `model` in PyTorch, batch by batch."""
    worst, relative, disagree, logits = 0.0, 0.0, 0, []
    for pixel_values in batches:
        with torch.no_grad():
            expected = model(pixel_values=pixel_values).logits.numpy()
        got = run(pixel_values.numpy())
        worst = max(worst, float(np.nan_to_num(np.abs(got - expected), nan=np.inf).max()))
        relative = max(relative, float(relative_differences(got, expected).max()))
        disagree += int(((got.argmax(-1) != expected.argmax(-1)) | ~np.isfinite(got).all(-1)).sum())
        logits.append(got)
    return Match(worst, relative, disagree, np.concatenate(logits))


def logits_of(session, batches: list[torch.Tensor]) -> np.ndarray:
    """The logits of every image of `batches` in an onnxruntime session."""
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: b.numpy()})[0] for b in batches])


def score(logits: np.ndarray, labels: list | None, task) -> dict:
    """The score a file's answers earn on labelled images: {"accuracy": ...} for one class per image; {"f1": micro-F1
    at the task's threshold, "map": ...} for several labels per image; {} without labels."""
    if labels is None:
        return {}
    if task.multi_label:
        metrics = task.metrics(logits, _multi_hot(labels, task))
        return {"f1": metrics["f1"], "map": metrics["map"]}
    return {"accuracy": float((np.asarray(logits).argmax(-1) == np.asarray(labels)).mean())}


def against_fp32(logits: np.ndarray, reference: np.ndarray, labels: list | None, task) -> dict:
    """How a smaller precision's answers compare with the fp32 file's on the same images: the share of answers they
    agree on (top-1, or every image-class decision at the threshold), and with labels both scores and the drop
    (fp32 minus this, in fractions)."""
    mine, theirs = task.predictions(logits), task.predictions(reference)
    figures = {"images": int(len(logits))}
    if task.multi_label:
        figures.update(threshold=task.threshold, decision_agreement=float((mine == theirs).mean()),
                       label_set_agreement=float((mine == theirs).all(-1).mean()))
    else:
        figures["top1_agreement"] = float((mine == theirs).mean())
    own, fp32 = score(logits, labels, task), score(reference, labels, task)
    for key in own:
        figures.update({key: own[key], f"fp32_{key}": fp32[key]})
    main = "f1" if task.multi_label else "accuracy"
    if main in own:
        figures[f"{main}_drop"] = fp32[main] - own[main]
    return figures


def agreement(figures: dict) -> float:
    """The share of answers a smaller precision agrees on with fp32 (top-1, or per-class decisions)."""
    return figures["decision_agreement"] if "decision_agreement" in figures else figures["top1_agreement"]


def drop_of(figures: dict) -> tuple[float, str]:
    """(the score the model lost at most, what that figure is): the accuracy (or micro-F1) drop with labels; without
    them, the share of answers that changed (the most the accuracy can fall)."""
    if "accuracy_drop" in figures:
        return figures["accuracy_drop"], "accuracy drop"
    if "f1_drop" in figures:
        return figures["f1_drop"], f"micro-F1 drop at threshold {figures['threshold']:g}"
    if "decision_agreement" in figures:
        return 1.0 - figures["decision_agreement"], "per-class decisions changed on (no labels)"
    return 1.0 - figures["top1_agreement"], "top-1 changed on (no labels: the most the accuracy can fall)"


def summary(figures: dict) -> str:
    """One line: agreement with fp32 and the scores, as the command prints them and a refusal states them."""
    if "decision_agreement" in figures:
        line = (f"per-class decisions at threshold {figures['threshold']:g} agree with fp32 on "
                f"{figures['decision_agreement']:.4f} (whole label sets on {figures['label_set_agreement']:.4f})")
        if "f1" in figures:
            line += (f", micro-F1 {figures['f1']:.4f} (fp32 {figures['fp32_f1']:.4f}), mAP {figures['map']:.4f} "
                     f"(fp32 {figures['fp32_map']:.4f})")
        return line
    line = f"top-1 agreement with fp32 {figures['top1_agreement']:.4f}"
    if "accuracy" in figures:
        line += f", accuracy {figures['accuracy']:.4f} (fp32 {figures['fp32_accuracy']:.4f})"
    return line


def _multi_hot(labels: list, task) -> np.ndarray:
    return np.stack([task.sample_labels(ids).numpy() for ids in labels]).astype(np.int64)
