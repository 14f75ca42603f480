"""Backbones: the presets, loading any image-classification checkpoint, its head and input size.

Two checkpoint formats load through the same `AutoModelForImageClassification` call:
transformers-native ones (ViT, ResNet, ConvNeXt, ...) and timm ones wrapped by
`TimmWrapperForImageClassification` (`timm/...` on the Hub). Either way the result is a
plain transformers model that saves, loads, pushes and runs in `pipeline`.
"""

from __future__ import annotations

import logging
import pickle
import re
from dataclasses import dataclass

from torch import nn
from transformers import AutoConfig, AutoImageProcessor, AutoModelForImageClassification, PreTrainedModel

from .errors import UserError, wrap_load_error
from .transforms import ImageSpec

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Preset:
    checkpoint: str
    about: str


# Why these checkpoints (README, "Model presets"):
# - resnet50 uses timm's A1 weights (80.4% ImageNet-1k top-1 at 224 px, "ResNet strikes back",
#   against 76.1% for the torchvision weights the tutorial used); fine-tuning accuracy tracks
#   ImageNet accuracy closely (Kornblith et al. 2019). The tutorial's weights: resnet50-tv.
# - the small ViTs are the AugReg ImageNet-21k checkpoints, the same pretraining data as vit-base.
PRESETS: dict[str, Preset] = {
    "resnet18": Preset("timm/resnet18.a1_in1k", "ResNet-18, ImageNet-1k (timm A1 recipe)"),
    "resnet34": Preset("timm/resnet34.a1_in1k", "ResNet-34, ImageNet-1k (timm A1 recipe)"),
    "resnet50": Preset("timm/resnet50.a1_in1k", "ResNet-50, ImageNet-1k (timm A1 recipe, 80.4% top-1)"),
    "resnet50-tv": Preset("timm/resnet50.tv_in1k", "ResNet-50, the torchvision weights the tutorial used"),
    "vit-tiny": Preset("timm/vit_tiny_patch16_224.augreg_in21k", "ViT-Ti/16, ImageNet-21k (AugReg)"),
    "vit-small": Preset("timm/vit_small_patch16_224.augreg_in21k", "ViT-S/16, ImageNet-21k (AugReg)"),
    "vit-base": Preset("google/vit-base-patch16-224-in21k", "ViT-B/16, ImageNet-21k (Google)"),
}
ALIASES = {"vit": "vit-base"}


def preset_help() -> str:
    lines = [f"{name}: {p.checkpoint} ({p.about})" for name, p in PRESETS.items()]
    lines += [f"{alias}: same as {target}" for alias, target in ALIASES.items()]
    return "; ".join(lines)


def resolve_source(model: str | None, model_name_or_path: str | None, default: str = "resnet50") -> str:
    """The checkpoint to start from: a preset's Hub id, or the path/id the user gave."""
    if model_name_or_path:
        return model_name_or_path
    name = ALIASES.get(model or default, model or default)
    if name not in PRESETS:
        choices = ", ".join([*PRESETS, *ALIASES])
        raise UserError(f"unknown --model '{model}'; choose one of: {choices} (or pass --model_name_or_path)")
    return PRESETS[name].checkpoint


@dataclass
class LoadedModel:
    model: PreTrainedModel
    spec: ImageSpec  # the input this model expects, as the run will feed it
    family: str  # "cnn" or "vit": picks the default recipe
    source: str  # the checkpoint it started from
    head_reset: bool  # whether the classification head was (re)initialised for these labels


def load_model(
    source: str,
    label_names: list[str],
    *,
    from_scratch: bool = False,
    image_size: int | None = None,
    revision: str | None = None,
    trust_remote_code: bool = False,
) -> LoadedModel:
    """Load `source` with a classification head for `label_names` and the input spec it expects."""
    hub_kwargs = {"revision": revision, "trust_remote_code": trust_remote_code}
    config, spec = _config_and_spec(source, from_scratch, hub_kwargs)
    old_names = [config.id2label[i] for i in sorted(config.id2label)] if config.id2label else []

    labels = {
        "num_labels": len(label_names),
        "id2label": dict(enumerate(label_names)),
        "label2id": {name: i for i, name in enumerate(label_names)},
    }
    if from_scratch:
        for key, value in labels.items():
            setattr(config, key, value)
        model = AutoModelForImageClassification.from_config(config, trust_remote_code=trust_remote_code)
        head_reset = True
    else:
        if config.model_type != "timm_wrapper":
            del labels["num_labels"]  # implied by id2label; TimmWrapperConfig alone needs it spelled out
        model = _from_pretrained("model", source, ignore_mismatched_sizes=True, **labels, **hub_kwargs)
        head_reset = old_names != list(label_names)
        if head_reset and len(old_names) == len(label_names):
            # Same number of classes, other names: the weights load without a size mismatch,
            # so the old head would silently be reused for the new classes. Start it afresh.
            for module in classifier_head(model).modules():
                if isinstance(module, nn.Linear):
                    module.reset_parameters()
        if head_reset:
            logger.info("new classification head for %d labels (checkpoint had %d)", len(label_names), len(old_names))

    if model.config.model_type == "timm_wrapper":
        # TimmWrapperConfig saves `label_names` and prefers an old value over id2label: keep them in step.
        model.config.label_names = list(label_names)
    if image_size is not None and (image_size,) * 2 != spec.size:
        model = set_input_size(model, image_size)
        spec = spec.with_size(image_size)
    set_fsdp_units(model)
    _drop_timm_preprocessing(model.config)
    return LoadedModel(model=model, spec=spec, family=model_family(model), source=source, head_reset=head_reset)


