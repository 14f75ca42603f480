"""Random crops and flips of a whole batch on the device, each image with its own parameters.

torchvision's transforms draw one set of parameters per call, so a batch would share one crop;
here each image brings its own (padding, top, left, flip), drawn on the CPU from its
(seed, epoch, row) seed (`data/augmentation.py`), and the whole batch is cut with one gather.
"""

from __future__ import annotations

import torch


def crop_and_flip(images: torch.Tensor, parameters: torch.Tensor) -> torch.Tensor:
    """`images` (N, C, H, W), any dtype; `parameters` (N, 4): padding, top, left, flip.

    The result is what `v2.RandomCrop((H, W), padding)` then `v2.RandomHorizontalFlip()` give with those
    draws: the image padded with zeros on every side, cut at (top, left), mirrored where flip is 1.
    The padding is never materialised: pixels that fall in it are read from the border and zeroed. So
    nothing here is read back to the host, and on a GPU the CPU never waits for the device (reading the
    padding as a Python int would make it wait for every kernel queued before it).
    """
    n, _, height, width = images.shape
    parameters = parameters.to(images.device)
    padding, top, left, flip = parameters[:, 0:1], parameters[:, 1:2], parameters[:, 2:3], parameters[:, 3:4].bool()
    rows = top - padding + torch.arange(height, device=images.device)  # (N, H), in the unpadded image
    columns = torch.arange(width, device=images.device)
    columns = left - padding + torch.where(flip, width - 1 - columns, columns)  # (N, W)
    inside = ((rows >= 0) & (rows < height))[:, :, None] & ((columns >= 0) & (columns < width))[:, None, :]
    batch = torch.arange(n, device=images.device)
    # (N, H, W, C) by advanced indexing, back to (N, C, H, W) with the input's memory layout
    cut = images.permute(0, 2, 3, 1)[batch[:, None, None], rows.clamp(0, height - 1)[:, :, None],
                                     columns.clamp(0, width - 1)[:, None, :]]
    cut = cut * inside[..., None].to(cut.dtype)  # the zero padding
    return cut.permute(0, 3, 1, 2)
