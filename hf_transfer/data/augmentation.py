"""Training augmentation, applied per sample on the CPU to uint8 images at storage resolution.

Each image gets its own random draw (the transforms run once per image, in the DataLoader
workers), seeded by (run seed, epoch, row): see `sample_seed`. Working at storage resolution keeps this cheap: a 32x32 CIFAR image costs a few
microseconds, where the same work at 224 px would cost fifty times as much.

Presets (`--augmentation`):
- auto:   the default: `basic` for the natural-photo data sets it is known to help and whose
          classes survive a left-right mirror (CIFAR-10/100), `none` elsewhere. Digits, text and
          many medical images change class when mirrored, and nothing in a data set says whether
          they do. On 100 digits, random crops cost an EfficientNet trained from scratch 10 points
          and gained nothing beyond noise from real weights (benchmarks/transfer.py).
- none:   no augmentation (deterministic).
- crop:   random crop with 1/8 padding.
- basic:  the tutorial's: random crop with 1/8 padding, horizontal flip.
- strong: the tutorial's aggressive set (random resized crop scale 0.8-1.0, flip, rotation
          10 degrees, colour jitter 0.2) followed by TrivialAugment.
"""

from __future__ import annotations

import torch
from torchvision.transforms import v2

AUGMENTATIONS = ("auto", "none", "crop", "basic", "strong")
# Natural-photo data sets whose classes survive a left-right mirror, where crops and flips are the standard.
MIRROR_SAFE = ("uoft-cs/cifar10", "cifar10", "uoft-cs/cifar100", "cifar100")


def resolve_augmentation(preset: str, dataset_name: str) -> str:
    """The preset `auto` stands for on this data set: augmentation only where it is known to be safe and to help."""
    if preset != "auto":
        return preset
    return "basic" if dataset_name.lower() in MIRROR_SAFE else "none"


def sample_seed(seed: int, epoch: int, row: int) -> int:
    """The seed of one image's augmentation: a function of (run seed, epoch, row) only.

    So the view of an image does not depend on the process, the DataLoader worker or the
    order it is fetched in: a resumed run, a run with more workers and a run on more
    processes draw exactly the same augmentations as the original.
    """
    return hash((seed, epoch, row)) & 0x7FFF_FFFF_FFFF_FFFF


class Augmentation:
    """Callable on one uint8 CHW tensor; builds (and caches) the transform for each image size."""

    def __init__(self, preset: str):
        if preset not in AUGMENTATIONS or preset == "auto":
            raise ValueError(f"unknown augmentation '{preset}'; choose one of: {', '.join(AUGMENTATIONS)}")
        self.preset = preset
        self._by_size: dict[tuple[int, int], v2.Transform] = {}

    def __call__(self, image: torch.Tensor, seed: int | None = None) -> torch.Tensor:
        """Augment one image; with `seed`, the draw depends on the seed alone (see `sample_seed`)."""
        if self.preset == "none":
            return image
        size = (image.shape[-2], image.shape[-1])
        if size not in self._by_size:
            self._by_size[size] = self._build(size)
        if seed is None:
            return self._by_size[size](image)
        # torchvision draws from torch's default CPU generator: seed it for this image, then put
        # its state back, so nothing else (shuffling, mixup) sees a difference. ~4 us per image.
        generator = torch.default_generator
        state = generator.get_state()
        generator.manual_seed(seed)
        try:
            return self._by_size[size](image)
        finally:
            generator.set_state(state)

    def _build(self, size: tuple[int, int]) -> v2.Transform:
        if self.preset in ("crop", "basic"):
            padding = max(1, round(min(size) / 8))  # CIFAR: 4 px, as in the tutorial
            crop = v2.RandomCrop(size, padding=padding)
            return crop if self.preset == "crop" else v2.Compose([crop, v2.RandomHorizontalFlip()])
        return v2.Compose([
            v2.RandomResizedCrop(size, scale=(0.8, 1.0), antialias=True),
            v2.RandomHorizontalFlip(),
            v2.RandomRotation(10),
            v2.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2),
            v2.TrivialAugmentWide(),
        ])
