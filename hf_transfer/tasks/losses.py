"""Losses as pure functions: cross-entropy with soft targets, binary cross-entropy, the distillation divergences,
class weights. The objectives that combine them into a training step's loss are in objectives.py.

Every loss is a sum over samples divided by a count. The trainer passes the count of the whole
optimizer step (every micro-batch of a gradient accumulation, every process: `TransferTrainer.
get_batch_samples`), so a step's loss is the per-sample mean over everything it saw, whatever the
accumulation or the number of processes; called without a count, a loss is the mean over its batch.

Images without a label (class index < 0; a soft-target row that sums to 0, or to less than 1 when
mixup blended a labelled image with an unlabeled one) add to the label term only their labelled
share, and that term is divided by the number of labelled images: unlabeled images teach through the
distillation term alone.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

UNLABELED = -1  # the label of an image without one (datasets' ClassLabel convention for a missing label)


def label_mass(targets: torch.Tensor) -> torch.Tensor:
    """How much of each sample is labelled: 1 or 0 for class indices, the row's sum for soft targets."""
    return (targets >= 0).float() if targets.ndim == 1 else targets.float().sum(-1)


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, count=None,
                  label_smoothing: float = 0.0, class_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy with class indices (N,) or soft targets (N, C), e.g. after mixup, summed over the
    samples and divided by `count` (default: the labelled samples here, `label_mass`).

    `class_weights` (C,) weight each class's term, as in `F.cross_entropy(weight=...)`; the sum is
    divided by the number of samples (not by the weights' sum), so weights that average 1 over the
    training samples (`balanced_class_weights`) keep the loss on its usual scale. Label smoothing
    spreads each row's own mass (torch's rule for a fully labelled row).
    """
    logits = logits.float()
    weight = class_weights.to(logits.device, torch.float32) if class_weights is not None else None
    if targets.ndim == 1:
        indices = torch.where(targets >= 0, targets, -100)  # F.cross_entropy's ignore_index: adds 0
        per_sample = F.cross_entropy(logits, indices, weight=weight, reduction="none", label_smoothing=label_smoothing)
    else:
        targets = targets.float()
        mass = targets.sum(-1, keepdim=True)
        smoothed = (1 - label_smoothing) * targets + label_smoothing * mass / logits.shape[-1]
        if weight is not None:
            smoothed = smoothed * weight
        per_sample = -(smoothed * F.log_softmax(logits, dim=-1)).sum(-1)
    if count is None:
        count = label_mass(targets).sum().clamp(min=1e-6)
    return per_sample.sum() / count


def binary_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, count=None, label_smoothing: float = 0.0,
                         positive_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Several labels per image: binary cross-entropy of each class's logit against its target in [0, 1] (N, C),
    summed over the classes and the samples and divided by `count` (default: the batch). Summed over the classes,
    as softmax cross-entropy is, the gradient of each logit is sigmoid - target, the scale the recipes' learning
    rates were measured at (averaged over C classes it would be C times smaller).

    `positive_weights` (C,) multiply each class's positive term (`BCEWithLogits`' pos_weight; from
    `positive_class_weights`); label smoothing moves each target towards 1/2 by that share.
    """
    logits, targets = logits.float(), targets.float()
    if label_smoothing:
        targets = targets * (1 - label_smoothing) + label_smoothing / 2
    weight = positive_weights.to(logits.device, torch.float32) if positive_weights is not None else None
    per_sample = F.binary_cross_entropy_with_logits(logits, targets, pos_weight=weight, reduction="none").sum(-1)
    return per_sample.sum() / (count if count is not None else len(per_sample))


def positive_class_weights(positives: torch.Tensor, images: int) -> torch.Tensor:
    """Several labels per image: each class's positive term weighted by its negatives per positive in the training
    set (n_neg / n_pos, BCEWithLogits' pos_weight), so that a rare label counts as much as its absence; a class
    with no positive image gets 1."""
    positives = positives.float()
    return torch.where(positives > 0, (images - positives) / positives.clamp(min=1), torch.ones_like(positives))


def balanced_class_weights(counts: torch.Tensor) -> torch.Tensor:
    """Weights inversely proportional to each class's share of the training set, averaging 1 over its
    samples (n / (classes present x count)); a class with no training sample gets 1."""
    counts = counts.float()
    present = counts > 0
    weights = counts.sum() / (present.sum() * counts.clamp(min=1))
    return torch.where(present, weights, torch.ones_like(weights))


def softmax_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Per sample (N,): KL(softmax(teacher/T) || softmax(student/T)), summed over the classes; the teacher's logits
    are constants."""
    student_log_probs = F.log_softmax(student_logits.float() / temperature, dim=-1)
    teacher_log_probs = F.log_softmax(teacher_logits.detach().float() / temperature, dim=-1)
    return F.kl_div(student_log_probs, teacher_log_probs, reduction="none", log_target=True).sum(-1)


def binary_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Per sample (N,): KL(Bernoulli(sigmoid(teacher/T)) || Bernoulli(sigmoid(student/T))), summed over the classes
    (as the softmax KL is)."""
    s, t = student_logits.float() / temperature, teacher_logits.detach().float() / temperature
    p = torch.sigmoid(t)
    # log p - log q for both outcomes, with logsigmoid for stability: log sigmoid(x) and log(1 - sigmoid(x)) = logsigmoid(-x)
    kl = p * (F.logsigmoid(t) - F.logsigmoid(s)) + (1 - p) * (F.logsigmoid(-t) - F.logsigmoid(-s))
    return kl.sum(-1)
