"""Training augmentation, applied per sample on the CPU to uint8 images at storage resolution.

Each image gets its own random draw (the transforms run once per image, in the DataLoader
workers), seeded by (run seed, epoch, row): see `sample_seed`, so a resumed run draws the same
views. Working at storage resolution keeps this cheap: a 32x32 CIFAR image costs a few
microseconds, where the same work at 224 px would cost fifty times as much.

`--augmentation` is a preset, or presets joined by `+` (applied in that order, e.g.
`crop+randaugment`):
- auto:   the default: `basic` for the natural-photo data sets it is known to help and whose
          classes survive a left-right mirror (CIFAR-10/100), `none` elsewhere. Digits, text and
          many medical images change class when mirrored, and nothing in a data set says whether
          they do. On 100 digits, random crops cost an EfficientNet trained from scratch 10 points
          and gained nothing beyond noise from real weights (benchmarks/transfer.py).
- none:   no augmentation (deterministic).
- crop:   random crop with 1/8 padding.
- flip:   horizontal flip.
- basic:  the tutorial's: crop + flip.
- rrc:    random-resized crop, ImageNet training's: a region of 8-100% of the image's area with an
          aspect ratio of 3/4-4/3, made square here at the image's shorter edge; each model then
          resizes the whole square to its input, without its evaluation crop (`squash`).
- strong: the tutorial's aggressive set (random resized crop scale 0.8-1.0, flip, rotation
          10 degrees, colour jitter 0.2) followed by TrivialAugment.
- randaugment:    RandAugment, 2 operations at magnitude 9 (timm's rand-m9-n2).
- trivialaugment: TrivialAugment (one operation, random magnitude).
`--random_erasing P` then blanks a random rectangle of each image with probability P.
"""

from __future__ import annotations

import torch
from torchvision.transforms import v2

PRESETS = ("none", "crop", "flip", "basic", "rrc", "strong", "randaugment", "trivialaugment")
AUGMENTATIONS = ("auto", *PRESETS)
# Natural-photo data sets whose classes survive a left-right mirror, where crops and flips are the standard.
MIRROR_SAFE = ("uoft-cs/cifar10", "cifar10", "uoft-cs/cifar100", "cifar100")


def check_augmentation(spec: str) -> None:
    """`auto`, or presets joined by `+`; a ValueError names the unknown part."""
    if spec == "auto":
        return
    unknown = [part for part in spec.split("+") if part not in PRESETS]
    if unknown:
        raise ValueError(f"--augmentation: unknown preset '{unknown[0]}'; use auto, or one or more of "
                         f"{', '.join(PRESETS)} joined by '+'")


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

    def __init__(self, preset: str, random_erasing: float = 0.0):
        check_augmentation(preset)
        if preset == "auto":
            raise ValueError("resolve 'auto' for the data set first (resolve_augmentation)")
        self.parts = [part for part in preset.split("+") if part != "none"]
        self.random_erasing = random_erasing
        self._by_size: dict[tuple[int, int], v2.Transform] = {}

    def __call__(self, image: torch.Tensor, seed: int | None = None) -> torch.Tensor:
        """Augment one image; with `seed`, the draw depends on the seed alone (see `sample_seed`)."""
        if self.is_identity:
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

    @property
    def is_identity(self) -> bool:
        return not self.parts and not self.random_erasing

    @property
    def squash(self) -> bool:
        """Whether each model takes the augmented image whole, resized to its input (a random-resized crop is
        the region to see: the evaluation's centre crop would cut it again)."""
        return "rrc" in self.parts

    @property
    def batched(self) -> bool:
        """Whether this augmentation is crops and flips only, which the device applies to a whole batch at once
        (`on_device/geometry.py`) from per-sample parameters (`batch_parameters`): no per-image CPU work."""
        return bool(self.parts) and set(self.parts) <= {"crop", "flip", "basic"} and not self.random_erasing

    def batch_parameters(self, size: tuple[int, int], seed: int) -> list[int]:
        """[padding, top, left, flip] of one image's crop and flip, from its seed alone (see `sample_seed`):
        the crop of the zero-padded image at (top, left), mirrored when flip is 1; the same draws as the
        CPU transforms (uniform offsets in [0, 2 * padding], a flip with probability 1/2)."""
        crop = any(part in ("crop", "basic") for part in self.parts)
        flip = any(part in ("flip", "basic") for part in self.parts)
        padding = crop_padding(size) if crop else 0
        span = 2 * padding + 1
        return [padding, seed % span, (seed // span) % span, (seed // span**2) % 2 if flip else 0]

    def _build(self, size: tuple[int, int]) -> v2.Transform:
        steps = [step for part in self.parts for step in _steps(part, size)]
        if self.random_erasing:
            steps.append(v2.RandomErasing(p=self.random_erasing, value=0))
        return v2.Compose(steps)


def crop_padding(size: tuple[int, int]) -> int:
    return max(1, round(min(size) / 8))  # CIFAR: 4 px, as in the tutorial


def _steps(part: str, size: tuple[int, int]) -> list[v2.Transform]:
    padding = crop_padding(size)
    return {
        "crop": lambda: [v2.RandomCrop(size, padding=padding)],
        "flip": lambda: [v2.RandomHorizontalFlip()],
        "basic": lambda: [v2.RandomCrop(size, padding=padding), v2.RandomHorizontalFlip()],
        # At the stored resolution (the shorter edge): every model makes its own input from the same region.
        "rrc": lambda: [v2.RandomResizedCrop((min(size),) * 2, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3),
                                             antialias=True)],
        "strong": lambda: [v2.RandomResizedCrop(size, scale=(0.8, 1.0), antialias=True), v2.RandomHorizontalFlip(),
                           v2.RandomRotation(10), v2.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2),
                           v2.TrivialAugmentWide()],
        "randaugment": lambda: [v2.RandAugment(num_ops=2, magnitude=9)],
        "trivialaugment": lambda: [v2.TrivialAugmentWide()],
    }[part]()
