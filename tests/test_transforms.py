"""Preprocessing facts come from the checkpoint, and the device path equals the saved processor."""

import numpy as np
import pytest
import timm
import torch
from helpers import random_images
from transformers import AutoImageProcessor, ConvNextImageProcessor, ViTImageProcessor

from hf_transfer.data.decoding import decode_rgb
from hf_transfer.on_device.preprocessing import ImageSpec, ToModelInput


def test_spec_from_vit_processor():
    spec = ImageSpec.from_image_processor(ViTImageProcessor())
    assert spec == ImageSpec(size=(224, 224), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), interpolation="bilinear")


def test_spec_from_shortest_edge_processor():
    processor = ConvNextImageProcessor(size={"shortest_edge": 224}, resample=3, image_mean=[0.485, 0.456, 0.406],
                                       image_std=[0.229, 0.224, 0.225])
    spec = ImageSpec.from_image_processor(processor)
    assert spec.size == (224, 224) and spec.interpolation == "bicubic"
    assert spec.mean == pytest.approx((0.485, 0.456, 0.406))


def test_spec_from_timm_pretrained_cfg():
    cfg = timm.get_pretrained_cfg("resnet50.tv_in1k").to_dict()
    spec = ImageSpec.from_timm_config(cfg)
    assert spec.size == tuple(cfg["input_size"][1:])
    assert spec.mean == pytest.approx(cfg["mean"]) and spec.std == pytest.approx(cfg["std"])
    assert spec.interpolation == cfg["interpolation"]


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
@pytest.mark.parametrize("size", [32, 56])
def test_device_path_equals_saved_processor(tmp_path, interpolation, size):
    spec = ImageSpec(size=(size, size), mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
                     interpolation=interpolation)
    spec.to_image_processor().save_pretrained(tmp_path)
    processor = AutoImageProcessor.from_pretrained(tmp_path)  # what pipeline() will load
    images = random_images(5, size=32, seed=3)
    expected = processor(images, return_tensors="pt")["pixel_values"]
    batch = torch.stack([decode_rgb(image) for image in images])
    got = ToModelInput(spec)(batch)
    assert got.dtype == torch.float32 and got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_float_input_on_the_255_scale_matches_uint8():
    spec = ImageSpec(size=(48, 48), mean=(0.5,) * 3, std=(0.25,) * 3)
    batch = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    convert = ToModelInput(spec)
    # float (as after mixup) and uint8 differ only by the rounding of the resize
    assert (convert(batch.float()) - convert(batch)).abs().max() < 4 / (255 * 0.25)


def test_channels_last_output():
    spec = ImageSpec(size=(32, 32), mean=(0.5,) * 3, std=(0.5,) * 3)
    x = ToModelInput(spec, channels_last=True)(torch.zeros(2, 3, 32, 32, dtype=torch.uint8))
    assert x.is_contiguous(memory_format=torch.channels_last)
    assert np.allclose(x.numpy(), -1.0)


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_memory_layout_does_not_change_the_values(interpolation):
    spec = ImageSpec(size=(56, 56), mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), interpolation=interpolation)
    batch = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    nhwc = batch.contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(ToModelInput(spec)(nhwc), ToModelInput(spec)(batch), rtol=0, atol=0)
    assert ToModelInput(spec)(nhwc).is_contiguous()
