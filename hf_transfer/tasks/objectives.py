"""Objectives: what a training step minimises, and the terms it logs beside the loss.

An objective is called with the student's logits, the labels, the step's counts (`counts.labelled`,
`counts.images`: what each term divides by, trainers/transfer_trainer.py `BatchCounts`; None: the batch's own) and,
for distillation, the teacher's logits; it returns the loss and its terms (unweighted, detached). The trainer
scales the loss for the processes, guards it against NaN/inf and logs the terms, the same for every objective
(`TransferTrainer.compute_loss`).

- `Supervised`: the task's loss (tasks/classification.py): cross-entropy, or binary cross-entropy per class.
- `Distillation`: (1 - alpha) * the task's loss + alpha * a distillation term, logged as `ce_loss` and `kd_loss`.
  The term is the subclass's: `SoftTargets` (`--distillation_loss kl`, Hinton et al. 2015), `Correlation`
  (`--distillation_loss dist`, DIST, Huang et al. 2022). A new distillation loss is one more subclass in
  `DISTILLATION_LOSSES`: the flag's choices, the card and the docs' table read it from there.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .losses import binary_kl, softmax_kl


class Supervised:
    """The task's own loss; `class_weights` (C,) weight the classes (or each class's positive term)."""

    terms: tuple[str, ...] = ()

    def __init__(self, task, label_smoothing: float = 0.0, class_weights: torch.Tensor | None = None):
        self.task, self.label_smoothing, self.class_weights = task, label_smoothing, class_weights

    def __call__(self, logits, labels, counts=None, teacher_logits=None) -> tuple[torch.Tensor, dict]:
        return self.label_loss(logits, labels, counts), {}

    def label_loss(self, logits, labels, counts=None) -> torch.Tensor:
        return self.task.loss(logits, labels, counts.labelled if counts is not None else None, self.label_smoothing,
                              self.class_weights)


class Distillation(Supervised):
    """(1 - alpha) * the task's loss + alpha * `term`: `alpha` in [0, 1] weights the distillation term (0 is plain
    fine-tuning, 1 ignores the labels). The label term is the mean over labelled images, the distillation term over
    all images (an image without a label teaches through it alone); label smoothing and class weights apply to the
    label term only (the teacher's answer is the target as it is)."""

    name = ""  # the --distillation_loss choice
    summary = ""  # one line for --help and the docs
    terms = ("ce_loss", "kd_loss")
    multi_label = True  # whether it applies to several labels per image

    def __init__(self, task, alpha: float, temperature: float, label_smoothing: float = 0.0,
                 class_weights: torch.Tensor | None = None):
        super().__init__(task, label_smoothing, class_weights)
        self.alpha, self.temperature = alpha, temperature

    def __call__(self, logits, labels, counts=None, teacher_logits=None) -> tuple[torch.Tensor, dict]:
        ce = self.label_loss(logits, labels, counts)
        kd = self.term(logits, teacher_logits, counts.images if counts is not None else None)
        return (1.0 - self.alpha) * ce + self.alpha * kd, {"ce_loss": ce.detach(), "kd_loss": kd.detach()}

    def term(self, student_logits, teacher_logits, count=None) -> torch.Tensor:
        """The distillation term, summed over the images and divided by `count` (default: the batch's images)."""
        raise NotImplementedError


class SoftTargets(Distillation):
    """T^2 * KL(softmax(teacher/T) || softmax(student/T)), summed over the classes: T^2 keeps its gradients on the
    scale of the cross-entropy's as T changes (Hinton et al. 2015). With several labels per image, each class's
    binary KL of sigmoid(logit / T), summed over the classes and scaled by T, not T^2: each logit's gradient is then
    sigmoid(student / T) - sigmoid(teacher / T), of the form and bound of the label term's, so that alpha weighs two
    terms of one scale (with T^2, at T = 2, the student gained nothing over the same student trained alone; with T,
    3 points of mAP: docs/multilabel.md, "Distillation")."""

    name = "kl"
    summary = "KL divergence to the teacher's softened answers (Hinton et al. 2015)"

    def term(self, student_logits, teacher_logits, count=None) -> torch.Tensor:
        if self.task.multi_label:
            per_sample, scale = binary_kl(student_logits, teacher_logits, self.temperature), self.temperature
        else:
            per_sample, scale = softmax_kl(student_logits, teacher_logits, self.temperature), self.temperature**2
        return per_sample.sum() / (count if count is not None else len(per_sample)) * scale


class Correlation(Distillation):
    """DIST (Huang et al. 2022, "Knowledge Distillation from A Stronger Teacher"): match the teacher's answers up to
    scale and shift, not exactly. T^2 * [(1 - Pearson correlation of each image's class probabilities with the
    teacher's, the inter-class relation) + (1 - the correlation of each class's probabilities over the batch,
    the intra-class relation)], probabilities softmax(logit / T). A student much smaller than its teacher can
    follow its ranking of the classes where it cannot reproduce its confidence.

    The inter-class part is a mean over images (summed, divided by `count`); the intra-class part is a statistic of
    the batch, weighted by the batch's share of the images counted (over the micro-batches of a step those shares
    add up to 1). One class per image only: with several labels per image the classes are not one distribution."""

    name = "dist"
    summary = "DIST: the correlation of class probabilities with the teacher's, per image and per class (Huang et al. 2022)"
    multi_label = False

    def term(self, student_logits, teacher_logits, count=None) -> torch.Tensor:
        student = F.softmax(student_logits.float() / self.temperature, dim=-1)
        teacher = F.softmax(teacher_logits.detach().float() / self.temperature, dim=-1)
        inter = (1 - _pearson(student, teacher)).sum()
        batch = len(student)
        intra = (1 - _pearson(student.T, teacher.T)).mean() * batch if batch > 1 else student.new_zeros(())
        return (inter + intra) / (count if count is not None else batch) * self.temperature**2


def _pearson(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """The Pearson correlation of each row of `a` with the same row of `b`."""
    a, b = a - a.mean(-1, keepdim=True), b - b.mean(-1, keepdim=True)
    return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1) + eps)


DISTILLATION_LOSSES = {cls.name: cls for cls in (SoftTargets, Correlation)}
