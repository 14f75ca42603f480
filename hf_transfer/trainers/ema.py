"""Weight EMA (`--ema_decay`): an exponential moving average of the weights, kept on the device beside the model.

timm's `ModelEmaV3` does the averaging (with its warm-up, so that a short fine-tune averages its
last tens of steps, not its first: the decay grows as 1 - (1 + step)^-2/3 up to `--ema_decay`).
`TransferTrainer` updates it after every optimizer step, evaluates it (the model selection uses
its accuracy; the raw weights' is logged as `eval_raw_*`), writes it into every checkpoint
(`ema.safetensors`, before the Trainer's state, so a complete checkpoint always has it and a
resumed run continues the same average), and ends the run with the EMA weights in the model:
the saved model is the EMA one.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from timm.utils import ModelEmaV3
from transformers import TrainerCallback

FILE = "ema.safetensors"


class WeightEma:
    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.restart(model)

    def restart(self, model: torch.nn.Module) -> None:
        """Start the average afresh from `model`'s weights."""
        self.average = ModelEmaV3(model, decay=self.decay, use_warmup=True)
        self.average.module.requires_grad_(False)

    def update(self, model: torch.nn.Module, step: int) -> None:
        self.average.update(model, step=step)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.average.module.state_dict()

    def save(self, folder: str | Path) -> None:
        Path(folder).mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().contiguous() for k, v in self.state_dict().items()}, str(Path(folder) / FILE))

    def load(self, folder: str | Path) -> bool:
        """Restore the average saved in a checkpoint; False when the checkpoint has none."""
        path = Path(folder) / FILE
        if not path.is_file():
            return False
        device = next(self.average.module.parameters()).device
        self.average.module.load_state_dict(load_file(str(path), device=str(device)))
        return True


@contextlib.contextmanager
def swapped_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor]):
    """The model holds `weights` inside the block and its own again after it (in place: DDP sees the same tensors)."""
    own = {k: v.detach().clone() for k, v in model.state_dict().items()}
    model.load_state_dict(weights)
    try:
        yield
    finally:
        model.load_state_dict(own)


class EmaCallback(TrainerCallback):
    """Updates the average after every optimizer step taken (`skipped()`: the step was not, nonfinite.py)."""

    def __init__(self, ema: WeightEma, skipped=lambda: False):
        self.ema, self.skipped = ema, skipped

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if not self.skipped():
            self.ema.update(getattr(model, "module", model), step=state.global_step)
