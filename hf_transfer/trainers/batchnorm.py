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

In training mode a batch of one image cannot be normalised where a feature map is 1 x 1 (a ResNet's last
stage at 16 or 32 px): torch stops with "Expected more than 1 value per channel". No batch of one reaches a
BatchNorm model in training here: a training epoch whose last batch would hold one image is completed
(`completion`), and the statistics' batches are joined (`normalisable`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import torch
from torch import nn

from ..integrations.compat import is_batch_norm


def has_batchnorm(model: nn.Module) -> bool:
    return any(is_batch_norm(m) for m in model.modules())


def completion(images: int, batch_size: int, processes: int = 1, even_batches: bool = True) -> int:
    """Images to draw again at the end of each training epoch so that no process's last batch holds a single image
    (0: none needed). That batch is completed to a whole one, as accelerate completes every process's last batch
    when there are several (its `even_batches`, on by default): the epoch keeps its number of steps."""
    if (processes > 1 and even_batches) or batch_size < 2 or images < 1:
        return 0
    return batch_size - 1 if images % batch_size == 1 else 0


def normalisable(batches: Iterable[torch.Tensor]) -> Iterator[torch.Tensor]:
    """`batches` with no batch of a single image: such a batch is joined to the one before it (or, when there is
    none, to the one after it). Every process gets the same number of batches when theirs have the same sizes."""
    pending, ready = None, None  # fewer than two images so far; a batch of two or more, held in case one follows
    for batch in batches:
        pending = batch if pending is None else torch.cat([pending, batch])
        if len(pending) >= 2:
            if ready is not None:
                yield ready
            ready, pending = pending, None
    if pending is not None and ready is not None:
        ready = torch.cat([ready, pending])
    if ready is not None:
        yield ready
    elif pending is not None:  # a single image in all: nothing to join it to
        yield pending


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
