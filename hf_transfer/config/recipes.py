"""Recipes: the optimiser and schedule defaults of each model family, per `--recipe`.

CNNs and ViTs want different optimisers. The family comes from the checkpoint (attention layers
mean ViT) before the flags are parsed, and its recipe becomes the parser's defaults: every flag
the user passes wins, and a recipe's keys count as set (the data-fitted defaults leave them alone).
What belongs to the optimizer (momentum, Nesterov, clipping, the learning rate where one was
measured) follows the optimizer the run uses: `--optim adamw_torch` on a CNN gets AdamW's, not SGD's.
"""

from __future__ import annotations

import math

FAMILY_NAMES = {"cnn": "CNNs", "vit": "ViTs"}

RECIPES: dict[str, dict[str, dict[str, object]]] = {
    # Chosen from published fine-tuning recipes (README, "Recipes"): SGD with momentum for
    # CNNs (BiT, Kornblith et al. 2019), AdamW for ViTs, cosine decay with warmup for both.
    # Gradient clipping follows the optimiser: SGD steps are not clipped (timm's train.py does not
    # clip; the Trainer's default max_grad_norm=1.0 shrank every SGD step of a fresh head ~36x and
    # left real-weights fine-tuning at chance, benchmarks/transfer.py), AdamW keeps the
    # Trainer's 1.0 as Google's ViT fine-tuning does (Adam normalises the step anyway).
    "default": {
        "cnn": {"optim": "sgd", "optim_args": "momentum=0.9,nesterov=True", "learning_rate": 0.01,
                "weight_decay": 1e-4, "lr_scheduler_type": "cosine", "warmup_steps": 0.05, "max_grad_norm": 0.0},
        "vit": {"optim": "adamw_torch", "learning_rate": 5e-5, "weight_decay": 0.05,
                "lr_scheduler_type": "cosine", "warmup_steps": 0.1, "max_grad_norm": 1.0},
    },
    # The tutorial's exact settings: 3 epochs, constant learning rate, a plain PyTorch loop (no clipping).
    "tutorial": {
        "cnn": {"optim": "sgd", "optim_args": "momentum=0.9", "learning_rate": 1e-3, "weight_decay": 1e-4,
                "lr_scheduler_type": "constant", "warmup_steps": 0, "num_train_epochs": 3, "max_grad_norm": 0.0},
        "vit": {"optim": "adamw_torch", "learning_rate": 1e-5, "weight_decay": 1e-4,
                "lr_scheduler_type": "constant", "warmup_steps": 0, "num_train_epochs": 3, "max_grad_norm": 0.0},
    },
}

# What belongs to an optimizer rather than to a model family: a run whose optimizer is not its recipe's own
# (--optim) gets these with it, not the recipe's. SGD steps are not clipped (see above); Adam-style optimizers
# keep the Trainer's clipping at 1.0.
OPTIMIZER_DEFAULTS: dict[str, dict[str, object]] = {
    "sgd": {"optim_args": "momentum=0.9,nesterov=True", "max_grad_norm": 0.0},
    **{name: {"optim_args": None, "max_grad_norm": 1.0}
       for name in ("adamw_torch", "adamw_torch_fused", "adafactor", "adagrad", "rmsprop")},
}
# Learning rates measured for an optimizer other than the family's own: AdamW on EfficientNet-Lite0, the best of
# 1e-4, 3e-4 and 1e-3 at 10 and 50 digits per class from real weights and from scratch (benchmarks/transfer.py).
LEARNING_RATES = {("cnn", "adamw_torch"): 1e-3, ("cnn", "adamw_torch_fused"): 1e-3}


