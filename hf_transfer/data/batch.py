"""The batch between data/ and trainers/: what a sample and a collated batch hold, and how a batch becomes a model's
input. Every key is named here, once; nothing else spells them.

A sample (`samples.SampleTransform`, `streaming.StreamingSplit`) and the batch `samples.UInt8Collator` stacks from
samples (a `Batch`) hold:

| key            | a batch holds                                         | written by             | read by            |
|----------------|-------------------------------------------------------|------------------------|--------------------|
| `pixel_values` | uint8 (N, 3, H, W), channels-last memory, at storage  | SampleTransform,       | `pictures`         |
|                | size; the trained model's input size when `fitted`    | the stream, collator   |                    |
| `labels`       | (N,) class ids, or (N, C) multi-hot label sets        | the same               | the trainers' loss |
| `row_index`    | (N,) each image's row (a stream's: shard << 32 | row) | the same               | the teacher's cache|
| `augment`      | (N, 4) each image's crop and flip, for the device     | SampleTransform (a     | `pictures`         |
|                | (`on_device.geometry.crop_and_flip`)                  | split decoded once)    |                    |
| `squash`       | present: random-resized crops, which each model       | SampleTransform, the   | `pictures`         |
|                | resizes whole, without its centre crop                | stream (a sample: True)|                    |
| `fitted`       | present: images of mixed sizes, which the collator    | collator               | `pictures`         |
|                | fitted to each model's input (the device does not)    |                        |                    |
| `view_<name>`  | another model's own fit of a `fitted` batch (uint8)   | collator (`with_view`) | `pictures`         |
| `stream`       | (N, 8) each image's place in the training stream      | the stream             | TransferTrainer.   |
|                |                                                       |                        | get_batch_samples  |
|                |                                                       |                        | (pops it)          |

`squash` and `fitted` are flags: their presence is the value (a collated one holds a 0-d True tensor, so that the
batch still moves to the device as tensors). A batch is a `dict`: the Trainer and accelerate move it to the device
key by key and rebuild it with ``type(batch)(...)``, which keeps the class.

From a batch to a model's input, in two steps that every consumer shares: `pictures` applies what the training view
adds (the crops and flips, `squash`) and gives the images every model starts from (training mixes them,
`on_device.mixing`, before any model sees them); `model_input` makes one model's input from them, its own view of a
mixed-size batch or its own resize of the shared images. Training (`TransferTrainer._prepare_inputs`), the BatchNorm
statistics (`TransferTrainer.recompute_batchnorm_statistics`) and the distillation teacher
(`DistillationTrainer.teacher_logits_for`) all go through them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from ..on_device.geometry import crop_and_flip
from ..on_device.preprocessing import ToModelInput

PIXEL_VALUES = "pixel_values"
LABELS = "labels"
ROW_INDEX = "row_index"
AUGMENT = "augment"
SQUASH = "squash"
FITTED = "fitted"
VIEW_PREFIX = "view_"
STREAM = "stream"


def view_key(name: str) -> str:
    """The key of the view named `name` (`UInt8Collator.with_view`)."""
    return VIEW_PREFIX + name


class Batch(dict):
    """A collated batch (keys: the module's table), read through typed properties."""

    @property
    def pixel_values(self) -> torch.Tensor:
        return self[PIXEL_VALUES]

    @property
    def labels(self) -> torch.Tensor | None:
        return self.get(LABELS)

    @property
    def row_index(self) -> torch.Tensor:
        return self[ROW_INDEX]

    @property
    def augment(self) -> torch.Tensor | None:
        return self.get(AUGMENT)

    @property
    def squash(self) -> bool:
        return SQUASH in self

    @property
    def fitted(self) -> bool:
        return FITTED in self

    @property
    def views(self) -> dict[str, torch.Tensor]:
        """The other models' views of a `fitted` batch, by name (none for a batch of one size)."""
        return {key.removeprefix(VIEW_PREFIX): value for key, value in self.items() if key.startswith(VIEW_PREFIX)}

    @property
    def stream(self) -> torch.Tensor | None:
        return self.get(STREAM)


@dataclass
class Pictures:
    """A batch's images on the device as every model starts from them: after the training view's crops and flips
    (and mixing, in training), before any model's resize and normalisation."""

    images: torch.Tensor  # uint8, or mixed floats on the 0-255 scale; the trained model's input size when `fitted`
    views: dict[str, torch.Tensor] = field(default_factory=dict)  # other models' own fits of a `fitted` batch
    fitted: bool = False  # mixed sizes: `images` and `views` are each model's input size already
    squash: bool = False  # random-resized crops: each model resizes them whole


def as_batch(batch: Mapping) -> Batch:
    """`batch` read as a `Batch`: a plain dict (made by hand in tests and tools) holds the same keys."""
    return batch if isinstance(batch, Batch) else Batch(batch)


def pictures(batch: Mapping, augmented: bool) -> Pictures:
    """What every model's input is made from. `augmented`: the training view (training, and the BatchNorm
    statistics), with the crops and flips the device does and `squash`; else the images as stored."""
    batch = as_batch(batch)
    images = batch.pixel_values
    if augmented and batch.augment is not None:  # crops and flips, batched (data/samples.py)
        images = crop_and_flip(images, batch.augment)
    return Pictures(images, batch.views, batch.fitted, augmented and batch.squash)


def model_input(pictures: Pictures, to_input: ToModelInput, view: str | None = None) -> torch.Tensor:
    """One model's float input: its own `view` of a mixed-size batch, made by the collator from the stored images
    (never another model's resize), or its own resize of the shared images."""
    if view is not None and pictures.fitted:
        if view not in pictures.views:
            raise ValueError(f"a mixed-size batch without the view '{view}': the collator makes it "
                             f"(UInt8Collator.with_view)")
        return to_input(pictures.views[view], fitted=True)
    return to_input(pictures.images, pictures.fitted, pictures.squash)
