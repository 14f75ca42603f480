"""Preprocessing facts come from the checkpoint, and the device path equals the saved processor."""

import numpy as np
import PIL.Image
import pytest
import skimage.data as skimage_data
import timm
import torch
from helpers import random_images
from transformers import (
    AutoImageProcessor,
    BitImageProcessor,
    ConvNextImageProcessor,
    EfficientNetImageProcessor,
    MobileViTImageProcessor,
    ViTImageProcessor,
)

from hf_transfer.data.decoding import decode_rgb
from hf_transfer.data.samples import UInt8Collator
from hf_transfer.models.loading import load_model
from hf_transfer.on_device.preprocessing import ImageSpec, ToModelInput, resize_batch


def test_spec_from_vit_processor():
    spec = ImageSpec.from_image_processor(ViTImageProcessor())
    assert spec == ImageSpec(size=(224, 224), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), interpolation="bilinear")


def test_spec_from_shortest_edge_processor():
    processor = ConvNextImageProcessor(size={"shortest_edge": 224}, resample=3, image_mean=[0.485, 0.456, 0.406],
                                       image_std=[0.229, 0.224, 0.225])
    spec = ImageSpec.from_image_processor(processor)
    assert spec.size == (224, 224) and spec.interpolation == "bicubic"
    assert spec.resize == 256  # crop_pct 0.875: the shorter edge to 256, then the centre 224 x 224
    assert spec.mean == pytest.approx((0.485, 0.456, 0.406))
    assert ImageSpec.from_image_processor(ConvNextImageProcessor(size={"shortest_edge": 384})).resize is None  # warped


def test_rescale_factor_and_offset_fold_into_mean_and_std():
    """EfficientNet's processor: x / 127.5 - 1, then divided by its std (include_top): mean 0.5 and std 0.5 x std
    on the [0, 1] scale."""
    processor = EfficientNetImageProcessor(size={"height": 32, "width": 32}, rescale_factor=1 / 127.5,
                                           rescale_offset=True, do_normalize=False, image_std=[0.25, 0.5, 1.0])
    spec = ImageSpec.from_image_processor(processor)
    assert spec.mean == pytest.approx((0.5,) * 3) and spec.std == pytest.approx((0.125, 0.25, 0.5))
    images = mixed_size_images()
    expected = processor(images, return_tensors="pt")["pixel_values"]
    got = torch.stack([ToModelInput(spec)(decode_rgb(image)[None])[0] for image in images])
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def mixed_size_images() -> list:
    """Photographs of several sizes and aspect ratios, wide and tall (odd margins included)."""
    photo = skimage_data.astronaut()  # 512 x 512 RGB
    return [PIL.Image.fromarray(photo[top:top + h, left:left + w])
            for top, left, h, w in ((0, 0, 300, 420), (40, 100, 257, 181), (100, 30, 96, 97), (7, 3, 61, 150))]


# The checkpoint's own processor: transformers ViT (squash), ConvNeXt/ResNet (crop_pct), BiT (shortest edge and crop
# size), MobileViT (BGR, no normalisation).
PROCESSORS = {
    "vit": lambda: ViTImageProcessor(size={"height": 48, "width": 48}),
    "convnext": lambda: ConvNextImageProcessor(size={"shortest_edge": 48}, crop_pct=0.875, resample=3,
                                               image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]),
    "bit": lambda: BitImageProcessor(size={"shortest_edge": 56}, crop_size={"height": 48, "width": 48}),
    "mobilevit-bgr": lambda: MobileViTImageProcessor(size={"shortest_edge": 56}, crop_size={"height": 48, "width": 48}),
}


@pytest.mark.parametrize("name", list(PROCESSORS))
def test_evaluation_input_is_the_checkpoints_processor_output(tmp_path, name):
    """Non-square images of several sizes, one at a time (the collator's path for a mixed-size batch) and as a
    batch of one size (the device path): what the project feeds the model equals the checkpoint's own processor
    within 1/255 of a pixel, and so does the processor the project saves with the trained model."""
    processor = PROCESSORS[name]()
    spec = ImageSpec.from_image_processor(processor)
    assert spec.bgr == (name == "mobilevit-bgr")
    images = mixed_size_images()
    expected = processor(images, return_tensors="pt")["pixel_values"]
    pixel = 1 / 255 / torch.tensor(spec.std).view(1, 3, 1, 1) + 1e-5  # 1/255 of a pixel, after normalisation
    collate = UInt8Collator(spec)
    batch = collate([{"pixel_values": decode_rgb(image), "labels": 0, "row_index": i} for i, image in enumerate(images)])
    got = ToModelInput(spec)(batch["pixel_values"], fitted=bool(batch["fitted"]))
    assert got.shape == expected.shape and ((got - expected).abs() <= pixel).all()
    one_size = torch.stack([decode_rgb(images[0])] * 2)  # the device path: resize and crop a whole batch
    expected_one = processor([images[0]] * 2, return_tensors="pt")["pixel_values"]
    assert ((ToModelInput(spec)(one_size) - expected_one).abs() <= pixel).all()

    spec.to_image_processor().save_pretrained(tmp_path)
    saved = AutoImageProcessor.from_pretrained(tmp_path)  # what pipeline() will load with the trained model
    torch.testing.assert_close(saved(images, return_tensors="pt")["pixel_values"], got, rtol=0, atol=1e-5)