def load_teacher(source: str, label_names: list[str], *, revision: str | None = None,
                 trust_remote_code: bool = False) -> LoadedModel:
    """A fine-tuned classifier to distil from: frozen, in eval mode, with the data set's labels."""
    hub_kwargs = {"revision": revision, "trust_remote_code": trust_remote_code}
    config, spec = _config_and_spec(source, False, hub_kwargs)
    names = [config.id2label[i] for i in sorted(config.id2label)]
    if names != list(label_names):
        raise UserError(
            f"the teacher's labels do not match the data set's: teacher has {len(names)} ({_preview(names)}), "
            f"data set has {len(label_names)} ({_preview(label_names)}); use a teacher fine-tuned on these labels"
        )
    model = _from_pretrained("teacher", source, **hub_kwargs)
    model.eval().requires_grad_(False)
    return LoadedModel(model=model, spec=spec, family=model_family(model), source=source, head_reset=False)


def _from_pretrained(what: str, source: str, **kwargs) -> PreTrainedModel:
    """Load weights; safetensors, or a .bin only as plain tensors (transformers' weights_only default)."""
    try:
        return AutoModelForImageClassification.from_pretrained(source, **kwargs)
    except pickle.UnpicklingError as exc:
        raise UserError(f"refusing to load the {what} '{source}': its .bin weights hold Python objects that would run "
                        "code when loaded; use a safetensors checkpoint") from exc
    except OSError as exc:
        raise wrap_load_error(what, source, exc) from exc


def _preview(names: list[str], n: int = 4) -> str:
    return ", ".join(names[:n]) + (", ..." if len(names) > n else "")


def _config_and_spec(source: str, from_scratch: bool, hub_kwargs: dict):
    if from_scratch and source.startswith("timm/"):
        # A timm preset: the architecture and its preprocessing are known to timm offline.
        import timm
        from transformers import TimmWrapperConfig

        name = source.removeprefix("timm/")
        try:
            pretrained_cfg = timm.get_pretrained_cfg(name).to_dict()
        except (RuntimeError, AttributeError) as exc:
            raise UserError(f"timm does not know the architecture '{name}'") from exc
        config = TimmWrapperConfig(architecture=name.split(".")[0], pretrained_cfg=pretrained_cfg)
        return config, ImageSpec.from_timm_config(pretrained_cfg)
    if from_scratch and source == PRESETS["vit-base"].checkpoint:
        # The transformers defaults of ViT are exactly this checkpoint's architecture and preprocessing.
        from transformers import ViTConfig, ViTImageProcessor

        return ViTConfig(), ImageSpec.from_image_processor(ViTImageProcessor())

    try:
        config = AutoConfig.from_pretrained(source, **hub_kwargs)
    except (OSError, ValueError) as exc:
        raise wrap_load_error("model config", source, exc) from exc
    if config.model_type == "timm_wrapper":
        return config, _timm_spec(source, config, hub_kwargs)
    try:
        processor = AutoImageProcessor.from_pretrained(source, **hub_kwargs)
    except (OSError, ValueError) as exc:
        raise UserError(
            f"checkpoint '{source}' has no image processor (preprocessor_config.json), so its input size "
            "and normalisation are unknown; add one to the checkpoint directory"
        ) from exc
    return config, ImageSpec.from_image_processor(processor)


def _timm_spec(source: str, config, hub_kwargs: dict) -> ImageSpec:
    # A checkpoint saved by this project carries a standard image processor with the exact
    # preprocessing it was trained with; a timm Hub checkpoint carries only `pretrained_cfg`.
    try:
        processor = AutoImageProcessor.from_pretrained(source, **hub_kwargs)
    except (OSError, ValueError):
        processor = None
    if processor is not None and type(processor).__name__ != "TimmWrapperImageProcessor":
        return ImageSpec.from_image_processor(processor)
    pretrained_cfg = getattr(config, "pretrained_cfg", None)
    if not pretrained_cfg:
        import timm

        pretrained_cfg = timm.get_pretrained_cfg(config.architecture).to_dict()
    return ImageSpec.from_timm_config(pretrained_cfg)


def _drop_timm_preprocessing(config) -> None:
    """Make the saved image processor the one source of preprocessing for timm checkpoints.

    For a local directory whose config.json holds a timm `pretrained_cfg`, AutoImageProcessor
    builds timm's PIL transforms from it and ignores preprocessor_config.json (a Hub copy of
    the same directory uses preprocessor_config.json). Without `pretrained_cfg`, both load the
    standard processor saved beside the model: exactly the preprocessing the run used.
    """
    if config.model_type == "timm_wrapper" and hasattr(config, "pretrained_cfg"):
        del config.pretrained_cfg


