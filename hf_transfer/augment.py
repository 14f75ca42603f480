"""Training augmentation, applied per sample on the CPU to uint8 images at storage resolution.

Each image gets its own random draw (the transforms run once per image, in the DataLoader
workers). Working at storage resolution keeps this cheap: a 32x32 CIFAR image costs a few
microseconds, where the same work at 224 px would cost fifty times as much.

Presets (`--augmentation`):
- none:   no augmentation (deterministic).
- basic:  the tutorial's: random crop with 1/8 padding, horizontal flip.
- strong: the tutorial's aggressive set (random resized crop scale 0.8-1.0, flip, rotation
          10 degrees, colour jitter 0.2) followed by TrivialAugment.
"""

from __future__ import annotations

import torch
from torchvision.transforms import v2

AUGMENTATIONS = ("none", "basic", "strong")


class Augmentation:
    """Callable on one uint8 CHW tensor; builds (and caches) the transform for each image size."""

    def __init__(self, preset: str):
        if preset not in AUGMENTATIONS:
            raise ValueError(f"unknown augmentation '{preset}'; choose one of: {', '.join(AUGMENTATIONS)}")
        self.preset = preset
        self._by_size: dict[tuple[int, int], v2.Transform] = {}

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        if self.preset == "none":
            return image
        size = (image.shape[-2], image.shape[-1])
        if size not in self._by_size:
            self._by_size[size] = self._build(size)
        return self._by_size[size](image)

    def _build(self, size: tuple[int, int]) -> v2.Transform:
        if self.preset == "basic":
            padding = max(1, round(min(size) / 8))  # CIFAR: 4 px, as in the tutorial
            return v2.Compose([v2.RandomCrop(size, padding=padding), v2.RandomHorizontalFlip()])
        return v2.Compose([
            v2.RandomResizedCrop(size, scale=(0.8, 1.0), antialias=True),
            v2.RandomHorizontalFlip(),
            v2.RandomRotation(10),
            v2.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2),
            v2.TrivialAugmentWide(),
        ])

    def __repr__(self) -> str:
        return f"Augmentation({self.preset!r})"
