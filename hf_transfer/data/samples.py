"""Samples: what the DataLoader delivers, per sample on the CPU in uint8, and how it is stacked.

`set_transform` decodes (and, for the train split, augments) each sample when the DataLoader asks
for it and returns uint8 tensors at storage resolution; `UInt8Collator` stacks them. Conversion
to the model's float input happens later, on the device (`hf_transfer/on_device/`).

A split whose images all have one size and fit `DECODE_BUDGET` (CIFAR-10's train split is 150 MB
of uint8) is decoded once, up front, into one tensor: every epoch then reads pixels instead of
decoding PNGs (1.3 ms per batch of 32 on a CPU core). Crops and flips of such a split are left to
the device, batched, with each image's parameters computed here from its seed (a few integer
operations instead of ~60 us of transforms per image).

Deciding that costs no pass over the data: the headers of a sample of rows say whether one size is
likely and what the split would take; the decode itself checks every image, and falls back to
decoding per sample at the first one of another size. The budget is one per machine, shared by the
splits (train first) and divided among the machine's processes, each of which holds its own copy.
"""

from __future__ import annotations

import io
import logging
import math
import os
from dataclasses import dataclass

import numpy as np
import PIL.Image
import torch
from tqdm.auto import tqdm
from transformers import TrainerCallback

from ..errors import CorruptImageError
from ..on_device.preprocessing import ImageSpec, fit_to_spec
from .augmentation import Augmentation, sample_seed
from .batch import AUGMENT, FITTED, LABELS, PIXEL_VALUES, ROW_INDEX, SQUASH, STREAM, Batch, view_key
from .dataset import ROW, ImageData
from .decoding import decode_rgb
from .streaming import StreamingSplit

logger = logging.getLogger(__name__)


class EpochCallback(TrainerCallback):
    """Tells the augmentation which epoch starts, so an image's view depends on (seed, epoch, row) only."""

    def __init__(self, epoch: torch.Tensor):
        self.epoch = epoch

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.epoch.fill_(math.floor((state.epoch or 0.0) + 1e-6))


DECODE_BUDGET = 2**30  # bytes of decoded uint8 pixels per machine, all splits and processes together
HEADER_SAMPLE = 64  # rows whose headers decide whether a split is worth decoding once
DECODE_CHUNK = 1024  # rows read from Arrow at a time while decoding: memory for their file bytes stays bounded


def attach_transforms(data: ImageData, augmentation: str, seed: int = 42, random_erasing: float = 0.0,
                      decode_once: bool = True) -> None:
    """Decode (and augment the train split) on the fly, per sample, in uint8; small uniform splits decoded once."""
    data.in_memory = True
    budget = DECODE_BUDGET // processes_on_this_machine()  # what is left of this process's share
    for split, ds, aug in (("train", data.train, Augmentation(augmentation, random_erasing)),
                           ("validation", data.validation, None), ("test", data.test, None)):
        if ds is not None:
            streamed = isinstance(ds, StreamingSplit)  # read a shard at a time, never whole
            decoded = decode_split(ds, data.image_column, split, budget) if decode_once and not streamed else None
            if decoded is not None:
                budget -= decoded.images.numel()
                data.decoded[split] = decoded  # the data check reads these pixels instead of decoding again
            transform = SampleTransform(data.image_column, data.label_column, split, aug, seed, data.epoch, decoded,
                                        data.task)
            # Decoded pixels are read by row number: the stored image bytes need not leave Arrow again.
            columns = [data.label_column, ROW] if decoded is not None else [data.image_column, data.label_column, ROW]
            ds.set_transform(transform, columns=columns)
            data.in_memory = data.in_memory and not transform.per_image_work


def processes_on_this_machine() -> int:
    """Training processes on this machine (torchrun and accelerate launch set LOCAL_WORLD_SIZE)."""
    return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


@dataclass
class DecodedSplit:
    images: torch.Tensor  # (N, H, W, 3) uint8: stacked channels-last, as the collator wants them
    position: dict[int, int]  # row number -> index in `images`


