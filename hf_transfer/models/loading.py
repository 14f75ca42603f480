"""Loading: any image-classification checkpoint, with a head for the data set's labels and its input spec.

Two checkpoint formats load through the same `AutoModelForImageClassification` call:
transformers-native ones (ViT, ResNet, ConvNeXt, ...) and timm ones wrapped by
`TimmWrapperForImageClassification` (`timm/...` on the Hub). Either way the result is a
plain transformers model that saves, loads, pushes and runs in `pipeline`.
"""

from __future__ import annotations

import logging
import math
import pickle
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModelForImageClassification,
    ImageProcessingMixin,
    PreTrainedModel,
)

from ..errors import UserError, check_local_path, wrap_load_error
from ..integrations.compat import (
    HeldLoadReport,
    drop_timm_pretrained_cfg,
    set_fsdp_units,
    set_timm_label_names,
)
from ..integrations.hub import check_hub_reachable
from ..on_device.preprocessing import ImageSpec
from ..tasks.calibration import TEMPERATURE_KEY, unfold_temperature
from .presets import PRESETS
from .structure import classifier_head, classifier_linears

logger = logging.getLogger(__name__)


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
    crop_pct: float | None = None,
    revision: str | None = None,
    trust_remote_code: bool = False,
    cache_dir: str | None = None,
    drop_path_rate: float | None = None,
    problem_type: str = "single_label_classification",
    family: str | None = None,
) -> LoadedModel:
    """Load `source` with a classification head for `label_names` and the input spec it expects; `problem_type`:
    the data set's task (tasks/classification.py), which `pipeline` reads to return a softmax or per-label sigmoid
    scores; `family`: the model's, where the run's configuration knows it already (else judged from the model)."""
    hub_kwargs = {"revision": revision, "trust_remote_code": trust_remote_code, "cache_dir": cache_dir}
    config, spec = _config_and_spec(source, from_scratch, hub_kwargs, "--model_name_or_path")
    old_names = [config.id2label[i] for i in sorted(config.id2label)] if config.id2label else []

    labels = {
        "num_labels": len(label_names),
        "id2label": dict(enumerate(label_names)),
        "label2id": {name: i for i, name in enumerate(label_names)},
        **_drop_path(config, drop_path_rate),
    }
    if from_scratch:
        for key, value in labels.items():
            setattr(config, key, value)
        model = AutoModelForImageClassification.from_config(config, trust_remote_code=trust_remote_code)
        head_reset = True
    else:
        if config.model_type != "timm_wrapper":
            del labels["num_labels"]  # implied by id2label; TimmWrapperConfig alone needs it spelled out
        with HeldLoadReport() as report:
            model, loading = _from_pretrained("model", source, ignore_mismatched_sizes=True, output_loading_info=True,
                                              **labels, **hub_kwargs)
        if _outside_the_head(model, loading):  # a new head alone is said in one line below, not in a table
            report.show()
        head_reset = old_names != list(label_names)
        if head_reset and len(old_names) == len(label_names):
            # Same number of classes, other names: the weights load without a size mismatch,
            # so the old head would silently be reused for the new classes. Start it afresh.
            for module in classifier_head(model).modules():
                if isinstance(module, nn.Linear):
                    module.reset_parameters()
        if head_reset:
            logger.info("new classification head for %d labels (checkpoint had %d)", len(label_names), len(old_names))

    set_timm_label_names(model.config, label_names)
    # Said here, the Trainer's loss does not have to find it out and write it into the config at the first
    # step, which would make torch.compile compile twice.
    model.config.problem_type = problem_type
    if image_size is not None and (image_size,) * 2 != spec.size:
        model = set_input_size(model, image_size)
        spec = spec.with_size(image_size)
    if crop_pct is not None:
        spec = spec.with_crop_pct(crop_pct)
    set_fsdp_units(model)
    drop_timm_pretrained_cfg(model.config)
    return LoadedModel(model=model, spec=spec, family=family or model_family(model), source=source,
                       head_reset=head_reset)


def _outside_the_head(model: PreTrainedModel, loading: dict) -> set[str]:
    """The weights `from_pretrained` reported as missing, unexpected or of another size, but for the head's."""
    head = {id(p) for p in classifier_head(model).parameters()}
    head_names = {name for name, p in model.named_parameters() if id(p) in head}
    reported = {*loading["missing_keys"], *loading["unexpected_keys"], *(key for key, *_ in loading["mismatched_keys"])}
    return reported - head_names


def _drop_path(config, rate: float | None) -> dict:
    """The config change that turns on stochastic depth at `rate` (timm: a model argument; transformers: the
    config's own `drop_path_rate`), or a one-line refusal for models without it."""
    if rate is None:
        return {}
    if config.model_type == "timm_wrapper":
        return {"model_args": {**(getattr(config, "model_args", None) or {}), "drop_path_rate": rate}}
    if hasattr(config, "drop_path_rate"):
        return {"drop_path_rate": rate}
    raise UserError(f"--drop_path_rate: {config.model_type} models have no stochastic depth in transformers; "
                    "timm checkpoints (timm/..., e.g. --model vit-tiny or resnet50) and ConvNeXt, Swin, BEiT have it")


