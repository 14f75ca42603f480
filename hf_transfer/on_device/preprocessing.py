"""Device-side preprocessing: a uint8 batch becomes one model's float input, on the training device.

The data path is split by cost. Per sample, on the CPU, in uint8: decode, RGB, and the
geometric augmentation at storage resolution (`hf_transfer/data/`). Per batch, on the
training device: the checkpoint's resize and centre crop, float conversion and normalisation
(`ToModelInput`). A 32x32 CIFAR image then crosses the host-device link as 3 KB instead of
the 600 KB a 224x224 float32 tensor would take, and the expensive pixels are made by the GPU.

`ImageSpec` carries the facts: input size, how an image of any shape reaches it (squashed, or
its shorter edge resized with the aspect ratio kept and the centre cut out), interpolation,
mean and std (the rescale factor and offset folded in) and channel order. They are read from
the checkpoint's image processor or timm `pretrained_cfg`, never written in the code, and saved
back as a standard transformers image processor that applies the same operations on the CPU,
so `pipeline("image-classification")` reproduces the evaluation.
"""

from __future__ import annotations

import math
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
# transformers' ConvNeXt processor crops by crop_pct below this input size and warps from it on.
_CONVNEXT_WARP_FROM = 384


@dataclass(frozen=True)
class ImageSpec:
    """What a model expects as input, and how an image of any shape becomes it.

    `size` is the input (height, width). `resize` is how an image reaches it: None squashes it
    to `size`; an int resizes its shorter edge to that many pixels, keeping the aspect ratio;
    (height, width) squashes it to that; in the last two cases the centre `size` is then cut
    out. `mean` and `std` apply on the [0, 1] scale; `bgr`: the model takes BGR channels.
    """

    size: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str = "bilinear"
    resize: int | tuple[int, int] | None = None
    bgr: bool = False

    @classmethod
    def from_image_processor(cls, processor) -> ImageSpec:
        """Read the facts from a transformers image processor (ViT, ConvNeXt, ResNet, BiT, MobileViT, ...)."""
        size, resize = _processor_geometry(processor)
        resample = getattr(processor, "resample", None)
        interpolation = _RESAMPLE_NAMES.get(PILImageResampling(resample), "bilinear") if resample is not None else "bilinear"
        bgr = bool(getattr(processor, "do_flip_channel_order", False))
        mean, std = (0.0,) * 3, (1.0,) * 3
        if getattr(processor, "do_normalize", False) and not bgr:  # MobileViT's (the BGR one) never normalises
            mean, std = _three(processor.image_mean), _three(processor.image_std)
        # Rescale by a factor (and an offset: EfficientNet's x * scale - 1), then normalise: folded into mean and
        # std on the [0, 1] scale, the form the device path and the saved processor use.
        scale = float(processor.rescale_factor) * 255 if getattr(processor, "do_rescale", True) else 255.0
        offset = 1.0 if getattr(processor, "do_rescale", True) and getattr(processor, "rescale_offset", False) else 0.0
        if not math.isclose(scale, 1.0, rel_tol=1e-9) or offset:
            mean = tuple((offset + m) / scale for m in mean)
            std = tuple(s / scale for s in std)
        if getattr(processor, "include_top", False):  # EfficientNet divides by the std once more
            std = tuple(s * t for s, t in zip(std, _three(processor.image_std)))
        return cls(size=size, mean=mean, std=std, interpolation=interpolation, resize=resize, bgr=bgr)

    @classmethod
    def from_timm_config(cls, pretrained_cfg: dict) -> ImageSpec:
        """Read the facts from a timm `pretrained_cfg`, resolved the way timm resolves them, with timm's
        evaluation geometry: each edge over `crop_pct`, then the centre crop (`crop_mode` center: the shorter
        edge resized, the aspect ratio kept; squash: both edges)."""
        from timm.data import resolve_data_config

        data_config = resolve_data_config(pretrained_cfg=dict(pretrained_cfg), verbose=False)
        _, height, width = data_config["input_size"]
        crop_pct = data_config.get("crop_pct") or 0.875  # timm's DEFAULT_CROP_PCT
        scaled = (math.floor(height / crop_pct), math.floor(width / crop_pct))
        if data_config.get("crop_mode") == "squash" or scaled[0] != scaled[1]:
            resize = scaled  # (timm keeps the ratio for a non-square input in center mode; squashed here, rare)
        else:
            resize = scaled[0]
        interpolation = data_config.get("interpolation", "bilinear")
        if interpolation not in _RESAMPLE_CODES:
            interpolation = "bicubic"  # timm's "random" and "lanczos" have no batched GPU kernel
        return cls(size=(height, width), mean=_three(data_config["mean"]), std=_three(data_config["std"]),
                   interpolation=interpolation, resize=None if resize == (height, width) else resize)

    def with_size(self, size: int | None) -> ImageSpec:
        """The same preprocessing for a `size` x `size` input: the resize keeps its ratio to the crop."""
        if size is None or (size, size) == self.size:
            return self
        height, width = self.size
        if self.resize is None:
            resize = None
        elif isinstance(self.resize, int):
            resize = int(size * self.resize / min(height, width))
        else:
            resize = (int(size * self.resize[0] / height), int(size * self.resize[1] / width))
        return replace(self, size=(size, size), resize=resize)

    def with_crop_pct(self, crop_pct: float) -> ImageSpec:
        """The shorter edge resized to the input size / `crop_pct` (aspect ratio kept), then the centre cut out."""
        return replace(self, resize=int(min(self.size) / crop_pct))

    @property
    def geometry(self) -> tuple:
        """What decides the pixels of a view of an image, before its values are normalised."""
        return self.size, self.resize, self.interpolation

    def resized_size(self, height: int, width: int) -> tuple[int, int]:
        """The (height, width) an image of that size is resized to, before the centre crop."""
        if self.resize is None:
            return self.size
        if isinstance(self.resize, int):  # the shorter edge to `resize`, the longer in proportion (rounded down)
            if height <= width:
                return self.resize, int(self.resize * width / height)
            return int(self.resize * height / width), self.resize
        return tuple(self.resize)

    def to_image_processor(self):
        """A standard image processor that does on the CPU exactly what `ToModelInput` does."""
        from transformers import BitImageProcessor, MobileViTImageProcessor, ViTImageProcessor

        common = {"resample": _RESAMPLE_CODES[self.interpolation], "do_rescale": True, "rescale_factor": 1 / 255}
        size = ({"shortest_edge": self.resize} if isinstance(self.resize, int) else
                {"height": (self.resize or self.size)[0], "width": (self.resize or self.size)[1]})
        crop = {"do_center_crop": self.resize is not None, "crop_size": {"height": self.size[0], "width": self.size[1]}}
        if self.bgr:
            if self.mean != (0.0,) * 3 or self.std != (1.0,) * 3:
                raise ValueError("a BGR model with normalisation has no standard image processor to save")
            return MobileViTImageProcessor(size=size, **crop, do_flip_channel_order=True, **common)
        normalise = {"do_normalize": True, "image_mean": list(self.mean), "image_std": list(self.std),
                     "do_convert_rgb": True}
        if self.resize is None:
            return ViTImageProcessor(do_resize=True, size=size, **common, **normalise)
        return BitImageProcessor(do_resize=True, size=size, **crop, **common, **normalise)


