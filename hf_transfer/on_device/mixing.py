"""Mixup and CutMix on the training device, per sample, on the uint8 batch before it is resized.

`TransferTrainer` applies `BatchMix` to the device batch (`--mixup`, `--cutmix`) before each model's
preprocessing, so a distillation teacher and its student see the very same mixed picture.
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

    def __init__(self, num_labels: int, mixup_alpha: float = 0.0, cutmix_alpha: float = 0.0):
        self.num_labels, self.mixup_alpha, self.cutmix_alpha = num_labels, mixup_alpha, cutmix_alpha

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = images.float()
        n, _, height, width = x.shape
        device = x.device
        # Nothing here is read back to the host (a GPU would stall for it): a permutation by sorting random
        # keys, one-hot targets by comparison (one_hot checks the labels' range on the host), and `_beta`.
        partner = torch.rand(n, device=device).argsort()
        targets = (labels[:, None] == torch.arange(self.num_labels, device=device)).float()

        if self.mixup_alpha > 0 and self.cutmix_alpha > 0:
            use_cutmix = torch.rand(n, device=device) < 0.5
        else:
            use_cutmix = torch.full((n,), self.cutmix_alpha > 0, device=device)

        lam = torch.ones(n, device=device)
        if self.mixup_alpha > 0:
            lam = torch.where(use_cutmix, lam, _beta(self.mixup_alpha, n, device))
        mixed = lam.view(n, 1, 1, 1) * x + (1 - lam.view(n, 1, 1, 1)) * x[partner]

        if self.cutmix_alpha > 0:
            cut = torch.sqrt(1 - _beta(self.cutmix_alpha, n, device))  # side ratio of the box
            cy, cx = torch.rand(n, device=device) * height, torch.rand(n, device=device) * width
            y1, y2 = (cy - cut * height / 2).clamp(0, height), (cy + cut * height / 2).clamp(0, height)
            x1, x2 = (cx - cut * width / 2).clamp(0, width), (cx + cut * width / 2).clamp(0, width)
            rows = torch.arange(height, device=device).view(1, height, 1)
            cols = torch.arange(width, device=device).view(1, 1, width)
            box = ((rows >= y1.round().view(n, 1, 1)) & (rows < y2.round().view(n, 1, 1))
                   & (cols >= x1.round().view(n, 1, 1)) & (cols < x2.round().view(n, 1, 1)))
            box &= use_cutmix.view(n, 1, 1)
            mixed = torch.where(box.unsqueeze(1), x[partner], mixed)
            box_lam = 1 - box.flatten(1).float().mean(1)  # the share of the image that is still its own
            lam = torch.where(use_cutmix, box_lam, lam)

        targets = lam.view(n, 1) * targets + (1 - lam.view(n, 1)) * targets[partner]
        return mixed, targets


def _beta(alpha: float, n: int, device: torch.device) -> torch.Tensor:
    """n draws from Beta(alpha, alpha) on the device, without the distribution's argument checks (they read
    the result of a comparison on the host, which on a GPU waits for every kernel queued before it)."""
    alpha = torch.tensor(alpha, device=device)
    return torch.distributions.Beta(alpha, alpha, validate_args=False).sample((n,))
