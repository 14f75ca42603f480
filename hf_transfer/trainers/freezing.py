"""Freezing and progressive unfreezing: which parts of the network train, epoch by epoch.

Stages (cumulative): `head` (the classifier only), `last_stage` (plus the last quarter of the
backbone's blocks: ResNet `layer4`, ViT-B blocks 9-11, with the final norm), `all`.
`--freeze_backbone` is the schedule "0:head"; `--unfreeze_schedule "0:head,2:last_stage,4:all"`
is the tutorial's gradual unfreezing.

Three traps, and how they are avoided:
- The Trainer's optimizer only holds parameters that require gradients when it is built.
  Every parameter is in the optimizer (`optimization.param_groups`), and freezing happens
  afterwards, when training starts; a frozen parameter has no gradient, so the optimizer
  leaves it alone (no step, no weight decay, no momentum).
- DistributedDataParallel fixes the parameters it synchronises when it wraps the model. The
  model is wrapped with everything trainable, and `ddp_find_unused_parameters` is switched on
  so that the frozen ones, which get no gradient, do not stall the all-reduce.
- BatchNorm layers of a frozen part keep their running statistics: they run in evaluation
  mode (the Trainer puts the model in training mode at every step, so a forward pre-hook puts
  them back) until their stage is unfrozen. This is the usual choice (timm's `freeze`,
  Detectron's FrozenBatchNorm): the statistics belong with the frozen weights.
"""

from __future__ import annotations

import logging
import math

from torch import nn
from transformers import TrainerCallback

from ..errors import UserError
from ..integrations.compat import is_batch_norm
from ..models.structure import depth_groups

logger = logging.getLogger(__name__)
STAGES = ("head", "last_stage", "all")


def parse_schedule(text: str) -> list[tuple[int, str]]:
    """'0:head,2:last_stage,4:all' -> [(0, 'head'), (2, 'last_stage'), (4, 'all')], checked."""
    schedule = []
    for item in text.split(","):
        epoch, sep, stage = item.strip().partition(":")
        if not sep or not epoch.strip().isdigit():
            raise UserError(f"--unfreeze_schedule item '{item.strip()}' is not EPOCH:STAGE (e.g. \"0:head,2:last_stage,4:all\")")
        stage = stage.strip()
        if stage not in STAGES:
            raise UserError(f"--unfreeze_schedule: unknown stage '{stage}'; valid stages are: {', '.join(STAGES)}")
        schedule.append((int(epoch), stage))
    epochs = [e for e, _ in schedule]
    if epochs[0] != 0 or epochs != sorted(set(epochs)):
        raise UserError("--unfreeze_schedule must start at epoch 0 and list increasing epochs")
    return schedule


def trainable_names(model: nn.Module, stage: str) -> set[str]:
    """Names of the parameters that train at `stage`."""
    if stage == "all":
        return {name for name, _ in model.named_parameters()}
    groups = depth_groups(model)
    head, blocks = groups[-1], groups[1:-1]
    names = set(head)
    if stage == "last_stage":
        for group in blocks[-max(1, math.ceil(len(blocks) / 4)):]:
            names.update(group)
    return names


def apply_stage(model: nn.Module, stage: str) -> int:
    """Set `requires_grad` and BatchNorm modes for `stage`; return the number of trainable parameters."""
    trainable = trainable_names(model, stage)
    for name, param in model.named_parameters():
        param.requires_grad_(name in trainable)
    for module in model.modules():
        if is_batch_norm(module):
            handle = getattr(module, "_frozen_bn_hook", None)
            frozen = not any(p.requires_grad for p in module.parameters(recurse=False))
            if frozen and handle is None:
                module._frozen_bn_hook = module.register_forward_pre_hook(_keep_eval)
            elif not frozen and handle is not None:
                handle.remove()
                module._frozen_bn_hook = None
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _keep_eval(module: nn.Module, args) -> None:
    module.training = False


class UnfreezeCallback(TrainerCallback):
    """Applies the schedule at the start of training (also when resuming) and of every epoch."""

    def __init__(self, schedule: list[tuple[int, str]]):
        self.schedule = schedule
        self.current: str | None = None

    def stage_for(self, epoch: float) -> str:
        return [stage for start, stage in self.schedule if start <= int(epoch + 1e-9)][-1]

    def _update(self, state, model) -> None:
        stage = self.stage_for(state.epoch or 0.0)
        if stage == self.current:
            return
        self.current = stage
        model = getattr(model, "module", model)  # DDP
        count = apply_stage(model, stage)
        logger.info("epoch %d: stage '%s', %d trainable parameters", int(state.epoch or 0), stage, count)
        state.log_history.append({"epoch": state.epoch or 0.0, "step": state.global_step, "stage": stage,
                                  "trainable_parameters": count})

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._update(state, model)

    def on_epoch_begin(self, args, state, control, model=None, **kwargs):
        self._update(state, model)
