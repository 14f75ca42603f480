"""Experiment tracking around the Trainer's own integrations (`--report_to wandb|tensorboard|trackio`).

The Trainer logs the training arguments, every logged value (losses, the distillation terms,
the learning rate of each parameter group) and the test metrics. This module adds what it
does not know: the script's own arguments and tags in the W&B run, a check that W&B can work
before training starts, and the peak memory of the run for the comparison report.
"""

from __future__ import annotations

import netrc
import os
import resource
from urllib.parse import urlparse

import torch
from transformers import TrainerCallback

from .errors import UserError


def check_tracking(args) -> None:
    """W&B without an account and without offline mode fails at `train()`; say so before training instead."""
    if "wandb" not in (args.report_to or []):
        return
    if os.environ.get("WANDB_MODE", "").lower() in ("offline", "disabled", "dryrun"):
        return
    if os.environ.get("WANDB_API_KEY") or _netrc_has_wandb_key():
        return
    raise UserError("--report_to wandb needs a W&B account (set WANDB_API_KEY or run `wandb login`), or "
                    "WANDB_MODE=offline to log locally and `wandb sync` later")


def _netrc_has_wandb_key() -> bool:
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return netrc.netrc().authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def masked(config: dict) -> dict:
    return {k: ("<masked>" if "token" in k.lower() and v else v) for k, v in config.items()}


class RunConfigCallback(TrainerCallback):
    """Adds the script's own arguments (model, data, distillation) and tags to the W&B run."""

    def __init__(self, config: dict, tags: list[str]):
        self.config, self.tags = masked(config), tags

    def on_train_begin(self, args, state, control, **kwargs):
        if "wandb" not in (args.report_to or []) or not state.is_world_process_zero:
            return
        import wandb

        if wandb.run is not None:  # started by the Trainer's WandbCallback just before this one
            wandb.run.config.update(self.config, allow_val_change=True)
            wandb.run.tags = tuple(dict.fromkeys([*(wandb.run.tags or ()), *self.tags]))


def reset_peak_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def peak_memory() -> dict[str, float | str]:
    """Peak memory of the run: the GPU's allocator where there is one, else the process's peak RSS."""
    if torch.cuda.is_available():
        return {"peak_memory_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1), "peak_memory_of": "cuda"}
    return {"peak_memory_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10, 1),
            "peak_memory_of": "cpu-rss"}
