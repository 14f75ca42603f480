"""Structure: a backbone's parts from input to output (stem, blocks, head), for freezing and per-layer learning rates."""

from __future__ import annotations

import re

from torch import nn
from transformers import PreTrainedModel

from ..errors import UserError


def classifier_head(model: PreTrainedModel) -> nn.Module:
    """The classification head: timm's classifier, or the `classifier` of transformers models."""
    if hasattr(model, "timm_model"):
        return model.timm_model.get_classifier()
    head = getattr(model, "classifier", None)
    if isinstance(head, nn.Module):
        return head
    raise UserError(f"cannot find the classification head of {type(model).__name__}")


def classifier_linears(model: PreTrainedModel) -> tuple[list[nn.Linear], str | None]:
    """The Linear layers whose outputs are the model's logits, to scale them (tasks/calibration.py): the head when it is
    a Linear, or the last module of a Sequential when it is one (transformers' ResNet: Flatten, Linear); a
    model whose logits average two heads (DeiT with a distillation token) has both. ([], reason) where the logits
    come otherwise (a convolution, a norm after the last Linear, no head)."""
    if isinstance(getattr(model, "distillation_classifier", None), nn.Module):
        heads = [model.cls_classifier, model.distillation_classifier]  # transformers' DeiT with a teacher: averaged
    else:
        try:
            head = model.timm_model.get_classifier() if hasattr(model, "timm_model") else classifier_head(model)
        except UserError as exc:
            return [], str(exc)
        heads = list(head) if isinstance(head, tuple) else [head]  # timm's distilled models: (head, head_dist)
    linears = []
    for part in heads:
        last = part[-1] if isinstance(part, nn.Sequential) and len(part) else part
        if not isinstance(last, nn.Linear):
            return [], f"the classifier of {type(model).__name__} ends in {type(last).__name__}, not a plain Linear layer"
        linears.append(last)
    return linears, None


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
