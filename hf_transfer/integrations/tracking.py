"""Experiment tracking around the Trainer's own integrations (`--report_to wandb|tensorboard|trackio`).

The Trainer logs the training arguments, every logged value (losses, the distillation terms,
the learning rate of each parameter group) and the test metrics. This module adds what it
does not know: the script's own arguments and tags in the W&B run, a check that W&B can work
before training starts, the FLOPs of a forward pass, and the peak memory of the run for the comparison report.
"""

from __future__ import annotations

import os
import resource
import time

import torch
from transformers import TrainerCallback

from ..errors import UserError
from .compat import wandb_has_credentials


def check_tracking(args) -> None:
    """W&B without credentials and without offline mode fails at `train()`; say so before training instead
    (where wandb finds credentials: compat.wandb_has_credentials)."""
    if "wandb" not in (args.report_to or []):
        return
    if os.environ.get("WANDB_MODE", "").lower() in ("offline", "disabled", "dryrun"):
        return
    if not wandb_has_credentials():
        raise UserError("--report_to wandb needs a W&B account (set WANDB_API_KEY or run `wandb login`), or "
                        "WANDB_MODE=offline to log locally and `wandb sync` later")


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


class LastStepLog(TrainerCallback):
    """Logs the last training step too. The Trainer adds the loss of the steps after its last log to
    `train_loss` from the main process alone (its other parts are averaged over every process), so a
    multi-process run whose length is not a multiple of --logging_steps reported a `train_loss` of half
    the data; and the loss curve now ends where training ends."""

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= state.max_steps and args.logging_strategy != "no":
            control.should_log = True


def reset_peak_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def peak_memory() -> dict[str, float | str]:
    """Peak memory of the run: the GPU's allocator where there is one, else the process's peak RSS."""
    if torch.cuda.is_available():
        return {"peak_memory_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1), "peak_memory_of": "cuda"}
    return {"peak_memory_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10, 1),
            "peak_memory_of": "cpu-rss"}


class ThroughputCallback(TrainerCallback):
    """Times every training step: the wait for the next batch and the rest (forward, backward, step).

    After `warmup_steps` (compilation, allocator and cache warm-up), it sums both; gaps that
    held an evaluation or a checkpoint save are not counted as waiting for data. The result,
    `steady_images_per_second` and `data_wait_share`, goes into train_results.json: a
    data_wait_share near 0 means the data path keeps the accelerator busy.
    """

    def __init__(self, warmup_steps: int = 5):
        self.warmup_steps = warmup_steps
        self.wait = self.compute = 0.0
        self.steps = 0
        self._begin = self._last_end = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.wait = self.compute = 0.0
        self.steps = 0
        self._begin = self._last_end = None
        self.images_per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps * max(1, args.world_size)

    def on_step_begin(self, args, state, control, **kwargs):
        self._begin = time.perf_counter()
        if self._last_end is not None and state.global_step >= self.warmup_steps:
            self.wait += self._begin - self._last_end

    def on_step_end(self, args, state, control, **kwargs):
        now = time.perf_counter()
        if self._begin is not None and state.global_step > self.warmup_steps:
            self.compute += now - self._begin
            self.steps += 1
        self._last_end = now

    def _interrupted(self, args, state, control, **kwargs):
        self._last_end = None  # the next gap held other work, not a wait for data

    on_evaluate = on_save = _interrupted

    def summary(self) -> dict[str, float]:
        total = self.wait + self.compute
        if not self.steps or total <= 0:
            return {}
        return {"steady_images_per_second": round(self.steps * self.images_per_step / total, 2),
                "data_wait_share": round(self.wait / total, 4)}


def forward_flops(model: torch.nn.Module, size: tuple[int, int]) -> int:
    """FLOPs of one image's forward pass at `size`, counted by torch's FLOP counter on a blank image.

    The model runs once in evaluation mode (BatchNorm statistics untouched) without gradients.
    """
    from torch.utils.flop_counter import FlopCounterMode

    parameter = next(model.parameters())
    blank = torch.zeros(1, 3, *size, device=parameter.device, dtype=parameter.dtype)
    training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(pixel_values=blank)
    finally:
        model.train(training)
    return int(counter.get_total_flops())
