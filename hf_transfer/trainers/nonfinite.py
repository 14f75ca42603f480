"""Never train on, or save, weights a NaN/inf loss touched, without making the host wait for the device.

The obvious check, `if not torch.isfinite(loss)`, reads the loss on the host: on a GPU the CPU then
waits for every kernel queued so far and cannot queue the next step meanwhile, so the GPU idles
at every step (docs/performance.md measured what such reads cost). Instead `LossWatch` keeps each
step's verdict on the device, copies it to host memory without blocking, and reads it once the copy
has landed: on the CPU at once, on a GPU normally by the next step. `LossGuard` awaits the verdict
before anything is logged, evaluated or saved, and at the end of training, so no checkpoint and no
saved model holds weights that a bad step touched.

With --max_nan_steps > 0 a bad step is skipped rather than fatal, which needs the verdict before the
backward pass: that path reads the loss every step (`TransferTrainer.skip_if_not_finite`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers import TrainerCallback

from ..errors import UserError


class NonFiniteLossError(UserError):
    """The loss became NaN or infinite more often than --max_nan_steps allows."""


class LossWatch:
    """The first training step whose loss was not finite, and that loss, known to the host without a sync."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self._first_bad: torch.Tensor | None = None  # on the loss's device: [step or -1, loss]
        self._host: torch.Tensor | None = None  # its copy in (pinned, on a GPU) host memory
        self._landed = None  # a CUDA event: the latest copy has reached the host

    def observe(self, loss: torch.Tensor, step: int) -> None:
        loss = loss.detach().float().reshape(())
        if self._first_bad is None:
            cuda = loss.device.type == "cuda"
            self._first_bad = torch.tensor([-1.0, 0.0], device=loss.device)
            self._host = torch.empty(2, pin_memory=cuda)
            self._landed = torch.cuda.Event() if cuda else None
        first = ~torch.isfinite(loss) & (self._first_bad[0] < 0)
        self._first_bad = torch.where(first, torch.stack([torch.full_like(loss, step), loss]), self._first_bad)
        self._host.copy_(self._first_bad, non_blocking=self._landed is not None)
        if self._landed is not None:
            self._landed.record()

    def first_bad_step(self, wait: bool) -> tuple[int, float] | None:
        """(step, loss) of the first non-finite loss seen, or None. Without `wait`, only what has
        already reached the host (on a GPU the latest step's verdict may still be on its way)."""
        if self._host is None:
            return None
        if self._landed is not None:
            if not wait and not self._landed.query():
                return None
            self._landed.synchronize()
        step, loss = self._host.tolist()
        return (int(step), loss) if step >= 0 else None


class LossGuard(TrainerCallback):
    """Awaits the verdict before the Trainer logs, evaluates or saves, and when training ends."""

    def __init__(self, watch: LossWatch, stop: Callable[[int, float], None]):
        self.watch, self.stop = watch, stop  # stop(step, loss) raises NonFiniteLossError

    def on_train_begin(self, args, state, control, **kwargs):
        self.watch.reset()  # a new run (or a second train() call) starts with a clean record

    def on_step_end(self, args, state, control, **kwargs):
        if (control.should_log or control.should_evaluate or control.should_save or control.should_training_stop
                or state.global_step >= state.max_steps):
            self._check()

    def on_epoch_end(self, args, state, control, **kwargs):
        self._check()  # the Trainer may evaluate or save at the end of an epoch

    def _check(self) -> None:
        bad = self.watch.first_bad_step(wait=True)
        if bad is not None:
            self.stop(*bad)
