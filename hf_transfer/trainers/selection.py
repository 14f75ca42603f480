"""Which checkpoint a run keeps, and what it says about the choice.

The Trainer keeps the checkpoint of the best `--metric_for_best_model` on validation and replaces it only on a
strictly better value, so a metric that saturates (accuracy 1.0 on a small validation split, from the first
evaluations on) kept the FIRST weights that reached it, however long the run trained after. Here a tie on the metric
is broken (`--best_model_tie_break`): towards the later checkpoint (the default), or the lower validation loss. The
metric keeps its meaning: a strictly better value wins as before. Early stopping counts a tie won by a lower loss as
an improvement (`EarlyStopping`), as the choice does; a tie that only goes to the later checkpoint is a plateau for
both. With fewer validation images than `--best_model_min_images` (run_distill.py: 144) nothing is chosen: the run
keeps its last weights (`chooses`). benchmarks/selection.py measured each rule against the run's last weights
(docs/guide.md, "Choosing the checkpoint").

After training, `describe_choice` says which step was kept and why (best by what, how a tie was broken, or the last
weights), for the results and the model card, and a one-line warning when the validation images were too few to
choose: the metric saturated, the kept checkpoint is ahead of the last one by at most one image, or there were fewer
than `--best_model_min_images`.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import EarlyStoppingCallback
from transformers.trainer_utils import SaveStrategy

TIE_BREAKS = ("loss", "last")


def chooses(args, images: int | None) -> bool:
    """Whether the run chooses its checkpoint on validation: --load_best_model_at_end, and at least
    --best_model_min_images validation images (None: unknown, chosen)."""
    return bool(args.load_best_model_at_end) and (images is None or images >= args.best_model_min_images)


def metric_key(args) -> str:
    name = args.metric_for_best_model
    return name if name.startswith("eval_") else f"eval_{name}"


def tie_key(args) -> str | None:
    """The metric that breaks a tie: the validation loss, or None to keep the later checkpoint."""
    return None if args.best_model_tie_break == "last" else "eval_loss"


def evaluation_at(state, step: int, key: str) -> dict | None:
    """The logged evaluation of `step` that holds `key` (the Trainer's log history is saved with each checkpoint,
    so this holds after a resume too; with EMA the averaged weights' entry, whose keys are the unprefixed ones)."""
    return next((e for e in reversed(state.log_history) if e.get("step") == step and key in e), None)


def wins_tie(metrics: dict, state, args) -> bool:
    """Whether these evaluation metrics tie the best so far on the metric and win the tie-break."""
    if args.metric_for_best_model is None or state.best_metric is None or state.best_global_step is None:
        return False
    key = metric_key(args)
    if key not in metrics:
        return False
    if metrics[key] != state.best_metric:
        return False
    tie = tie_key(args)
    if tie is None:
        return True
    best = evaluation_at(state, state.best_global_step, tie)
    return tie in metrics and (best is None or metrics[tie] < best[tie])


def take_tie(metrics: dict, state, args) -> bool:
    """After the Trainer's own comparison found nothing strictly better: make this evaluation the best when it
    wins the tie (the Trainer then saves it as the best checkpoint, and loads it at the end)."""
    if not wins_tie(metrics, state, args):
        return False
    _make_best(state, args, state.best_metric)
    return True


def take_latest(metrics: dict, state, args) -> bool:
    """A run that does not choose (`chooses`): each evaluation is the one kept, so that the Trainer's state and
    its checkpoint rotation follow the weights the run ends with."""
    _make_best(state, args, metrics.get(metric_key(args)) if args.metric_for_best_model else None)
    return True


def _make_best(state, args, value) -> None:
    state.best_metric = value
    if args.save_strategy in (SaveStrategy.STEPS, SaveStrategy.EPOCH, SaveStrategy.BEST):
        state.best_global_step = state.global_step


class EarlyStopping(EarlyStoppingCallback):
    """transformers' early stopping, with a tie won by a lower validation loss (--best_model_tie_break loss) counted
    as an improvement, as the checkpoint choice counts it (it runs before the choice, against the same best). A tie
    broken towards the later checkpoint is no improvement: a plateau still stops the run, which then keeps the
    plateau's latest weights."""

    def on_evaluate(self, args, state, control, metrics, **kwargs):
        if tie_key(args) is not None and wins_tie(metrics, state, args):
            self.early_stopping_patience_counter = 0
            return
        super().on_evaluate(args, state, control, metrics, **kwargs)


# ---------------------------------------------------------------- what the run says about its choice


@dataclass
class Choice:
    """The kept weights: `step` (of `last_step`), its epoch, and why (`reason`, a sentence for the card);
    `warning`: one line when the validation images were too few to choose."""

    step: int
    last_step: int
    epoch: float | None
    reason: str
    warning: str | None = None

    def results(self) -> dict:
        """For train_results.json, from which the model card says it (run/card.py)."""
        epoch = {} if self.epoch is None else {"selected_epoch": self.epoch}
        return {"selected_step": self.step, **epoch, "selected_by": self.reason, "train_steps": self.last_step}

    def sentence(self) -> str:
        epoch = f", epoch {self.epoch:g}" if self.epoch is not None else ""
        which = "the last" if self.step == self.last_step else f"of {self.last_step}"
        return f"step {self.step} ({which}{epoch}): {self.reason}"


NAMES = {"kd_loss": "distillation loss", "map": "mAP"}


def _name(key: str) -> str:
    name = key.removeprefix("eval_")
    return NAMES.get(name, name.replace("_", " "))


def describe_choice(args, state, images: int | None) -> Choice:
    """Which weights the run ends with and why; `images`: how many validation images the metric was computed on
    (None when unknown: a stream)."""
    last_epoch = round(state.epoch, 2) if state.epoch is not None else None
    if not args.load_best_model_at_end:  # (with it, TrainingArguments always sets a metric)
        return Choice(state.global_step, state.global_step, last_epoch,
                      "the last weights (--load_best_model_at_end is off)")
    if not chooses(args, images):
        return Choice(state.global_step, state.global_step, last_epoch,
                      f"the last weights ({images} validation images are fewer than --best_model_min_images "
                      f"{args.best_model_min_images}, too few to choose)",
                      f"{images} validation images are too few to choose a checkpoint (--best_model_min_images "
                      f"{args.best_model_min_images}): the run kept its last weights")
    evaluations = [e for e in state.log_history if metric_key(args) in e and "step" in e]
    if state.best_model_checkpoint is None or not evaluations:
        return Choice(state.global_step, state.global_step, last_epoch,
                      "the last weights (no checkpoint was evaluated and saved to choose from)")
    key, tie = metric_key(args), tie_key(args)
    step = state.best_global_step
    kept = evaluation_at(state, step, key) or {}
    value = kept.get(key, state.best_metric)
    on = f" on {images} validation images" if images else ""
    reason = f"the {'best' if args.greater_is_better else 'lowest'} validation {_name(key)} ({value:.4f}{on})"
    tied = [e["step"] for e in evaluations if e[key] == value]
    if len(tied) > 1:
        broken = f"the lowest validation {_name(tie)} among them" if tie else "the latest of them"
        reason += f", reached at {len(tied)} of {len(evaluations)} evaluations; {broken}"
    epoch = kept.get("epoch")
    return Choice(step, state.global_step, round(epoch, 2) if epoch is not None else None, reason,
                  _warning(args, evaluations, value, step, tied, images))


def _warning(args, evaluations: list[dict], value: float, step: int, tied: list[int], images: int | None) -> str | None:
    """One line when the validation split could not tell the checkpoints apart: the metric saturated (several
    evaluations at its ceiling), or, for accuracy (a share of images), the kept checkpoint is ahead of the last
    evaluation by at most one image."""
    key = metric_key(args)
    size = f"{images} validation images" if images else "the validation images"
    advice = ("hold out more images for validation (--validation_split, --validation_dir), or keep the last weights "
              "below N of them (--best_model_min_images N)")
    ceiling = 1.0 if args.greater_is_better else 0.0
    if len(tied) > 1 and value == ceiling:
        return (f"{size} could not choose: validation {_name(key)} was {value:g} at {len(tied)} of "
                f"{len(evaluations)} evaluations (from step {tied[0]}); kept step {step} by the tie-break; {advice}")
    last = evaluations[-1]
    share = key.endswith("accuracy")
    ahead = abs(value - last[key])
    if share and images and step != last["step"] and 0 < ahead <= 1 / images + 1e-9:
        return (f"{size} could not choose: the kept step {step} is ahead of the last (step {last['step']}) by "
                f"{ahead * images:.0f} image(s), validation {_name(key)} {value:.4f} against "
                f"{last[key]:.4f}; {advice}")
    return None
