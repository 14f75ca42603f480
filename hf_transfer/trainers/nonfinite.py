"""Never train on, or save, weights that a NaN/inf loss or gradient touched, without making the host wait
for the device at every step.

The obvious check, `if not torch.isfinite(loss)`, reads the loss on the host: on a GPU the CPU then
waits for every kernel queued so far and cannot queue the next step meanwhile, so the GPU idles
at every step (docs/performance.md measured what such reads cost). Instead `LossWatch` keeps each
step's verdict on the device (the loss, and the gradients' total norm just before the optimizer
step: a finite loss can still have non-finite gradients), copies it to host memory without
blocking, and reads it once the copy has landed: on the CPU at once, on a GPU normally by the next
step. `LossGuard` awaits the verdict before anything is logged, evaluated or saved, and at the end
of training, so no checkpoint and no saved model holds weights that a bad step touched; on a GPU
the run stops at the first log, evaluation or save after the bad step (or at the next step, if the
verdict has landed by then).

With --max_nan_steps > 0 a bad step is skipped instead (`StepSkipper`): the optimizer and the
learning-rate schedule do not step, the weight average is not updated and the step is not counted,
so the run continues exactly as if it had never seen that batch. Whether to skip must be known
before the optimizer steps, so that mode reads one verdict per step on the host (all processes
agree on it first).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from transformers import TrainerCallback

from ..errors import UserError

logger = logging.getLogger(__name__)
WHAT = ("training loss", "gradient norm")  # what a verdict was read from


class NonFiniteLossError(UserError):
    """The loss or the gradients became NaN or infinite more often than --max_nan_steps allows."""


def gradient_norm(model: torch.nn.Module) -> torch.Tensor | None:
    """The total 2-norm of the gradients, on the device (None before any gradient exists)."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    return torch.nn.utils.get_total_norm(grads) if grads else None