def _three(values) -> tuple[float, ...]:
    values = [float(v) for v in (values if isinstance(values, (list, tuple)) else [values])]
    return tuple(values * 3) if len(values) == 1 else tuple(values)


def _processor_geometry(processor) -> tuple[tuple[int, int], int | tuple[int, int] | None]:
    """(input size, resize) of a transformers image processor, as `ImageSpec` holds them."""
    def field(size, key):
        return size.get(key) if isinstance(size, dict) else getattr(size, key, None)

    size = getattr(processor, "size", None) or {}
    shortest, height, width = field(size, "shortest_edge"), field(size, "height"), field(size, "width")
    crop_size = getattr(processor, "crop_size", None)
    crop = ((int(field(crop_size, "height")), int(field(crop_size, "width")))
            if getattr(processor, "do_center_crop", False) and crop_size and field(crop_size, "height") else None)
    crop_pct = getattr(processor, "crop_pct", None)
    if shortest and crop is None and crop_pct:  # ConvNeXt: the shorter edge to S / crop_pct, the centre S x S
        shortest = int(shortest)
        if shortest >= _CONVNEXT_WARP_FROM:
            return (shortest, shortest), None
        return (shortest, shortest), int(shortest / crop_pct)
    if shortest:
        resize = int(shortest / crop_pct) if crop_pct and crop else int(shortest)
    elif height and width:
        resize = (int(height / crop_pct), int(width / crop_pct)) if crop_pct and crop else (int(height), int(width))
    else:
        raise ValueError(f"cannot tell the input size from image processor {type(processor).__name__}")
    # Without a crop, a shorter-edge resize gives images of many shapes: the centre square is the input.
    size = crop or (resize if isinstance(resize, tuple) else (resize, resize))
    return size, None if resize == size else resize


