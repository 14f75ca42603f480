"""Decoding: one stored image (PIL, or a datasets `{"bytes", "path"}` cell) to a uint8 RGB tensor, on the CPU."""

from __future__ import annotations

import io

import numpy as np
import PIL.Image
import torch
from transformers.image_transforms import convert_to_rgb


def decode_rgb(value) -> torch.Tensor:
    """Decode one image (PIL image, or a datasets `{"bytes", "path"}` dict) to a uint8 CHW RGB tensor.

    Alpha is composited on white and palette/grayscale images become RGB, with the same
    function the saved image processor uses, so training and inference see the same pixels.
    """
    if isinstance(value, dict):
        source = io.BytesIO(value["bytes"]) if value.get("bytes") is not None else value.get("path")
        if source is None:
            raise ValueError("empty image cell (no bytes and no path)")
        with PIL.Image.open(source) as image:
            image.load()
            array = _to_rgb_array(image)
    elif isinstance(value, PIL.Image.Image):
        array = _to_rgb_array(value)
    else:
        raise ValueError(f"not an image: {type(value).__name__}")
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(f"image has size {array.shape[1]}x{array.shape[0]}")
    return torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1).contiguous()


def _to_rgb_array(image: PIL.Image.Image) -> np.ndarray:
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16-bit and float images: PIL's RGB conversion clips them to 8 bits; scale the range instead.
        array = np.asarray(image, dtype=np.float64)
        high = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        image = PIL.Image.fromarray(np.clip(array * (255.0 / high), 0, 255).round().astype(np.uint8))
    return convert_to_rgb(image, return_numpy=True)
