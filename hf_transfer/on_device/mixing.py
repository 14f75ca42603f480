"""Mixup and CutMix on the training device, per sample, on the uint8 batch before it is resized.

`TransferTrainer` applies `BatchMix` to the device batch (`--mixup`, `--cutmix`) before each model's
preprocessing, so a distillation teacher and its student see the very same mixed picture: when the
teacher has a view of its own (a mixed-size batch, resized once per model), both views get the same
partners, weights and boxes.
"""

from __future__ import annotations

import torch


class BatchMix:
    """Mixup and CutMix on a batch, on the device, with one draw per sample.

    Each sample is blended with a partner from the same batch (a random permutation): mixup
    with weight lambda ~ Beta(a, a), CutMix by pasting a box of the partner covering 1 - lambda
    of the image. With both enabled each sample picks one of the two with probability 1/2.
    Labels become the matching soft targets. Works on float images at storage resolution,
    before resizing, so a teacher and a student see the very same mixed picture.
    """

    def __init__(self, targets, mixup_alpha: float = 0.0, cutmix_alpha: float = 0.0):
        """`targets`: a batch's labels -> the float (N, C) rows that are mixed (the task's: one-hot class ids, or
        the multi-hot label sets of several labels per image, tasks.py)."""
        self.targets, self.mixup_alpha, self.cutmix_alpha = targets, mixup_alpha, cutmix_alpha

    def __call__(self, images: torch.Tensor, labels: torch.Tensor,
                 views: dict[str, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """Mix `images` and every other view of the same images (`views`, each at its own size) with the same
        partners, weights and boxes (placed in relative coordinates); the targets follow `images`."""
        n = images.shape[0]
        device = images.device
        # Nothing here is read back to the host (a GPU would stall for it): a permutation by sorting random
        # keys, one-hot targets by comparison (one_hot checks the labels' range on the host), and `_beta`.
        partner = torch.rand(n, device=device).argsort()
        targets = self.targets(labels)

        if self.mixup_alpha > 0 and self.cutmix_alpha > 0:
            use_cutmix = torch.rand(n, device=device) < 0.5
        else:
            use_cutmix = torch.full((n,), self.cutmix_alpha > 0, device=device)
        lam = torch.ones(n, device=device)
        if self.mixup_alpha > 0:
            lam = torch.where(use_cutmix, lam, _beta(self.mixup_alpha, n, device))
        box = None
        if self.cutmix_alpha > 0:
            side = torch.sqrt(1 - _beta(self.cutmix_alpha, n, device))  # side ratio of the box
            box = (torch.rand(n, device=device), torch.rand(n, device=device), side)  # centre y, x (relative), side

        mixed, own = _mix(images, partner, lam, use_cutmix, box)
        mixed_views = {name: _mix(view, partner, lam, use_cutmix, box)[0] for name, view in (views or {}).items()}
        lam = torch.where(use_cutmix, own, lam) if box is not None else lam
        targets = lam.view(n, 1) * targets + (1 - lam.view(n, 1)) * targets[partner]
        return mixed, targets, mixed_views


def _mix(images, partner, lam, use_cutmix, box) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One view mixed; with CutMix also the share of each image that is still its own in this view."""
    x = images.float()
    n, _, height, width = x.shape
    mixed = lam.view(n, 1, 1, 1) * x + (1 - lam.view(n, 1, 1, 1)) * x[partner]
    if box is None:
        return mixed, None
    fy, fx, side = box
    cy, cx = fy * height, fx * width
    y1, y2 = (cy - side * height / 2).clamp(0, height), (cy + side * height / 2).clamp(0, height)
    x1, x2 = (cx - side * width / 2).clamp(0, width), (cx + side * width / 2).clamp(0, width)
    rows = torch.arange(height, device=x.device).view(1, height, 1)
    cols = torch.arange(width, device=x.device).view(1, 1, width)
    inside = ((rows >= y1.round().view(n, 1, 1)) & (rows < y2.round().view(n, 1, 1))
              & (cols >= x1.round().view(n, 1, 1)) & (cols < x2.round().view(n, 1, 1)))
    inside &= use_cutmix.view(n, 1, 1)
    mixed = torch.where(inside.unsqueeze(1), x[partner], mixed)
    return mixed, 1 - inside.flatten(1).float().mean(1)


def _beta(alpha: float, n: int, device: torch.device) -> torch.Tensor:
    """n draws from Beta(alpha, alpha) on the device, without the distribution's argument checks (they read
    the result of a comparison on the host, which on a GPU waits for every kernel queued before it)."""
    alpha = torch.tensor(alpha, device=device)
    return torch.distributions.Beta(alpha, alpha, validate_args=False).sample((n,))