# ---------------------------------------------------------------- per batch, on the device


def resize_batch(images: torch.Tensor, size: tuple[int, int], interpolation: str) -> torch.Tensor:
    """Resize a NCHW batch (uint8 or float); a no-op when it already has the size."""
    if tuple(images.shape[-2:]) == tuple(size):
        return images
    return tvF.resize(images, list(size), interpolation=InterpolationMode(interpolation), antialias=True)


def fit_to_spec(images: torch.Tensor, spec: ImageSpec, squash: bool = False) -> torch.Tensor:
    """A NCHW batch of one size (uint8, or float on the 0-255 scale) as the model's image processor makes it:
    resized, then its centre cut out at the input size (zero-padded where the image is smaller, as
    transformers' centre crop does). `squash`: the whole image resized to the input size, no centre cut
    (a random-resized crop in training, data/augmentation.py)."""
    target = spec.size if squash else spec.resized_size(*images.shape[-2:])
    images = resize_batch(images, target, spec.interpolation)
    height, width = images.shape[-2:]
    crop_height, crop_width = spec.size
    if (height, width) == (crop_height, crop_width):
        return images
    if crop_height > height or crop_width > width:
        pad_h, pad_w = max(0, crop_height - height), max(0, crop_width - width)
        images = tvF.pad(images, [pad_w // 2, pad_h // 2, (pad_w + 1) // 2, (pad_h + 1) // 2], fill=0)
        height, width = images.shape[-2:]
    top, left = (height - crop_height) // 2, (width - crop_width) // 2  # transformers' centre (rounded down)
    return images[..., top:top + crop_height, left:left + crop_width]


class ToModelInput:
    """uint8 (or float on the 0-255 scale) NCHW batch -> the float32 input of one model.

    The same operations, in the same order, as the saved image processor: resize and centre crop
    (`fit_to_spec`; skipped for a batch the collator already fitted), then rescale and normalise
    fused as ``(x - 255 * mean) / (255 * std)``, then the channel order.
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

    def __call__(self, images: torch.Tensor, fitted: bool = False, squash: bool = False) -> torch.Tensor:
        """`fitted`: the images are this model's view already (a mixed-size batch, `UInt8Collator`);
        `squash`: resized whole to the input, without the centre crop (`fit_to_spec`)."""
        # Batches arrive channels-last (see UInt8Collator), where the uint8 resize is twice as fast on
        # the CPU; the result is the same. The float copy writes the layout the model wants.
        if not fitted:
            images = fit_to_spec(images, self.spec, squash)
        mean, std = self._mean_std(images.device)
        layout = torch.channels_last if self.channels_last else torch.contiguous_format
        x = torch.empty(images.shape, dtype=torch.float32, device=images.device, memory_format=layout)
        x.copy_(images)
        x = tvF.normalize(x, mean, std, inplace=True)  # in place, as the processor does: the same values
        if self.spec.bgr:  # RGB -> BGR, after the rescale, as MobileViT's processor does
            x = x.flip(1).contiguous(memory_format=layout)
        return x
