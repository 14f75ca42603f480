"""Device-side preprocessing: a uint8 batch becomes one model's float input, on the training device.

The data path is split by cost. Per sample, on the CPU, in uint8: decode, RGB, and the
geometric augmentation at storage resolution (`hf_transfer/data/`). Per batch, on the
training device: float conversion, resize to the model's input size and normalisation
(`ToModelInput`). A 32x32 CIFAR image then crosses the host-device link as 3 KB instead of
the 600 KB a 224x224 float32 tensor would take, and the expensive pixels are made by the GPU.

`ImageSpec` carries the facts (input size, mean, std, interpolation). They are read from the
checkpoint's image processor or timm `pretrained_cfg`, never written in the code, and saved
back as a standard `ViTImageProcessor`, which applies exactly the same operations on the CPU,
so `pipeline("image-classification")` reproduces the evaluation.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torchvision.transforms.v2.functional as tvF
from torchvision.transforms import InterpolationMode
from transformers.image_utils import PILImageResampling

_RESAMPLE_NAMES = {
    PILImageResampling.NEAREST: "nearest",
    PILImageResampling.BILINEAR: "bilinear",
    PILImageResampling.BICUBIC: "bicubic",
    # torchvision cannot do LANCZOS on the GPU; bicubic is its closest relative.
    PILImageResampling.LANCZOS: "bicubic",
}
_RESAMPLE_CODES = {"nearest": PILImageResampling.NEAREST, "bilinear": PILImageResampling.BILINEAR,
                   "bicubic": PILImageResampling.BICUBIC}


@dataclass(frozen=True)
class ImageSpec:
    """What a model expects as input: square size, mean/std on the [0, 1] scale, interpolation."""

    size: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str = "bilinear"

    @classmethod
    def from_image_processor(cls, processor) -> ImageSpec:
        """Read the facts from a transformers image processor (ViT, ConvNeXt, ResNet, ...)."""
        size = _processor_output_size(processor)
        resample = getattr(processor, "resample", None)
        interpolation = _RESAMPLE_NAMES.get(PILImageResampling(resample), "bilinear") if resample is not None else "bilinear"
        if not getattr(processor, "do_normalize", True):
            mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
        else:
            mean, std = _three(processor.image_mean), _three(processor.image_std)
        return cls(size=size, mean=mean, std=std, interpolation=interpolation)

    @classmethod
    def from_timm_config(cls, pretrained_cfg: dict) -> ImageSpec:
        """Read the facts from a timm `pretrained_cfg`, resolved the way timm resolves them."""
        from timm.data import resolve_data_config

        data_config = resolve_data_config(pretrained_cfg=dict(pretrained_cfg), verbose=False)
        _, height, width = data_config["input_size"]
        interpolation = data_config.get("interpolation", "bilinear")
        if interpolation not in _RESAMPLE_CODES:
            interpolation = "bicubic"  # timm's "random" and "lanczos" have no batched GPU kernel
        return cls(size=(height, width), mean=_three(data_config["mean"]), std=_three(data_config["std"]),
                   interpolation=interpolation)

    def with_size(self, size: int | None) -> ImageSpec:
        return self if size is None else replace(self, size=(size, size))

    def to_image_processor(self):
        """A standard image processor that does on the CPU exactly what `ToModelInput` does."""
        from transformers import ViTImageProcessor

        return ViTImageProcessor(
            do_resize=True,
            size={"height": self.size[0], "width": self.size[1]},
            resample=_RESAMPLE_CODES[self.interpolation],
            do_rescale=True,
            rescale_factor=1 / 255,
            do_normalize=True,
            image_mean=list(self.mean),
            image_std=list(self.std),
            do_convert_rgb=True,
        )


def _three(values) -> tuple[float, ...]:
    values = [float(v) for v in (values if isinstance(values, (list, tuple)) else [values])]
    return tuple(values * 3) if len(values) == 1 else tuple(values)


def _processor_output_size(processor) -> tuple[int, int]:
    def field(size, key):
        return size.get(key) if isinstance(size, dict) else getattr(size, key, None)

    crop = getattr(processor, "crop_size", None)
    if getattr(processor, "do_center_crop", False) and crop and field(crop, "height"):
        return int(field(crop, "height")), int(field(crop, "width"))
    size = getattr(processor, "size", None) or {}
    if field(size, "height") and field(size, "width"):
        return int(field(size, "height")), int(field(size, "width"))
    if field(size, "shortest_edge"):
        edge = int(field(size, "shortest_edge"))
        return edge, edge
    raise ValueError(f"cannot tell the input size from image processor {type(processor).__name__}")


# ---------------------------------------------------------------- per batch, on the device


def resize_batch(images: torch.Tensor, size: tuple[int, int], interpolation: str) -> torch.Tensor:
    """Resize a NCHW batch (uint8 or float); a no-op when it already has the size."""
    if tuple(images.shape[-2:]) == tuple(size):
        return images
    return tvF.resize(images, list(size), interpolation=InterpolationMode(interpolation), antialias=True)


class ToModelInput:
    """uint8 (or float on the 0-255 scale) NCHW batch -> the float32 input of one model.

    The same operations, in the same order, as the saved `ViTImageProcessor`: resize,
    then rescale and normalise fused as ``(x - 255 * mean) / (255 * std)``.
    """

    def __init__(self, spec: ImageSpec, channels_last: bool = False):
        self.spec = spec
        self.channels_last = channels_last
        self._stats: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def _mean_std(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if device not in self._stats:
            # Same arithmetic as the processor's fused rescale + normalise.
            mean = torch.tensor(self.spec.mean, device=device) * (1.0 / (1 / 255))
            std = torch.tensor(self.spec.std, device=device) * (1.0 / (1 / 255))
            self._stats[device] = (mean, std)
        return self._stats[device]

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        # Batches arrive channels-last (see UInt8Collator), where the uint8 resize is twice as fast on
        # the CPU; the result is the same. The float copy writes the layout the model wants.
        images = resize_batch(images, self.spec.size, self.spec.interpolation)
        mean, std = self._mean_std(images.device)
        layout = torch.channels_last if self.channels_last else torch.contiguous_format
        x = torch.empty(images.shape, dtype=torch.float32, device=images.device, memory_format=layout)
        x.copy_(images)
        return tvF.normalize(x, mean, std, inplace=True)  # in place, as the processor does: the same values