class LossWatch:
    """The first training step whose loss or gradients were not finite, and that value, known to the host
    without a sync."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self._first_bad: torch.Tensor | None = None  # on the device: [step or -1, value, what]
        self._host: torch.Tensor | None = None  # its copy in (pinned, on a GPU) host memory
        self._landed = None  # a CUDA event: the latest copy has reached the host

    def observe(self, value: torch.Tensor, step: int, what: int = 0) -> None:
        """`what`: 0 for a loss, 1 for a gradient norm (`WHAT`)."""
        value = value.detach().float().reshape(())
        if self._first_bad is None:
            cuda = value.device.type == "cuda"
            self._first_bad = torch.tensor([-1.0, 0.0, 0.0], device=value.device)
            self._host = torch.empty(3, pin_memory=cuda)
            self._landed = torch.cuda.Event() if cuda else None
        first = ~torch.isfinite(value) & (self._first_bad[0] < 0)
        verdict = torch.stack([torch.full_like(value, step), value, torch.full_like(value, what)])
        self._first_bad = torch.where(first, verdict, self._first_bad)
        self._host.copy_(self._first_bad, non_blocking=self._landed is not None)
        if self._landed is not None:
            self._landed.record()

    def first_bad_step(self, wait: bool) -> tuple[int, float, str] | None:
        """(step, value, what) of the first non-finite value seen, or None. Without `wait`, only what has
        already reached the host (on a GPU the latest step's verdict may still be on its way)."""
        if self._host is None:
            return None
        if self._landed is not None:
            if not wait and not self._landed.query():
                return None
            self._landed.synchronize()
        step, value, what = self._host.tolist()
        return (int(step), value, WHAT[int(what)]) if step >= 0 else None


class LossGuard(TrainerCallback):
    """Stop mode: watches the gradients before each optimizer step, and awaits the verdict before the
    Trainer logs, evaluates or saves, and when training ends."""

    def __init__(self, watch: LossWatch, stop: Callable[[int, float, str], None], gradients: bool = True):
        self.watch, self.stop = watch, stop  # stop(step, value, what) raises NonFiniteLossError
        self.gradients = gradients  # False where gradients are sharded (FSDP, DeepSpeed)

    def on_train_begin(self, args, state, control, **kwargs):
        self.watch.reset()  # a new run (or a second train() call) starts with a clean record

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        norm = gradient_norm(model) if self.gradients and model is not None else None
        if norm is not None:
            self.watch.observe(norm, state.global_step + 1, what=1)

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


class StepSkipper(TrainerCallback):
    """Skip mode (--max_nan_steps N): a step whose loss (any micro-batch's) or gradients are not finite is not
    taken. Before the optimizer step the processes agree on the verdict (one host read); a skipped step leaves
    the weights and the optimizer's state as they were (`guard`: its `step` does nothing), the schedule is put
    back as it was, and the step is uncounted at its end: the Trainer's step count goes back, and the log,
    evaluation or save it asked for waits for the step that takes its place. Inserted right after the Trainer's flow callback, so that every
    later callback sees the step as not taken."""

    def __init__(self, limit: int, reduce: Callable[[torch.Tensor], torch.Tensor] | None,
                 stop: Callable[[int, float, str], None], gradients: bool = True):
        self.limit, self.reduce, self.stop, self.gradients = limit, reduce, stop, gradients
        self.skipping = False  # the step in progress is not taken
        self.skipped = 0
        self._losses_finite: torch.Tensor | None = None  # of the step's micro-batches so far, on the device
        self._schedule = None  # the schedule's state before a skipped step, and the learning rates

    def observe_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """The loss to train on: the same, or a zero (with the same graph) where it is not finite, so that the
        logged loss stays clean; the step itself is skipped either way."""
        finite = torch.isfinite(loss.detach()).all()
        self._losses_finite = finite if self._losses_finite is None else self._losses_finite & finite
        return torch.where(finite, loss, torch.zeros_like(loss))

    def guard(self, optimizer) -> None:
        """Make the optimizer's `step` do nothing while a step is skipped (an instance attribute: the optimizer's
        saved state holds its tensors and settings only)."""
        step = optimizer.step

        def guarded(*args, **kwargs):
            return None if self.skipping else step(*args, **kwargs)

        optimizer.step = guarded

    def on_train_begin(self, args, state, control, **kwargs):
        self.skipping, self.skipped, self._losses_finite = False, 0, None

    def on_step_begin(self, args, state, control, **kwargs):
        self.skipping = False  # set, for the callbacks of this step's end too, before the optimizer steps

    def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, lr_scheduler=None, **kwargs):
        ok = self._losses_finite if self._losses_finite is not None else torch.ones((), dtype=torch.bool)
        norm = gradient_norm(model) if self.gradients and model is not None else None
        if norm is not None:
            ok = ok.to(norm.device) & torch.isfinite(norm)
        bad = (~ok).float()
        if self.reduce is not None:
            bad = self.reduce(bad)  # every process skips the same steps
        self.skipping = bool(bad.item() > 0)  # the one host read of this mode
        self._losses_finite = None
        if self.skipping and lr_scheduler is not None:  # the Trainer steps it regardless: put back at the end
            self._schedule = (lr_scheduler.state_dict(), [g["lr"] for g in optimizer.param_groups])

    def on_step_end(self, args, state, control, optimizer=None, lr_scheduler=None, **kwargs):
        if not self.skipping:
            return
        if self._schedule is not None:
            schedule, rates = self._schedule
            lr_scheduler.load_state_dict(schedule)
            for group, rate in zip(optimizer.param_groups, rates):
                group["lr"] = rate
            self._schedule = None
        self.skipped += 1
        step = state.global_step
        if self.skipped > self.limit:
            self.stop(step, float("nan"), "training loss or gradient norm")
        state.global_step -= 1  # not taken: the next step takes its number
        control.should_log = control.should_evaluate = control.should_save = False
        logger.warning("non-finite loss or gradients at step %d: step skipped (%d of %d allowed)", step,
                       self.skipped, self.limit)