def decode_split(ds, image_column: str, split: str, budget: int = DECODE_BUDGET) -> DecodedSplit | None:
    """Every image of the split decoded into one tensor, when they share one size and fit `budget` bytes; None
    otherwise. Reads the headers of HEADER_SAMPLE rows spread over the split, not of every row."""
    raw = ds.with_format(None)
    if len(raw) == 0:
        return None
    sample = sorted({round(i) for i in np.linspace(0, len(raw) - 1, min(len(raw), HEADER_SAMPLE))})
    picked = raw.select(sample)
    sizes = {_stored_size(cell, split, row) for cell, row in zip(picked[image_column], picked[ROW])}
    if len(sizes) != 1 or len(raw) * 3 * math.prod(next(iter(sizes))) > budget:
        return None
    width, height = next(iter(sizes))
    images = torch.empty((len(raw), height, width, 3), dtype=torch.uint8)
    rows = []
    progress = tqdm(total=len(raw), desc=f"decoding the {split} split once", leave=False, disable=len(raw) < 5000)
    for start in range(0, len(raw), DECODE_CHUNK):
        chunk = raw[start:start + DECODE_CHUNK]
        for i, (cell, row) in enumerate(zip(chunk[image_column], chunk[ROW]), start):
            image = _decode(cell, split, row)  # a broken file stops the run now, not mid-epoch
            if tuple(image.shape[-2:]) != (height, width):  # another size after all: decoded per sample
                logger.info("the %s split has images of more than one size (row %s is %dx%d, not %dx%d): decoded "
                            "per sample", split, row, image.shape[-1], image.shape[-2], width, height)
                return None
            images[i] = image.permute(1, 2, 0)
            rows.append(int(row))
        progress.update(len(chunk[ROW]))
    progress.close()
    return DecodedSplit(images=images, position={row: i for i, row in enumerate(rows)})


def _stored_size(cell, split: str, row) -> tuple[int, int]:
    """(width, height) from the image's header, without decoding its pixels."""
    try:
        if isinstance(cell, dict):
            source = io.BytesIO(cell["bytes"]) if cell.get("bytes") is not None else cell["path"]
            with PIL.Image.open(source) as image:
                return image.size
        return cell.size
    except Exception as exc:  # PIL raises many types; all mean "this file is broken"
        raise CorruptImageError(f"cannot decode the image in split '{split}', row {row}: {exc}") from exc


def _decode(value, split: str, row) -> torch.Tensor:
    try:
        return decode_rgb(value)
    except Exception as exc:  # PIL raises many types; all mean "this file is broken"
        where = f" ({value['path']})" if isinstance(value, dict) and value.get("path") else ""
        raise CorruptImageError(f"cannot decode the image in split '{split}', row {row}{where}: {exc}") from exc


class SampleTransform:
    """The `set_transform` function: a batch of rows -> uint8 CHW RGB tensors, labels, row numbers (and, when
    the device crops and flips, each image's parameters for it)."""

    def __init__(self, image_column: str, label_column: str, split: str, augmentation: Augmentation | None = None,
                 seed: int = 42, epoch: torch.Tensor | None = None, decoded: DecodedSplit | None = None, task=None):
        self.image_column, self.label_column, self.split = image_column, label_column, split
        self.sample_labels = task.sample_labels if task is not None else None  # a class id, or a multi-hot vector
        self.augmentation, self.seed, self.decoded = augmentation, seed, decoded
        self.epoch = epoch if epoch is not None else torch.zeros((), dtype=torch.int64)
        # Crops and flips of a decoded split (one image size) go to the device, batched.
        self.on_device = decoded is not None and augmentation is not None and augmentation.batched
        # Whether a sample costs more than a row lookup on the CPU: decoding, or augmenting one image at a time.
        self.per_image_work = decoded is None or (augmentation is not None and not augmentation.is_identity
                                                  and not self.on_device)
        # A random-resized crop is seen whole by each model, resized to its input (augmentation.py).
        self.squash = augmentation is not None and augmentation.squash

    def __call__(self, batch: dict) -> dict:
        epoch = int(self.epoch)  # read the shared counter once per batch
        cells = batch[self.image_column] if self.decoded is None else [None] * len(batch[ROW])
        images, parameters = zip(*(self.image(cell, int(row), epoch) for cell, row in zip(cells, batch[ROW])))
        labels = batch[self.label_column]
        labels = [self.sample_labels(v) for v in labels] if self.sample_labels is not None else list(labels)
        samples = {PIXEL_VALUES: list(images), LABELS: labels, ROW_INDEX: list(batch[ROW])}
        if self.on_device:
            samples[AUGMENT] = list(parameters)
        if self.squash:
            samples[SQUASH] = [True] * len(images)
        return samples

    def image(self, cell, row: int, epoch: int) -> tuple[torch.Tensor, list[int] | None]:
        """One image as uint8 CHW: decoded (or read from the decoded split) and augmented here, or with the
        parameters of its crop and flip when the device does them."""
        image = (self.decoded.images[self.decoded.position[row]].permute(2, 0, 1) if self.decoded is not None
                 else _decode(cell, self.split, row))
        if self.on_device:
            return image, self.augmentation.batch_parameters(tuple(image.shape[-2:]),
                                                             sample_seed(self.seed, epoch, row))
        if self.augmentation is not None:
            image = self.augmentation(image, sample_seed(self.seed, epoch, row))
        return image, None


