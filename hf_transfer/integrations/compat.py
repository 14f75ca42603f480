"""Compatibility: every place the project relies on, or works around, an internal of a library.

Each entry says which versions it was written for, why it exists and, where there is one, the
upstream issue. `tests/test_compat.py` has a canary per entry that fails when the library's
behaviour changes: then the workaround may be obsolete (or broken) and this is the one place to
look. Versions checked: `TESTED` below.

Overridden private methods of `transformers.Trainer` (they live in `TransferTrainer`, which
cannot avoid them; their canaries are here too):
- `_prepare_inputs(inputs)`: the one hook the Trainer calls for every batch of training and
  evaluation; the uint8 batch becomes the model's input there (transformers 4.x-5.x).
- `_load_from_checkpoint`, `_load_best_model`: see `load_checkpoint_weights` below.
- `_push_from_checkpoint(checkpoint_folder)`: called by `_save_checkpoint` to push during training
  (hub strategies other than end); replaced so that the Trainer's pickled arguments and card never
  reach the repository (transformers 5.x).
- `_determine_best_metric(metrics, trial)`: called after each evaluation in training; it replaces the
  best checkpoint only on a strictly better metric, so a tie keeps the first checkpoint that reached the
  value (a saturated metric kept the earliest weights); the override breaks ties (`trainers/selection.py`,
  transformers 5.x).

Overridden private method of `transformers.HfArgumentParser` (in `arguments.ArgumentParser`):
- `_parse_dataclass_field(parser, field)`: see `field_for_argparse` below.

Library behaviour worked around without touching internals (canaries in the same test file):
- transformers 5.x `PrinterCallback` (used with --disable_tqdm) pops `total_flos` from the very
  metrics dict `train()` returns; `run/results.train_and_evaluate` reads it from the Trainer's state.
- transformers 5.x logs a table of the weights that did not load for every new classification head
  (`HeldLoadReport`, used by `models.loading.load_model`, which says it in one line).
- accelerate 1.x imports deepspeed in every run where it is installed, and deepspeed warns on machines
  without an accelerator (`tell_deepspeed_the_accelerator`).

`WORKAROUNDS` lists every entry with the library it depends on and its canary; `TESTED` the
versions they were checked with (the canaries passed). Each command (run_finetune.py, run_distill.py,
`python -m hf_transfer`) says in one line, from its main process, which installed libraries are outside
that range and how to run the canaries (`warn_untested_versions`); the canaries, not the installed
versions, decide whether a workaround still holds. This module imports torch and transformers only in
the functions that need them, so that the commands can check the versions before importing them.
When the canaries pass on newer releases, widen `TESTED` and regenerate the flag list the commands
check before those imports (`python -m hf_transfer.cli.command_line`).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
from importlib.metadata import PackageNotFoundError, version
from types import MappingProxyType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
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


class HeldLoadReport(logging.Filter):
    """transformers 5.x logs a table of every weight `from_pretrained` did not load as it was saved ("<Model> LOAD
    REPORT", one warning of the `transformers.modeling_utils` logger), a new head's too. Held back while attached
    to that logger; `show()` logs what was held, for the caller that finds more than the head in it."""

    LOGGER = "transformers.modeling_utils"

    def __init__(self):
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if "LOAD REPORT" in record.getMessage():
            self.records.append(record)
            return False
        return True

    def __enter__(self) -> HeldLoadReport:
        logging.getLogger(self.LOGGER).addFilter(self)
        return self

    def __exit__(self, *exc) -> None:
        logging.getLogger(self.LOGGER).removeFilter(self)

    def show(self) -> None:
        for record in self.records:
            logging.getLogger(record.name).handle(record)


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


# The units FSDP shards one by one: ViT blocks and ResNet residual stages (transformers) or blocks (timm). Not the
# ViT's embeddings: accelerate 1.15 gives the input embeddings (the patch projection inside them) a unit of their own,
# and `fully_shard` fails on parameters another unit has already sharded.
FSDP_UNITS = ("ViTLayer", "Block", "ResNetStage", "BasicBlock", "Bottleneck")


def set_fsdp_units(model: PreTrainedModel) -> None:
    """Prepare a model for accelerate's FSDP2 auto-wrap: which blocks to shard, and its input embeddings.

    accelerate 1.x reads the private `_no_split_modules`; TimmWrapper (transformers 5.x) names a
    class its timm model does not contain, and transformers' ResNet names single convolutions, so
    FSDP would fail or shard too finely. accelerate 1.15 also calls `get_input_embeddings()`, which
    transformers 5.x refuses (NotImplementedError) for models without token embeddings, ResNet among
    them: none. Both set on the instance, for this model only.
    """
    present = sorted({type(m).__name__ for m in model.modules()} & set(FSDP_UNITS))
    if present:
        model._no_split_modules = present
    try:
        model.get_input_embeddings()
    except NotImplementedError:
        model.get_input_embeddings = lambda: None


def is_batch_norm(module: nn.Module) -> bool:
    """Every BatchNorm flavour (1d/2d/3d, SyncBatchNorm, lazy ones): torch's private common base."""
    from torch.nn.modules.batchnorm import _BatchNorm

    return isinstance(module, _BatchNorm)


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


def wandb_has_credentials(environ=os.environ) -> bool:
    """Whether wandb 0.19-0.31 would find credentials without asking: WANDB_API_KEY,
    WANDB_IDENTITY_TOKEN_FILE, or an entry for its host (WANDB_BASE_URL, default api.wandb.ai) in the
    netrc file (NETRC, default ~/.netrc), where `wandb login` stores the key. The public rules, read with
    the standard library; `tests/test_compat.py` checks that wandb's own lookup agrees."""
    import netrc
    from urllib.parse import urlparse

    if environ.get("WANDB_API_KEY") or environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = urlparse(environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname
    path = environ.get("NETRC") or os.path.join(environ.get("HOME") or os.path.expanduser("~"), ".netrc")
    try:
        entry = netrc.netrc(path).authenticators(host)
    except (OSError, netrc.NetrcParseError):
        return False
    return bool(entry and entry[2])


# Field metadata of the project's own (run/record.py reads "shapes", run/card.py "card"), which argparse does not know.
PROJECT_FIELD_METADATA = ("shapes", "card")


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


def tell_deepspeed_the_accelerator(environ=os.environ) -> None:
    """accelerate 1.x imports deepspeed, when it is installed, in every Trainer (`extract_model_from_parallel`),
    runs without DeepSpeed included; deepspeed 0.16-0.19 then looks for an accelerator and, finding none, warns
    "Setting accelerator to CPU. If you have GPU or other accelerator, we were unable to detect it" in every process.
    Where torch finds no accelerator, say so first (DS_ACCELERATOR=cpu, which deepspeed reads before it looks): the
    same choice, without the line. A value already set stays."""
    import torch

    accelerator = getattr(torch, "accelerator", None)  # torch >= 2.6: CUDA, ROCm, MPS, XPU and others alike
    found = accelerator.is_available() if hasattr(accelerator, "is_available") else torch.cuda.is_available()
    if not found:
        environ.setdefault("DS_ACCELERATOR", "cpu")


# The versions every workaround here was checked with (the canaries pass), oldest and newest; a newest written as
# major.minor covers its patch releases (5.24: 5.24.x), one written with three numbers only itself.
TESTED = {"transformers": ("5.0", "5.24"), "accelerate": ("1.2", "1.16"), "torch": ("2.4", "2.14"),
          "datasets": ("3.0", "5.2"), "timm": ("1.0.12", "1.0.31"), "wandb": ("0.19", "0.31"),
          "huggingface_hub": ("1.0", "2.4")}
# Each workaround: the library whose internals or behaviour it depends on, and its canary in tests/test_compat.py.
WORKAROUNDS = {
    "load_checkpoint_weights": ("transformers", "test_trainer_checkpoint_loading_still_skips_renamed_vit_layers"),
    "TransferTrainer._prepare_inputs": ("transformers", "test_trainer_still_prepares_every_batch_through_prepare_inputs"),
    "TransferTrainer._push_from_checkpoint": ("transformers",
                                              "test_trainer_still_pushes_during_training_through_push_from_checkpoint"),
    "TransferTrainer._save_checkpoint": ("transformers", "test_trainer_still_saves_checkpoints_through_save_checkpoint"),
    "TransferTrainer._determine_best_metric": ("transformers",
                                               "test_trainer_still_keeps_the_first_of_a_tie_in_determine_best_metric"),
    "TransferTrainer.get_batch_samples": ("transformers", "test_trainer_still_takes_the_loss_counts_we_give_it"),
    "HeldLoadReport": ("transformers", "test_from_pretrained_still_logs_a_table_for_a_new_head"),
    "drop_timm_pretrained_cfg": ("transformers",
                                 "test_timm_local_config_with_pretrained_cfg_still_overrides_the_saved_processor"),
    "set_timm_label_names": ("transformers", "test_timm_config_still_prefers_its_saved_label_names"),
    "field_for_argparse": ("transformers", "test_hf_argument_parser_still_passes_unknown_metadata_to_argparse"),
    "set_fsdp_units": ("accelerate", "test_no_split_modules_still_do_not_name_the_blocks"),
    "deepspeed_dtype": ("accelerate", "test_deepspeed_dtype_is_still_where_it_is_read"),
    "accelerate_launch_keys": ("accelerate", "test_accelerate_launch_parser_still_lists_its_options"),
    "tell_deepspeed_the_accelerator": ("accelerate",
                                       "test_accelerate_still_imports_deepspeed_which_still_warns_without_an_accelerator"),
    "is_batch_norm": ("torch", "test_batch_norm_classes_still_share_the_private_base"),
    "dataset_fingerprint": ("datasets", "test_dataset_fingerprint_still_tracks_content_and_transforms"),
    "wandb_has_credentials": ("wandb", "test_wandb_still_finds_credentials_where_the_public_rules_say"),
    "go_offline": ("huggingface_hub", "test_going_offline_after_import_still_stops_every_request"),
}
logger = logging.getLogger(__name__)


CANARIES = "python -m pytest tests/test_compat.py"  # the command that says whether the workarounds still hold


def check_versions(installed=None) -> str | None:
    """The one line to show when a library a workaround depends on is installed in a version outside `TESTED`
    (newer than the newest checked, or older than the oldest): each such library with its version and the range
    checked, and the command that runs the canaries; None when all were checked. `installed(name)` gives a
    version (default: the installed distribution's); a library that is not installed is not judged. A pre-release
    counts as its release (5.25.0rc1 is 5.25), a post-release or local build as the release it follows."""
    from packaging.version import InvalidVersion, Version

    installed = installed or version
    outside = []
    for library in dict.fromkeys(library for library, _ in WORKAROUNDS.values()):  # those a workaround relies on
        oldest, newest = TESTED[library]
        try:
            found = Version(installed(library))
        except (PackageNotFoundError, InvalidVersion):
            continue
        if not Version(oldest) <= Version(found.base_version) < _next_release(newest):
            outside.append(f"{library} {found} (checked {oldest} to {newest})")
    if not outside:
        return None
    return (f"library versions the project's workarounds were not checked with: {', '.join(outside)}; if "
            f"something fails or looks wrong, {CANARIES} says which workaround no longer holds")


def _next_release(newest: str):
    """The first release after `newest` at the precision it is written: 5.24 -> 5.25, 1.0.31 -> 1.0.32."""
    from packaging.version import Version

    *head, last = Version(newest).release
    return Version(".".join(str(n) for n in (*head, last + 1)))


def warn_untested_versions(environ=os.environ) -> str | None:
    """Log `check_versions`' line once per command: from the main process only (every process of a launch runs
    the command), and not with HF_TRANSFER_NO_VERSION_WARNING=1 (the test suite sets it: its canaries judge
    the versions). Returns the line logged."""
    if int(environ.get("RANK", "0")) != 0 or environ.get("HF_TRANSFER_NO_VERSION_WARNING") == "1":
        return None
    line = check_versions()
    if line:
        logger.warning(line)
    return line
