"""The task: one class per image (softmax over the classes) or several labels per image (a sigmoid per class).

The data set decides (`task_for`): a label column of lists (`Sequence`/`List` of `ClassLabel`, of
ints or of strings, or an image folder's metadata file whose label column holds lists) is
multi-label; `--multi_label` makes any label column so (a single-label data set then trains
independent sigmoid scores). Everything else that differs between the two lives here, and the
rest of the project asks the run's task: how the label column becomes class ids (`prepare`),
how a sample's labels become a tensor (`sample_labels`) and the targets mixup blends (`targets`),
the loss, the class weights from the data, the metrics and the checkpoint-selection metric, the
test report, and the `problem_type` the saved config carries (so that `pipeline` returns a
softmax over the classes, or each label's own sigmoid score).

Several labels per image also need a decision threshold: `MultiLabel.threshold`, chosen on the
validation split after training (the one that maximises micro-averaged F1), saved in the model's
config as `multi_label_threshold` and in the card, and used for the test's F1 and exact-match
accuracy. mAP (macro: the mean of each class's average precision; micro: over all image-label
pairs) needs no threshold and chooses the checkpoint.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, replace

import numpy as np
import torch
from datasets import ClassLabel, Dataset, Features, List, Sequence

from ..errors import UserError
from .losses import (
    balanced_class_weights,
    binary_cross_entropy,
    cross_entropy,
    label_mass,
    positive_class_weights,
)
from .metrics import (
    classification_metrics,
    multilabel_metrics,
    sigmoid,
    write_multilabel_report,
    write_test_report,
)

THRESHOLDS = np.round(np.arange(0.05, 0.96, 0.05), 2)  # the candidates `MultiLabel.choose_threshold` tries
DEFAULT_THRESHOLD = 0.5  # a multi-label model's before one is chosen, and a saved model's that carries none


@dataclass
class SingleLabel:
    """One class per image: softmax cross-entropy, accuracy (chooses the checkpoint)."""

    num_labels: int = 0
    problem_type = "single_label_classification"
    best_metric = "accuracy"
    multi_label = False

    def sample_labels(self, value) -> int:
        return value

    def label_mass(self, labels: torch.Tensor) -> torch.Tensor:
        """How much of each sample is labelled (what the label term divides by): losses.label_mass."""
        return label_mass(labels)

    def targets(self, labels: torch.Tensor) -> torch.Tensor:
        """One-hot rows (an unlabeled image, class < 0: zeros), the soft targets mixup blends."""
        return (labels[:, None] == torch.arange(self.num_labels, device=labels.device)).float()

    def loss(self, logits, labels, count=None, label_smoothing: float = 0.0, class_weights=None) -> torch.Tensor:
        return cross_entropy(logits, labels, count, label_smoothing, class_weights)

    def loss_floor(self, label_smoothing: float = 0.0) -> float:
        """The lowest `loss` there is per image: that of a prediction equal to the label-smoothed target, the
        target's entropy (0 without smoothing). Smoothing raises the loss by this much by design; the loss above it
        is how far predictions are from their targets, comparable between runs of different smoothing."""
        k, eps = self.num_labels, label_smoothing
        return _entropy([1 - eps + eps / k] + [eps / k] * (k - 1))

    def auto_class_weights(self, labels: list) -> torch.Tensor:
        labels = torch.tensor(labels)
        labels = labels[labels >= 0]  # images without a label (data/unlabeled.py) count for no class
        return balanced_class_weights(torch.bincount(labels, minlength=self.num_labels))

    def metrics(self, logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
        return classification_metrics(logits, labels, self.num_labels)

    def predictions(self, logits: np.ndarray) -> np.ndarray:
        return np.asarray(logits).argmax(-1)

    def of_model(self, config) -> SingleLabel:
        """This task as another saved model of it predicts (a distillation teacher): one class per image, the same."""
        return self

    def write_test_report(self, *args, **kwargs) -> None:
        write_test_report(*args, **kwargs)


@dataclass
class MultiLabel(SingleLabel):
    """Several labels per image (any number, none included): a sigmoid and a binary cross-entropy per class,
    mAP (chooses the checkpoint), and F1 and exact-match accuracy at `threshold`."""

    threshold: float = DEFAULT_THRESHOLD
    problem_type = "multi_label_classification"
    best_metric = "map"
    multi_label = True

    def sample_labels(self, value) -> torch.Tensor:
        """A sample's class ids -> its multi-hot float vector."""
        vector = torch.zeros(self.num_labels)
        vector[list(value)] = 1.0
        return vector

    def label_mass(self, labels: torch.Tensor) -> torch.Tensor:
        return torch.ones(len(labels), device=labels.device)  # every image is labelled (an empty set too)

    def targets(self, labels: torch.Tensor) -> torch.Tensor:
        return labels.float()

    def loss(self, logits, labels, count=None, label_smoothing: float = 0.0, class_weights=None) -> torch.Tensor:
        return binary_cross_entropy(logits, labels, count, label_smoothing, class_weights)

    def loss_floor(self, label_smoothing: float = 0.0) -> float:
        """Each class's smoothed target is 1 - eps/2 or eps/2 (losses.binary_cross_entropy), summed over the classes."""
        return self.num_labels * _entropy([1 - label_smoothing / 2, label_smoothing / 2])

    def auto_class_weights(self, labels: list) -> torch.Tensor:
        positives = torch.zeros(self.num_labels)
        for ids in labels:
            positives[list(ids)] += 1
        return positive_class_weights(positives, len(labels))

    def metrics(self, logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
        return multilabel_metrics(logits, labels, self.threshold)

    def predictions(self, logits: np.ndarray) -> np.ndarray:
        return (sigmoid(logits) >= self.threshold).astype(np.int64)

    def of_model(self, config) -> MultiLabel:
        """This task at the threshold another saved model carries (a distillation teacher: its own, chosen on
        validation when it was trained), so that it is scored as its own evaluation scores it; without one, at
        `DEFAULT_THRESHOLD`, as `run_finetune.py --do_train false` scores it."""
        threshold = threshold_of(config)
        return replace(self, threshold=DEFAULT_THRESHOLD if threshold is None else float(threshold))

    def choose_threshold(self, logits: np.ndarray, labels: np.ndarray) -> float:
        """The threshold of `THRESHOLDS` with the best micro-averaged F1 on these (validation) predictions; the
        middle one of a tie."""
        scores = [multilabel_metrics(logits, labels, t)["f1"] for t in THRESHOLDS]
        best = [t for t, s in zip(THRESHOLDS, scores) if s == max(scores)]
        self.threshold = float(best[len(best) // 2])
        return self.threshold

    def write_test_report(self, output_dir, logits, labels, label_names, rows=None, prefix="test", files=None):
        write_multilabel_report(output_dir, logits, labels, label_names, self.threshold, rows, prefix, files)


def _entropy(probabilities: list[float]) -> float:
    return float(sum(-p * math.log(p) for p in probabilities if p > 0))


def task_of(config) -> SingleLabel:
    """The task a model was made for, from its config (`problem_type`, the number of labels)."""
    kind = MultiLabel if getattr(config, "problem_type", None) == MultiLabel.problem_type else SingleLabel
    return kind(config.num_labels)


# ---------------------------------------------------------------- the metric that chooses the checkpoint


def metric_name(name: str) -> str:
    """`--metric_for_best_model` without the `eval_` the evaluations' keys carry (the Trainer takes it either way)."""
    return name.removeprefix("eval_")


def metric_key(name: str) -> str:
    """The key the validation evaluations report `--metric_for_best_model` under (`loss`, `eval_loss` -> `eval_loss`)."""
    return f"eval_{metric_name(name)}"


def reported_metrics(task: SingleLabel, ema: bool = False) -> list[str]:
    """The names (without `eval_`) an evaluation of this task reports that can choose a checkpoint: the task's
    metrics, read from `task.metrics` itself, and the loss (the Trainer's); with --ema_decay also those of the raw
    weights that TransferTrainer.evaluate keeps (accuracies, losses, mAP, as `raw_<name>`). The multi-label decision
    threshold is a setting, not a score."""
    labels = np.zeros((2, task.num_labels) if task.multi_label else 2, dtype=np.int64)
    names = {*task.metrics(np.zeros((2, task.num_labels)), labels), "loss"} - {"threshold"}
    if ema:
        names |= {f"raw_{n}" for n in names if "accuracy" in n or f"raw_{n}".endswith(("_loss", "_map"))}
    return sorted(names)


def check_metric(name: str | None, task: SingleLabel | None = None, ema: bool = False,
                 also: tuple[str, ...] = ()) -> None:
    """`--metric_for_best_model` against the metrics the run's evaluations will report (the Trainer would raise a
    KeyError at the first evaluation, after training time was spent). `task` None: against those of any task
    (one class per image with more than five classes, or several labels per image), as far as can be checked
    before the data is loaded. `also`: what the command's evaluations add (distillation: `kd_loss`)."""
    if name is None:
        return
    tasks = [task] if task is not None else [SingleLabel(6), MultiLabel(2)]  # top-5 accuracy needs six classes
    valid = sorted({n for t in tasks for n in reported_metrics(t, ema)} | set(also))
    wanted = metric_name(name)
    if wanted in valid:
        return
    close = ([v for v in valid if v.startswith(wanted)] or sorted((v for v in valid if wanted.startswith(v)), key=len)[-1:]
             or difflib.get_close_matches(wanted, valid, n=1, cutoff=0.5))
    where = ("this run's evaluations report (" + ("several labels per image" if task.multi_label else
                                                 f"one class per image, {task.num_labels} classes") + ")"
             if task is not None else "any run reports")
    raise UserError(f"--metric_for_best_model {name} is not a metric {where}: choose one of "
                    f"{', '.join(valid)}{f'; did you mean {close[0]}?' if close else ''}")


# ---------------------------------------------------------------- the data's side: which task, and its label ids


def is_list_feature(feature) -> bool:
    return isinstance(feature, (Sequence, List))


def prepare_multilabel(splits: dict[str, Dataset], column: str) -> tuple[dict[str, Dataset], list[str]]:
    """A label column of lists as `List(ClassLabel)` on every split, and its class names: a list of class labels
    keeps its names; lists of ints name the classes 0..max; lists of strings are named by the training split's
    (sorted). An empty list is an image with no positive label. A label another split has that the training split
    lacks, or a row that holds one value where the others hold lists, is refused."""
    feature = splits["train"].features[column]
    inner = getattr(feature, "feature", None)
    if isinstance(inner, ClassLabel):
        return splits, list(inner.names)
    if not is_list_feature(feature):  # --multi_label on a column of single labels: each a list of one
        if not isinstance(feature, ClassLabel):
            raise UserError(f"--multi_label: column '{column}' holds {feature}, neither class labels nor lists of them")
        names = list(feature.names)
        label = List(ClassLabel(names=names))
        return {k: ds.map(lambda b: {column: [[v] if v >= 0 else [] for v in b[column]]}, batched=True,
                          features=Features({**ds.features, column: label})) for k, ds in splits.items()}, names
    values = {split: {v for row in ds[column] for v in (row or [])} for split, ds in splits.items()}
    train = values["train"]
    if all(isinstance(v, (int, np.integer)) for vs in values.values() for v in vs):
        if any(v < 0 for vs in values.values() for v in vs):
            raise UserError(f"column '{column}' has negative labels")
        names = [str(i) for i in range(max(train) + 1)] if train else []
        index = {i: i for i in range(len(names))}
    elif all(isinstance(v, str) for vs in values.values() for v in vs):
        names = sorted(train)
        index = {n: i for i, n in enumerate(names)}
    else:
        raise UserError(f"column '{column}' holds {feature}: lists of class names or class ids are needed")
    for split, vs in values.items():
        unknown = sorted(str(v) for v in vs if v not in index)
        if unknown:
            raise UserError(f"the {split} split has labels no training image has: {', '.join(unknown[:5])}"
                            f"{', ...' if len(unknown) > 5 else ''}; every label needs training images")
    label = List(ClassLabel(names=names))
    return {k: ds.map(lambda b: {column: [[index[v] for v in (row or [])] for row in b[column]]}, batched=True,
                      features=Features({**ds.features, column: label})) for k, ds in splits.items()}, names


def threshold_of(config) -> float | None:
    """The decision threshold a saved multi-label model carries (None for other models)."""
    return getattr(config, "multi_label_threshold", None)
