"""Precise BatchNorm statistics: the running means and variances recomputed for the weights being evaluated.

BatchNorm trains on each batch's own statistics and evaluates with running averages that follow the
weights with momentum 0.1, i.e. over roughly the last ten steps. When a short fine-tune moves the
weights faster than that (a fresh head, unclipped SGD, another domain than the checkpoint's), the
model is evaluated, selected and saved with statistics of weights it no longer has: a ResNet trained
on digits and fine-tuned for 18 steps on three colour classes classified every test image right with
its batch statistics and 0.60 of them with its running ones (tests/test_finetune.py). Recomputing the
statistics from training images with the current weights ("precise BN", Wu & Johnson 2021) costs
one forward pass over those images per evaluation, and makes what is evaluated what is saved.

`torch.optim.swa_utils.update_bn` does the same, but resets every BatchNorm layer, frozen ones too:
here the layers of a frozen part (`freezing.py`) keep the statistics that belong to their weights.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from ..compat import is_batch_norm


def trainable_batchnorm_layers(model: nn.Module) -> list[nn.Module]:
    """The BatchNorm layers whose statistics follow training: tracked, and not in a frozen part."""
    return [m for m in model.modules() if is_batch_norm(m) and m.track_running_stats
            and getattr(m, "_frozen_bn_hook", None) is None]


@torch.no_grad()
def recompute_statistics(model: nn.Module, batches: Iterable[torch.Tensor],
                         reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> int:
    """Replace the running statistics of `model`'s trainable BatchNorm layers by the mean over `batches`
    (model inputs) of each batch's statistics, with the current weights; `reduce` averages them across
    processes. Returns the number of layers updated."""
    layers = trainable_batchnorm_layers(model)
    if not layers:
        return 0
    momenta = {layer: layer.momentum for layer in layers}
    was_training = model.training
    for layer in layers:
        layer.reset_running_stats()
        layer.momentum = None  # a cumulative average over the batches, each weighted alike
    model.train()
    try:
        for pixel_values in batches:
            model(pixel_values=pixel_values)
    finally:
        for layer, momentum in momenta.items():
            layer.momentum = momentum
        model.train(was_training)
    if reduce is not None:
        for layer in layers:
            layer.running_mean.copy_(reduce(layer.running_mean))
            layer.running_var.copy_(reduce(layer.running_var))
    return len(layers)