def test_crop_pct_replaces_the_checkpoints_geometry(tmp_path, tiny_vit):
    """--crop_pct 1.0 on a checkpoint that squashes: the shorter edge to the input size, the centre cut out, in
    training, evaluation and the saved processor alike."""
    spec = load_model(tiny_vit, ["a", "b", "c"], crop_pct=1.0).spec
    assert spec.resize == spec.size[0] == 32
    images = mixed_size_images()
    expected = BitImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, resample=2,
                                 image_mean=[0.5] * 3, image_std=[0.5] * 3)(images, return_tensors="pt")["pixel_values"]
    got = torch.stack([ToModelInput(spec)(decode_rgb(image)[None])[0] for image in images])
    assert ((got - expected).abs() <= 1 / 255 / 0.5 + 1e-5).all()
    spec.to_image_processor().save_pretrained(tmp_path)
    torch.testing.assert_close(AutoImageProcessor.from_pretrained(tmp_path)(images, return_tensors="pt")["pixel_values"],
                               got, rtol=0, atol=1e-5)
    assert ImageSpec.from_image_processor(PROCESSORS["convnext"]()).with_crop_pct(0.8).resize == 60


def test_timm_evaluation_geometry():
    """timm's evaluation transform: the shorter edge to input / crop_pct, then the centre crop; the same pixels
    within 1/255. Where the margin is odd, timm rounds the centre's offset to the nearest even number and
    transformers down (as the processor saved with the model does): the crop may sit a pixel left of or above
    timm's."""
    cfg = {**timm.get_pretrained_cfg("resnet18.a1_in1k").to_dict(), "input_size": (3, 48, 48), "crop_pct": 0.8}
    spec = ImageSpec.from_timm_config(cfg)
    assert spec.resize == 60 and spec.size == (48, 48)
    timm_eval = timm.data.create_transform(**timm.data.resolve_data_config(pretrained_cfg=cfg), is_training=False)
    std, shifts = torch.tensor(spec.std).view(3, 1, 1), []
    for image in mixed_size_images():
        stored = decode_rgb(image)[None]
        height, width = spec.resized_size(*stored.shape[-2:])
        top, left = round((height - 48) / 2), round((width - 48) / 2)  # timm's (torchvision's) centre
        resized = resize_batch(stored, (height, width), spec.interpolation)
        timm_crop = ToModelInput(spec)(resized[..., top:top + 48, left:left + 48], fitted=True)[0]
        assert ((timm_crop - timm_eval(image)) * std).abs().max() <= 1 / 255 + 1e-6  # same resize, same pixels
        shifted = (top, left) != ((height - 48) // 2, (width - 48) // 2)
        shifts.append(shifted)
        assert torch.equal(ToModelInput(spec)(stored)[0], timm_crop) == (not shifted)
    assert any(shifts) and not all(shifts)  # both cases were seen
    squash = ImageSpec.from_timm_config({**cfg, "crop_mode": "squash"})
    assert squash.resize == (60, 60)


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


def test_random_resized_crop_is_square_at_the_stored_resolution_and_seeded():
    from hf_transfer.data.augmentation import Augmentation

    image = torch.from_numpy(np.asarray(skimage_data.astronaut()[:60, :90])).permute(2, 0, 1).contiguous()
    rrc = Augmentation("rrc")
    views = [rrc(image, seed) for seed in (1, 1, 2)]
    assert all(view.shape == (3, 60, 60) for view in views)  # square at the shorter edge
    assert torch.equal(views[0], views[1]) and not torch.equal(views[0], views[2])  # the image's seed decides
    assert rrc.squash and not rrc.batched and not Augmentation("basic").squash


def test_random_resized_crops_are_resized_whole_by_each_model_in_its_own_view():
    """Each model makes its input from the crop at the stored resolution, resized whole (no evaluation centre
    crop): the student's and the teacher's pictures are the same region, neither made from the other's."""
    crops = [torch.from_numpy(np.asarray(im)).permute(2, 0, 1).contiguous() for im in random_images(3, size=40)]
    crops[1] = crops[1][:, :30, :30]  # mixed sizes, as random-resized crops of photos of several sizes are
    student = ImageSpec(size=(16, 16), mean=(0.5,) * 3, std=(0.5,) * 3, resize=18)  # crop_pct 0.875
    teacher = ImageSpec(size=(32, 32), mean=(0.5,) * 3, std=(0.5,) * 3, resize=36)
    samples = [{"pixel_values": c, "labels": 0, "row_index": i, "squash": True} for i, c in enumerate(crops)]
    batch = UInt8Collator(student).with_view("teacher", teacher)(samples)
    assert bool(batch["squash"]) and bool(batch["fitted"])
    for i, crop in enumerate(crops):
        assert torch.equal(batch["pixel_values"][i], resize_batch(crop[None], (16, 16), "bilinear")[0])
        assert torch.equal(batch["view_teacher"][i], resize_batch(crop[None], (32, 32), "bilinear")[0])
    # one size: the device does the same, batched
    same = torch.stack([crops[0], crops[2]])
    assert torch.equal(ToModelInput(student)(same, squash=True),
                       ToModelInput(student)(resize_batch(same, (16, 16), "bilinear"), fitted=True))
    assert not torch.equal(ToModelInput(student)(same, squash=True), ToModelInput(student)(same))