def recipe_defaults(recipe: str, family: str, optimizer: str | None = None) -> tuple[dict[str, object], str | None]:
    """The defaults of a run of `family` under `recipe` with `optimizer` (None: the recipe's own), and a note
    when its learning rate was measured for another optimizer than the one used."""
    defaults = dict(RECIPES[recipe][family])
    if optimizer is None or optimizer == defaults["optim"]:
        return defaults, None
    defaults.update(OPTIMIZER_DEFAULTS.get(optimizer, {}), optim=optimizer)
    if (family, optimizer) in LEARNING_RATES:
        defaults["learning_rate"] = LEARNING_RATES[(family, optimizer)]
        return defaults, None
    own = RECIPES[recipe][family]["optim"]
    return defaults, (f"--optim {optimizer} for {FAMILY_NAMES[family]}: the learning rate {defaults['learning_rate']:g} "
                      f"is the one measured with {own}; none has been measured with {optimizer}, pass --learning_rate")


# ---------------------------------------------------------------- defaults fitted to the data set


def fitted_fields(args, given: set[str]) -> set[str]:
    """The settings `fit_to_data` takes from the data (keys as in run_args.py): those of the flags nobody set."""
    fitted = set()
    if "per_device_train_batch_size" not in given:
        fitted.add("global_batch_size")  # through the batch size per device
    if not ({"num_train_epochs", "max_steps"} & given) and (args.min_train_steps > 0 or args.min_seen_images > 0):
        fitted.add("training.num_train_epochs")
    if "metric_for_best_model" not in given:
        fitted.add("training.metric_for_best_model")  # the task's: accuracy, or mAP for several labels per image
    return fitted


def fit_to_data(args, num_train: int | None, given: set[str], task=None) -> list[str]:
    """Defaults that depend on the training set, for the flags nobody set; returns what changed (for a stream,
    whose size is unknown and whose length --max_steps gives, only the task's metric).

    - The metric that chooses the checkpoint: the task's (tasks.py): accuracy, or mAP when the
      images have several labels each.

    - Batch size: at most a tenth of the training set (at least 8), so that an epoch has about
      ten optimizer steps or more; the default 128 is meant for CIFAR-sized data.
    - Length: the default 3 epochs, or more until `--min_train_steps` optimizer steps and
      `--min_seen_images` images seen (distillation's patient teacher). 100 real digits at batch 10
      reach 0.87 test accuracy in 15 epochs and 0.96 in 20 (one seed, benchmarks/transfer.py): on
      small data the number of updates, not of epochs, decides.
    """
    changes = []
    fitted = fitted_fields(args, given)
    if "training.metric_for_best_model" in fitted and task is not None and args.metric_for_best_model != task.best_metric:
        args.metric_for_best_model = task.best_metric
        changes.append(f"--metric_for_best_model {task.best_metric} (the checkpoint is chosen by "
                       f"{'mAP: several labels per image' if task.multi_label else 'accuracy'})")
    if num_train is None:
        return changes
    processes = max(1, args.world_size)
    if "global_batch_size" in fitted:
        cap = max(8, num_train // 10)
        global_batch = args.per_device_train_batch_size * args.gradient_accumulation_steps * processes
        if global_batch > cap:
            args.per_device_train_batch_size = max(1, cap // (args.gradient_accumulation_steps * processes))
            changes.append(f"--per_device_train_batch_size {args.per_device_train_batch_size} "
                           f"(a tenth of the {num_train} training images)")
    if "training.num_train_epochs" in fitted:
        global_batch = args.per_device_train_batch_size * args.gradient_accumulation_steps * processes
        steps_per_epoch = max(1, math.ceil(num_train / global_batch))
        epochs = max(math.ceil(args.min_train_steps / steps_per_epoch), math.ceil(args.min_seen_images / num_train))
        if epochs > args.num_train_epochs:
            args.num_train_epochs = float(epochs)
            rule = (f"--min_train_steps {args.min_train_steps}" if not args.min_seen_images else
                    f"--min_train_steps {args.min_train_steps}, --min_seen_images {args.min_seen_images}")
            changes.append(f"--num_train_epochs {epochs} ({epochs * steps_per_epoch} steps; {rule})")
    return changes
