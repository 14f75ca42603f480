"""`TransferTrainer`: the transformers Trainer, fed uint8 image batches.

The DataLoader delivers uint8 images at storage resolution (see `data.py`); accelerate moves
them to the device; `_prepare_inputs` -- the Trainer's own hook for "make this batch ready for
the model", used by training and evaluation alike -- turns them into the model's float input
there, batched. Nothing else of the Trainer changes. `DistillationTrainer` builds on this
class and adds the teacher's view of the same images.
"""

from __future__ import annotations

import torch
from transformers import Trainer

from .transforms import ImageSpec, ToModelInput


class TransferTrainer(Trainer):
    def __init__(self, *args, image_spec: ImageSpec, channels_last: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.image_spec = image_spec
        self.to_model_input = ToModelInput(image_spec, channels_last=channels_last)

    def _prepare_inputs(self, inputs: dict) -> dict:
        batch = super()._prepare_inputs(inputs)  # on the device, still uint8
        return self.model_inputs(batch["pixel_values"], batch.get("labels"), batch)

    def model_inputs(self, images: torch.Tensor, labels: torch.Tensor | None, batch: dict) -> dict:
        """The keyword arguments of the model's forward, built from a uint8 batch on the device."""
        inputs = {"pixel_values": self.cast_for_model(self.to_model_input(images))}
        if labels is not None:
            inputs["labels"] = labels
        return inputs

    def cast_for_model(self, pixel_values: torch.Tensor) -> torch.Tensor:
        # DeepSpeed holds the weights in its own dtype and, unlike autocast, does not cast inputs.
        if self.is_deepspeed_enabled:
            return pixel_values.to(self.accelerator.state.deepspeed_plugin.hf_ds_config.dtype())
        return pixel_values

    def extra_test_metrics(self, dataset, output) -> dict[str, float]:
        """More numbers measured on the test split, prefixed `test_` (the distillation trainer adds the teacher's)."""
        return {}