def load_teacher(source: str, label_names: list[str], *, revision: str | None = None,
                 trust_remote_code: bool = False, cache_dir: str | None = None,
                 problem_type: str = "single_label_classification") -> LoadedModel:
    """A fine-tuned classifier to distil from: frozen, in eval mode, with the data set's labels."""
    hub_kwargs = {"revision": revision, "trust_remote_code": trust_remote_code, "cache_dir": cache_dir}
    config, spec = _config_and_spec(source, False, hub_kwargs, "--teacher_model_name_or_path", what="teacher")
    names = [config.id2label[i] for i in sorted(config.id2label)]
    several = getattr(config, "problem_type", None) == "multi_label_classification"
    if several != (problem_type == "multi_label_classification"):
        raise UserError(f"the teacher was trained for {'several labels' if several else 'one class'} per image and "
                        f"the data set has {'one class' if several else 'several labels'} per image; use a teacher "
                        "trained for the same task")
    if names != list(label_names):
        raise UserError(
            f"the teacher's labels do not match the data set's: teacher has {len(names)} ({_preview(names)}), "
            f"data set has {len(label_names)} ({_preview(label_names)}); use a teacher fine-tuned on these labels"
        )
    model = _from_pretrained("teacher", source, **hub_kwargs)
    model.eval().requires_grad_(False)
    uncalibrate(model)
    return LoadedModel(model=model, spec=spec, family=model_family(model), source=source, head_reset=False)


def uncalibrate(model: PreTrainedModel) -> None:
    """A teacher whose classifier was divided by a calibration temperature (run/calibration.py) multiplied back: it
    teaches with the logits it had when it finished training, so that --temperature and --alpha mean what they meant
    before calibration, and a student learns the same targets from it (docs/calibration.md). Several labels per
    image: its decision threshold, chosen on the calibrated scores, becomes the same decision on the logits restored
    (sigmoid(z / T) >= t  <=>  sigmoid(z) >= sigmoid(T * logit(t)))."""
    temperature = getattr(model.config, TEMPERATURE_KEY, None)
    if temperature is None:
        return
    linears, why_not = classifier_linears(model)
    if why_not:  # a fold this project made found these layers; another model's config claims what it cannot be
        raise UserError(f"the teacher's config.json records a calibration temperature ({temperature}) but {why_not}; "
                        f"remove '{TEMPERATURE_KEY}' from it or use the model the run saved")
    unfold_temperature(linears, float(temperature))
    threshold = getattr(model.config, "multi_label_threshold", None)
    if threshold is not None and 0 < threshold < 1:
        model.config.multi_label_threshold = float(1 / (1 + math.exp(-temperature * math.log(threshold / (1 - threshold)))))
    delattr(model.config, TEMPERATURE_KEY)
    logger.info("teacher: calibration temperature %.3f multiplied back into its classifier", temperature)


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


def _config_and_spec(source: str, from_scratch: bool, hub_kwargs: dict, flag: str = "--model_name_or_path",
                     what: str = "model"):
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

    check_local_path(flag, source)
    if not Path(source).is_dir():
        check_hub_reachable()
    try:
        config = AutoConfig.from_pretrained(source, **hub_kwargs)
    except (OSError, ValueError) as exc:
        raise wrap_load_error(f"{what} config", source, exc) from exc
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
    # preprocessing it was trained with; a timm Hub checkpoint carries only `pretrained_cfg`. Only a saved one is
    # loaded: for the other, AutoImageProcessor would build TimmWrapperImageProcessor, which has no torchvision
    # version, and warn "Requested torchvision backend is not available" although torchvision is installed.
    try:
        saved, _ = ImageProcessingMixin.get_image_processor_dict(source, **hub_kwargs)
    except (OSError, ValueError):
        saved = {}
    if saved.get("image_processor_type", "TimmWrapperImageProcessor") != "TimmWrapperImageProcessor":
        return ImageSpec.from_image_processor(AutoImageProcessor.from_pretrained(source, **hub_kwargs))
    pretrained_cfg = getattr(config, "pretrained_cfg", None)
    if not pretrained_cfg:
        import timm

        pretrained_cfg = timm.get_pretrained_cfg(config.architecture).to_dict()
    return ImageSpec.from_timm_config(pretrained_cfg)


def checkpoint_family(source: str, *, from_scratch: bool = False, revision: str | None = None,
                      trust_remote_code: bool = False, cache_dir: str | None = None) -> str:
    """The family of a checkpoint from its config alone: the architecture is built on the meta
    device (no weights, no memory) and judged by `model_family`. Cheap enough to run before the
    arguments are parsed, so that the family's recipe can be their defaults."""
    config, _ = _config_and_spec(source, from_scratch, {"revision": revision, "trust_remote_code": trust_remote_code,
                                                        "cache_dir": cache_dir})
    with torch.device("meta"):
        model = AutoModelForImageClassification.from_config(config, trust_remote_code=trust_remote_code)
    return model_family(model)


def model_family(model: nn.Module) -> str:
    """'vit' when the network has attention layers, else 'cnn' (decides the default recipe)."""
    return "vit" if any("attention" in type(m).__name__.lower() for m in model.modules()) else "cnn"


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
