"""Samples: what the DataLoader delivers, per sample on the CPU in uint8, and how it is stacked.

`set_transform` decodes (and, for the train split, augments) each sample when the DataLoader asks
for it and returns uint8 tensors at storage resolution; `UInt8Collator` stacks them. Conversion
to the model's float input happens later, on the device (`hf_transfer/on_device/`).
"""

from __future__ import annotations

import math

import torch
from transformers import TrainerCallback

from ..errors import CorruptImageError
from ..on_device.preprocessing import resize_batch
from .augmentation import Augmentation, sample_seed
from .dataset import ROW, ImageData
from .decoding import decode_rgb


class EpochCallback(TrainerCallback):
    """Tells the augmentation which epoch starts, so an image's view depends on (seed, epoch, row) only."""

    def __init__(self, epoch: torch.Tensor):
        self.epoch = epoch

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.epoch.fill_(math.floor((state.epoch or 0.0) + 1e-6))


def attach_transforms(data: ImageData, augmentation: str, seed: int = 42, random_erasing: float = 0.0) -> None:
    """Decode (and augment the train split) on the fly, per sample, in uint8."""
    for split, ds, aug in (("train", data.train, Augmentation(augmentation, random_erasing)),
                           ("validation", data.validation, None), ("test", data.test, None)):
        if ds is not None:
            transform = SampleTransform(data.image_column, data.label_column, split, aug, seed, data.epoch)
            ds.set_transform(transform, columns=[data.image_column, data.label_column, ROW])


class SampleTransform:
    """The `set_transform` function: a batch of rows -> uint8 CHW RGB tensors, labels, row numbers."""

    def __init__(self, image_column: str, label_column: str, split: str, augmentation: Augmentation | None = None,
                 seed: int = 42, epoch: torch.Tensor | None = None):
        self.image_column, self.label_column, self.split = image_column, label_column, split
        self.augmentation, self.seed = augmentation, seed
        self.epoch = epoch if epoch is not None else torch.zeros((), dtype=torch.int64)

    def __call__(self, batch: dict) -> dict:
        images, labels = [], []
        epoch = int(self.epoch)  # read the shared counter once per batch
        for value, label, row in zip(batch[self.image_column], batch[self.label_column], batch[ROW]):
            try:
                image = decode_rgb(value)
            except Exception as exc:  # PIL raises many types; all mean "this file is broken"
                where = f" ({value['path']})" if isinstance(value, dict) and value.get("path") else ""
                raise CorruptImageError(
                    f"cannot decode the image in split '{self.split}', row {row}{where}: {exc}"
                ) from exc
            if self.augmentation is not None:
                image = self.augmentation(image, sample_seed(self.seed, epoch, int(row)))
            images.append(image)
            labels.append(label)
        return {"pixel_values": images, "labels": labels, "row_index": list(batch[ROW])}


class UInt8Collator:
    """Stack samples into a uint8 batch; resize on the CPU only when their sizes differ.

    Images of one size (CIFAR) travel at storage resolution and are resized on the device.
    Mixed sizes cannot be stacked, so each is resized to the model's input size here, with
    the same function and interpolation the device path and the saved processor use.
    """

    def __init__(self, size: tuple[int, int], interpolation: str):
        self.size, self.interpolation = tuple(size), interpolation

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        images = [e["pixel_values"] for e in examples]
        if any(image.shape != images[0].shape for image in images):
            images = [resize_batch(image, self.size, self.interpolation) for image in images]
        # Stacked as NHWC memory, viewed as NCHW: channels-last, the layout the resize kernels prefer.
        batch = torch.stack([image.permute(1, 2, 0) for image in images]).permute(0, 3, 1, 2)
        return {
            "pixel_values": batch,
            "labels": torch.tensor([e["labels"] for e in examples], dtype=torch.long),
            "row_index": torch.tensor([e["row_index"] for e in examples], dtype=torch.long),
        }
