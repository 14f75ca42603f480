"""Losses as pure functions: the distillation loss, cross-entropy with soft targets, class weights.

Both losses accept `num_items_in_batch`: when the Trainer passes it (gradient accumulation with a
model that takes loss kwargs), per-sample losses are summed and divided by the number of
samples in the whole accumulated batch, so accumulation gives the same loss as one big batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _reduce(per_sample: torch.Tensor, num_items_in_batch: int | torch.Tensor | None) -> torch.Tensor:
    if num_items_in_batch is None:
        return per_sample.mean()
    return per_sample.sum() / num_items_in_batch


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, num_items_in_batch=None,
                  label_smoothing: float = 0.0, class_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy with class indices (N,) or soft targets (N, C), e.g. after mixup.

    `class_weights` (C,) weight each class's term, as in `F.cross_entropy(weight=...)`; the sum is
    divided by the number of samples (not by the weights' sum), so weights that average 1 over the
    training samples (`balanced_class_weights`) keep the loss on its usual scale.
    """
    weight = class_weights.to(logits.device, torch.float32) if class_weights is not None else None
    per_sample = F.cross_entropy(logits.float(), targets, weight=weight, reduction="none",
                                 label_smoothing=label_smoothing)
    return _reduce(per_sample, num_items_in_batch)


def balanced_class_weights(counts: torch.Tensor) -> torch.Tensor:
    """Weights inversely proportional to each class's share of the training set, averaging 1 over its
    samples (n / (classes present x count)); a class with no training sample gets 1."""
    counts = counts.float()
    present = counts > 0
    weights = counts.sum() / (present.sum() * counts.clamp(min=1))
    return torch.where(present, weights, torch.ones_like(weights))


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    alpha: float,
    temperature: float,
    num_items_in_batch=None,
    label_smoothing: float = 0.0,
    class_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(1 - alpha) * CE(student, labels) + alpha * T^2 * KL(softmax(teacher/T) || softmax(student/T)).

    `alpha` weights the distillation term: 0 is plain fine-tuning, 1 ignores the labels. The KL
    is summed over classes and averaged over the batch ("batchmean"); T^2 keeps its gradients
    on the scale of the cross-entropy's as T changes (Hinton et al. 2015). The teacher's
    logits are treated as constants; `label_smoothing` and `class_weights` apply to the cross-entropy
    only (the teacher's distribution is the KL's target as it is). Returns (loss, ce, kd) with ce and
    kd unweighted. `alpha` in
    [0, 1] and `temperature` > 0 are checked where they are set (`DistillationConfig`).
    """
    ce = cross_entropy(student_logits, labels, num_items_in_batch, label_smoothing, class_weights)
    student_log_probs = F.log_softmax(student_logits.float() / temperature, dim=-1)
    teacher_log_probs = F.log_softmax(teacher_logits.detach().float() / temperature, dim=-1)
    per_sample_kl = F.kl_div(student_log_probs, teacher_log_probs, reduction="none", log_target=True).sum(-1)
    kd = _reduce(per_sample_kl, num_items_in_batch) * temperature**2
    loss = (1.0 - alpha) * ce + alpha * kd
    return loss, ce.detach(), kd.detach()
