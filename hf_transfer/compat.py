"""Compatibility: every place the project relies on, or works around, an internal of a library.

Each entry says which versions it was written for, why it exists and, where there is one, the
upstream issue. `tests/test_compat.py` has a canary per entry that fails when the library's
behaviour changes: then the workaround may be obsolete (or broken) and this is the one place to
look. Versions checked: transformers 5.24, accelerate 1.15, torch 2.14, datasets 5.2, timm 1.0.31,
wandb 0.31.

Overridden private methods of `transformers.Trainer` (they live in `TransferTrainer`, which
cannot avoid them; their canaries are here too):
- `_prepare_inputs(inputs)`: the one hook the Trainer calls for every batch of training and
  evaluation; the uint8 batch becomes the model's input there (transformers 4.x-5.x).
- `_load_from_checkpoint`, `_load_best_model`: see `load_checkpoint_weights` below.
- `_push_from_checkpoint(checkpoint_folder)`: called by `_save_checkpoint` to push during training
  (hub strategies other than end); replaced so that the Trainer's pickled arguments and card never
  reach the repository (transformers 5.x).

Overridden private method of `transformers.HfArgumentParser` (in `arguments.ArgumentParser`):
- `_parse_dataclass_field(parser, field)`: see `field_for_argparse` below.

Library behaviour worked around without touching internals (canaries in the same test file):
- transformers 5.x `PrinterCallback` (used with --disable_tqdm) pops `total_flos` from the very
  metrics dict `train()` returns; `workflow.train_and_evaluate` reads it from the Trainer's state.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from types import MappingProxyType

import torch
from torch import nn
from transformers import PreTrainedModel


def load_checkpoint_weights(model: PreTrainedModel, checkpoint: str) -> bool:
    """Load a Trainer checkpoint's weights into `model` the way `from_pretrained` reads them.

    transformers 5.0-5.24: models with renamed layers (ViT among them) are saved under their
    original key names and renamed by `from_pretrained`; the Trainer's resume and load-best-model
    paths call `load_state_dict(strict=False)` on the saved keys and silently skip those layers (a
    resumed ViT restarted its blocks from the pretrained weights). huggingface/transformers#43701,
    #48805. Returns False for what this cannot load (sharded or multi-file checkpoints), which
    keep the Trainer's own path.
    """
    if not os.path.isfile(os.path.join(checkpoint, "model.safetensors")):
        return False
    loaded = type(model).from_pretrained(checkpoint)
    model.load_state_dict(loaded.state_dict(), strict=True)
    return True


def drop_timm_pretrained_cfg(config) -> None:
    """Make the saved image processor the one source of preprocessing for timm checkpoints.

    transformers 5.x, TimmWrapper: for a local directory whose config.json holds a timm
    `pretrained_cfg`, AutoImageProcessor builds timm's own transforms from it and ignores the
    preprocessor_config.json beside it (a Hub copy of the same directory uses the latter).
    Without `pretrained_cfg` both load the standard processor the run saved.
    """
    if config.model_type == "timm_wrapper" and hasattr(config, "pretrained_cfg"):
        del config.pretrained_cfg


def set_timm_label_names(config, label_names: list[str]) -> None:
    """transformers 5.x: TimmWrapperConfig saves `label_names` and prefers an old value over
    `id2label` when loading, so a new head's names must be written there too."""
    if config.model_type == "timm_wrapper":
        config.label_names = list(label_names)


# The units FSDP shards one by one: ViT blocks and ResNet residual stages (transformers) or blocks (timm).
FSDP_UNITS = ("ViTLayer", "ViTEmbeddings", "Block", "ResNetStage", "BasicBlock", "Bottleneck")


def set_fsdp_units(model: PreTrainedModel) -> None:
    """Tell accelerate's FSDP auto-wrap which blocks to shard, through the model's `_no_split_modules`.

    accelerate 1.x reads the private `_no_split_modules`; TimmWrapper (transformers 5.x) names a
    class its timm model does not contain, and transformers' ResNet names single convolutions, so
    FSDP would fail or shard too finely. Set on the instance, for this model only.
    """
    present = sorted({type(m).__name__ for m in model.modules()} & set(FSDP_UNITS))
    if present:
        model._no_split_modules = present


def is_batch_norm(module: nn.Module) -> bool:
    """Every BatchNorm flavour (1d/2d/3d, SyncBatchNorm, lazy ones): torch's private common base."""
    return isinstance(module, nn.modules.batchnorm._BatchNorm)


def deepspeed_dtype(accelerator) -> torch.dtype:
    """The dtype DeepSpeed holds the weights in (accelerate 1.x keeps it on the plugin's private
    HF config); unlike autocast, DeepSpeed does not cast inputs, so batches must match it."""
    return accelerator.state.deepspeed_plugin.hf_ds_config.dtype()


def accelerate_launch_keys() -> set[str]:
    """The option names `accelerate launch` knows, from its argparse parser's private `_actions`
    (accelerate 1.x): config keys outside this set are silently ignored by accelerate."""
    from accelerate.commands.launch import launch_command_parser

    return {action.dest for action in launch_command_parser()._actions}


def dataset_fingerprint(dataset) -> str:
    """datasets 2.x-5.x: the private `_fingerprint`, a hash of a data set's content and of every
    transform applied to it; the public API has no equivalent."""
    return dataset._fingerprint


def wandb_has_credentials() -> bool:
    """Whether wandb would find credentials on its own: WANDB_API_KEY, WANDB_IDENTITY_TOKEN_FILE, the
    netrc file (NETRC), or its settings file. wandb 0.31 exposes that lookup in `wandb.sdk.lib.wbauth`;
    asking it (without prompting or storing anything) avoids re-implementing its rules."""
    from wandb.sdk import wandb_setup
    from wandb.sdk.lib import wbauth

    # The lookup reads wandb's process-wide settings, creating them if needed; settings created here would
    # freeze the environment of this moment (WANDB_MODE, say) for a later wandb.init, so they are dropped.
    existed = wandb_setup._singleton is not None
    try:
        host = wandb_setup.singleton().settings.base_url
        return wbauth.authenticate_session(host=host, source="hf-vision-transfer", prompt=False,
                                           update_session=False) is not None
    finally:
        if not existed:
            wandb_setup.teardown()


# Field metadata of the project's own (run_args.py reads "shapes"), which argparse does not know.
PROJECT_FIELD_METADATA = ("shapes",)


def field_for_argparse(field: dataclasses.Field) -> dataclasses.Field:
    """transformers 4.x-5.24: `HfArgumentParser._parse_dataclass_field` passes every metadata key it does not
    use itself to argparse's `add_argument`, which refuses unknown ones; a copy without the project's keys."""
    if not any(key in field.metadata for key in PROJECT_FIELD_METADATA):
        return field
    field = copy.copy(field)
    field.metadata = MappingProxyType({k: v for k, v in field.metadata.items() if k not in PROJECT_FIELD_METADATA})
    return field


def go_offline() -> None:
    """What HF_HUB_OFFLINE=1 does, decided after import: huggingface_hub 1.x-2.4 (whose `is_offline_mode`,
    also used by transformers 5.x, reads `constants.HF_HUB_OFFLINE`) and datasets 3.x-5.2 (`config.HF_HUB_OFFLINE`)
    read the variable once, when they are imported; the environment variable is set for child processes."""
    import datasets.config
    from huggingface_hub import constants

    os.environ["HF_HUB_OFFLINE"] = "1"
    constants.HF_HUB_OFFLINE = True
    datasets.config.HF_HUB_OFFLINE = datasets.config.HF_DATASETS_OFFLINE = True
