"""Random crops and flips of a whole batch on the device, each image with its own parameters.

torchvision's transforms draw one set of parameters per call, so a batch would share one crop;
here each image brings its own (padding, top, left, flip), drawn on the CPU from its
(seed, epoch, row) seed (`data/augmentation.py`), and the whole batch is cut with one gather.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def crop_and_flip(images: torch.Tensor, parameters: torch.Tensor) -> torch.Tensor:
    """`images` (N, C, H, W), any dtype; `parameters` (N, 4): padding (the same for all), top, left, flip.

    The result is what `v2.RandomCrop((H, W), padding)` then `v2.RandomHorizontalFlip()` give with those
    draws: the image padded with zeros on every side, cut at (top, left), mirrored where flip is 1.
    """
    n, _, height, width = images.shape
    padding = int(parameters[0, 0])
    padded = F.pad(images, (padding, padding, padding, padding)) if padding else images
    parameters = parameters.to(images.device)
    top, left, flip = parameters[:, 1:2], parameters[:, 2:3], parameters[:, 3:4].bool()
    rows = top + torch.arange(height, device=images.device)  # (N, H)
    columns = torch.arange(width, device=images.device)
    columns = left + torch.where(flip, width - 1 - columns, columns)  # (N, W)
    batch = torch.arange(n, device=images.device)
    # (N, H, W, C) by advanced indexing, back to (N, C, H, W) with the input's memory layout
    cut = padded.permute(0, 2, 3, 1)[batch[:, None, None], rows[:, :, None], columns[:, None, :]]
    return cut.permute(0, 3, 1, 2)
