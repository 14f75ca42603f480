"""The optimizer's parameter groups (per-layer learning rates, weight decay) and the step-decay schedule.

- `--backbone_lr_scale s`: the head trains at the base learning rate, the backbone at base x s.
- `--layer_decay d`: layer-wise decay; the head gets the base rate, the last block base x d,
  the one before base x d^2, ... down to the stem (ViT blocks, ResNet stages).
- Weight decay skips biases, normalisation weights (every 1-d parameter) and position/class
  embeddings, as BiT, DeiT and timm do.
- Every parameter is in the optimizer, trainable now or not: layers unfrozen later train
  (see freezing.py); a frozen parameter has no gradient and the optimizer skips it.
- `--lr_step_size E --lr_step_gamma g`: the tutorial's StepLR, the learning rate multiplied by
  g every E epochs (after the warmup, if any).
"""

from __future__ import annotations

import math

from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from ..models.structure import depth_groups

_NO_DECAY = ("pos_embed", "position_embeddings", "cls_token", "dist_token", "reg_token", "mask_token")


def no_weight_decay(name: str, param: nn.Parameter) -> bool:
    return param.ndim <= 1 or any(key in name for key in _NO_DECAY)


def param_groups(model: nn.Module, learning_rate: float, weight_decay: float, backbone_lr_scale: float = 1.0,
                 layer_decay: float | None = None) -> list[dict]:
    """Optimizer parameter groups, the head first (so the Trainer's `learning_rate` log is the head's)."""
    parameters = dict(model.named_parameters())
    if layer_decay is None and backbone_lr_scale == 1.0:
        named = [("all", 1.0, list(parameters))]
    else:
        depths = depth_groups(model)
        head, backbone = depths[-1], depths[:-1]
        named = [("head", 1.0, head)]
        for depth, names in reversed(list(enumerate(backbone))):
            scale = backbone_lr_scale * (layer_decay ** (len(backbone) - depth) if layer_decay else 1.0)
            named.append((f"layer_{depth}" if layer_decay else "backbone", scale, names))
    groups = []
    for group_name, scale, names in named:
        for decay in (True, False):
            params = [parameters[n] for n in names if no_weight_decay(n, parameters[n]) != decay]
            if params:
                groups.append({"params": params, "lr": learning_rate * scale,
                               "weight_decay": weight_decay if decay else 0.0, "name": group_name})
    return groups


def step_schedule(optimizer, steps_per_epoch: int, step_size_epochs: float, gamma: float,
                  warmup_steps: int = 0) -> LambdaLR:
    """StepLR counted in epochs, stepped every optimizer step as the Trainer does, with optional warmup."""
    step_size = max(1, round(step_size_epochs * steps_per_epoch))

    def factor(step: int) -> float:
        warmup = (step + 1) / warmup_steps if step < warmup_steps else 1.0
        return warmup * gamma ** (step // step_size)

    return LambdaLR(optimizer, factor)


def updates_per_epoch(num_batches: int, gradient_accumulation_steps: int) -> int:
    return max(1, math.ceil(num_batches / gradient_accumulation_steps))
