"""Presets: the checkpoints `--model` and `--student` name, and why these ones."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import UserError


@dataclass(frozen=True)
class Preset:
    checkpoint: str
    about: str
    family: str  # "cnn" or "vit": what `model_family` says of it, known without a download
    student: bool = False  # fewer parameters than ResNet-18: a model to deploy (docs/export.md: how each quantizes)


# Why these checkpoints (README, "Model presets"):
# - resnet50 uses timm's A1 weights (80.4% ImageNet-1k top-1 at 224 px, "ResNet strikes back",
#   against 76.1% for the torchvision weights the tutorial used); fine-tuning accuracy tracks
#   ImageNet accuracy closely (Kornblith et al. 2019). The tutorial's weights: resnet50-tv.
# - the small ViTs are the AugReg ImageNet-21k checkpoints, the same pretraining data as vit-base.
# - the small CNNs are students smaller than a small teacher (ResNet-18 has 11.7 M parameters): MobileNetV3,
#   EfficientNet-Lite0 (the architecture of the real weights the tests and benchmarks use) and -B0, ResNet-10t.
#   Parameter counts are timm's models with their 1000-class heads. These and ViT-Ti are the `student` presets:
#   each is exported and quantized in a test (tests/test_student_presets.py).
PRESETS: dict[str, Preset] = {
    "resnet18": Preset("timm/resnet18.a1_in1k", "ResNet-18, ImageNet-1k (timm A1 recipe)", "cnn"),
    "resnet34": Preset("timm/resnet34.a1_in1k", "ResNet-34, ImageNet-1k (timm A1 recipe)", "cnn"),
    "resnet50": Preset("timm/resnet50.a1_in1k", "ResNet-50, ImageNet-1k (timm A1 recipe, 80.4% top-1)", "cnn"),
    "resnet50-tv": Preset("timm/resnet50.tv_in1k", "ResNet-50, the torchvision weights the tutorial used", "cnn"),
    "mobilenetv3-small": Preset("timm/mobilenetv3_small_100.lamb_in1k", "MobileNetV3-Small, ImageNet-1k, 2.5 M "
                                "parameters", "cnn", student=True),
    "mobilenetv3-large": Preset("timm/mobilenetv3_large_100.ra_in1k", "MobileNetV3-Large, ImageNet-1k, 5.5 M "
                                "parameters", "cnn", student=True),
    "efficientnet-lite0": Preset("timm/tf_efficientnet_lite0.in1k", "EfficientNet-Lite0, ImageNet-1k (Google), "
                                 "4.7 M parameters", "cnn", student=True),
    "efficientnet-b0": Preset("timm/efficientnet_b0.ra_in1k", "EfficientNet-B0, ImageNet-1k (timm RA recipe), 5.3 M "
                              "parameters", "cnn", student=True),
    "resnet10t": Preset("timm/resnet10t.c3_in1k", "ResNet-10-T, ImageNet-1k, 5.4 M parameters", "cnn", student=True),
    "vit-tiny": Preset("timm/vit_tiny_patch16_224.augreg_in21k", "ViT-Ti/16, ImageNet-21k (AugReg), 5.7 M parameters",
                       "vit", student=True),
    "vit-small": Preset("timm/vit_small_patch16_224.augreg_in21k", "ViT-S/16, ImageNet-21k (AugReg)", "vit"),
    "vit-base": Preset("google/vit-base-patch16-224-in21k", "ViT-B/16, ImageNet-21k (Google)", "vit"),
}
ALIASES = {"vit": "vit-base"}
STUDENTS = tuple(name for name, p in PRESETS.items() if p.student)


def preset_help() -> str:
    lines = [f"{name}: {p.checkpoint} ({p.about})" for name, p in PRESETS.items()]
    lines += [f"{alias}: same as {target}" for alias, target in ALIASES.items()]
    return "; ".join(lines)


def find_preset(model: str | None, model_name_or_path: str | None, default: str = "resnet50") -> Preset | None:
    """The preset the flags name (None when `--model_name_or_path` names the checkpoint)."""
    if model and model_name_or_path:
        raise UserError("pass either --model or --model_name_or_path, not both")
    if model_name_or_path:
        return None
    name = ALIASES.get(model or default, model or default)
    if name not in PRESETS:
        choices = ", ".join([*PRESETS, *ALIASES])
        raise UserError(f"unknown --model '{model}'; choose one of: {choices} (or pass --model_name_or_path)")
    return PRESETS[name]


def resolve_source(model: str | None, model_name_or_path: str | None, default: str = "resnet50") -> str:
    """The checkpoint to start from: a preset's Hub id, or the path/id the user gave."""
    preset = find_preset(model, model_name_or_path, default)
    return preset.checkpoint if preset else model_name_or_path