class UInt8Collator:
    """Stack samples into a uint8 batch; resize and crop on the CPU only when their sizes differ.

    Images of one size (CIFAR) travel at storage resolution, and each model fits them on the
    device to its own input (resize, centre crop: `ToModelInput`). Mixed sizes cannot be
    stacked, so each image is fitted here, once per model that will see it: `pixel_values` for
    the trained model and, for every other view (`with_view`: a distillation teacher),
    `view_<name>`, each straight from the stored image with the same function as the device
    path and the saved processor; `fitted` then says the batch is the models' input already.
    No model ever sees another model's resize of an image. The keys: `batch.py`.
    """

    def __init__(self, spec: ImageSpec, views: dict[str, ImageSpec] | None = None):
        self.spec = spec
        self.views = dict(views or {})

    def with_view(self, name: str, spec: ImageSpec) -> UInt8Collator:
        """This collator, also making `view_<name>` with `spec`'s geometry for mixed-size batches."""
        return UInt8Collator(self.spec, {**self.views, name: spec})

    def __call__(self, examples: list[dict]) -> Batch:
        images = [e[PIXEL_VALUES] for e in examples]
        labels = [e[LABELS] for e in examples]  # class ids, or multi-hot vectors (several labels per image)
        collated = Batch({
            LABELS: torch.stack(labels) if isinstance(labels[0], torch.Tensor) else torch.tensor(labels, dtype=torch.long),
            ROW_INDEX: torch.tensor([e[ROW_INDEX] for e in examples], dtype=torch.long),
        })
        squash = SQUASH in examples[0]  # random-resized crops: each model resizes them whole (augmentation.py)
        if squash:
            collated[SQUASH] = torch.ones((), dtype=torch.bool)
        if all(image.shape == images[0].shape for image in images):
            collated[PIXEL_VALUES] = _stack(images)
        else:
            def fitted(spec: ImageSpec) -> torch.Tensor:  # each image on its own, then stacked
                return _stack([fit_to_spec(image[None], spec, squash)[0] for image in images])

            collated[PIXEL_VALUES] = fitted(self.spec)
            for name, spec in self.views.items():
                same = spec.geometry == self.spec.geometry  # the same picture: shared
                collated[view_key(name)] = collated[PIXEL_VALUES] if same else fitted(spec)
            collated[FITTED] = torch.ones((), dtype=torch.bool)
        if AUGMENT in examples[0]:  # each image's crop and flip, applied on the device
            collated[AUGMENT] = torch.tensor([e[AUGMENT] for e in examples], dtype=torch.long)
        if STREAM in examples[0]:  # each image's place in the training stream (data/streaming.py)
            collated[STREAM] = torch.tensor([e[STREAM] for e in examples], dtype=torch.long)
        return collated


def _stack(images: list[torch.Tensor]) -> torch.Tensor:
    # Stacked as NHWC memory, viewed as NCHW: channels-last, the layout the resize kernels prefer.
    return torch.stack([image.permute(1, 2, 0) for image in images]).permute(0, 3, 1, 2)