# The units FSDP shards one by one: ViT blocks and ResNet residual stages (transformers) or blocks (timm).
FSDP_UNITS = ("ViTLayer", "ViTEmbeddings", "Block", "ResNetStage", "BasicBlock", "Bottleneck")


def set_fsdp_units(model: PreTrainedModel) -> None:
    """Tell accelerate's FSDP auto-wrap (which reads `_no_split_modules`) which blocks to shard.

    TimmWrapper names a class its classification model does not contain, and transformers'
    ResNet names single convolutions; without this, FSDP would fail or shard too finely.
    """
    present = sorted({type(m).__name__ for m in model.modules()} & set(FSDP_UNITS))
    if present:
        model._no_split_modules = present


def model_family(model: nn.Module) -> str:
    """'vit' when the network has attention layers, else 'cnn' (decides the default recipe)."""
    return "vit" if any("attention" in type(m).__name__.lower() for m in model.modules()) else "cnn"


def classifier_head(model: PreTrainedModel) -> nn.Module:
    """The classification head: timm's classifier, or the `classifier` of transformers models."""
    if hasattr(model, "timm_model"):
        return model.timm_model.get_classifier()
    head = getattr(model, "classifier", None)
    if isinstance(head, nn.Module):
        return head
    raise UserError(f"cannot find the classification head of {type(model).__name__}")


def set_input_size(model: PreTrainedModel, size: int) -> PreTrainedModel:
    """Make a model take `size` x `size` inputs; for ViTs this resamples the position embeddings."""
    if size <= 0:
        raise UserError(f"--image_size must be positive, got {size}")
    if hasattr(model, "timm_model"):
        timm_model = model.timm_model
        patch_embed = getattr(timm_model, "patch_embed", None)
        if patch_embed is not None and hasattr(timm_model, "set_input_size"):
            patch = patch_embed.patch_size[0]
            _check_patch_multiple(size, patch)
            timm_model.set_input_size(img_size=(size, size))
            model.config.model_args = {**(model.config.model_args or {}), "img_size": size}
        return model

    config = model.config
    old = getattr(config, "image_size", None)
    patch = getattr(config, "patch_size", None)
    if old is None or patch is None:
        return model  # a CNN: global pooling takes any size
    old = old if isinstance(old, int) else old[0]
    patch = patch if isinstance(patch, int) else patch[0]
    _check_patch_multiple(size, patch)
    from timm.layers import resample_abs_pos_embed

    state = model.state_dict()
    for key, value in state.items():
        if key.endswith("position_embeddings") and value.ndim == 3:
            prefix = value.shape[1] - (old // patch) ** 2
            state[key] = resample_abs_pos_embed(
                value, new_size=[size // patch] * 2, old_size=[old // patch] * 2, num_prefix_tokens=prefix
            )
    config.image_size = size
    resized = type(model)(config)
    resized.load_state_dict(state)
    return resized


def _check_patch_multiple(size: int, patch: int) -> None:
    if size % patch:
        raise UserError(f"--image_size {size} is not a multiple of the model's patch size {patch}")



_BLOCK = re.compile(r"(?:^|\.)(?:layers|layer|stages|blocks)\.(\d+)\.")


def depth_groups(model: PreTrainedModel) -> list[list[str]]:
    """Parameter names grouped by depth, from input to output: [stem, block 1, ..., block n, head].

    Blocks are ResNet stages or ViT layers: timm models say so themselves (`group_matcher`);
    transformers models name them `layers.N` / `layer.N` / `stages.N` / `blocks.N`. Parameters
    after the last block other than the head (a final norm) belong to the last block. Used for
    freezing stages and for layer-wise learning-rate decay.
    """
    head = {name for name, p in model.named_parameters() if any(p is q for q in classifier_head(model).parameters())}
    names = [name for name, _ in model.named_parameters() if name not in head]
    if hasattr(model, "timm_model"):
        from timm.models import group_parameters

        timm_model = model.timm_model
        grouped = group_parameters(timm_model, timm_model.group_matcher(coarse=True))
        groups = [[f"timm_model.{n}" for n in group if f"timm_model.{n}" not in head] for group in grouped.values()]
    else:
        by_block: dict[int, list[str]] = {}
        stem, last = [], None
        for name in names:
            match = _BLOCK.search(name)
            if match:
                last = int(match.group(1))
                by_block.setdefault(last, []).append(name)
            elif last is None:
                stem.append(name)
            else:
                by_block[last].append(name)  # a final norm after the last block
        groups = [stem, *(by_block[i] for i in sorted(by_block))]
    groups = [g for g in groups if g]
    if len(groups) < 3:
        raise UserError(f"cannot find the stages/blocks of {type(model).__name__}: freezing stages and layer-wise "
                        "learning rates support ResNet- and ViT-style backbones")
    return [*groups, sorted(head)]
