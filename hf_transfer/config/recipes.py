"""Recipes: the optimiser and schedule defaults of each model family, per `--recipe`.

CNNs and ViTs want different optimisers. The family comes from the checkpoint (attention layers
mean ViT) before the flags are parsed, and its recipe becomes the parser's defaults: every flag
the user passes wins, and a recipe's keys count as set (the data-fitted defaults leave them alone).
What belongs to the optimizer (momentum, Nesterov, clipping, the learning rate where one was
measured) follows the optimizer the run uses: `--optim adamw_torch` on a CNN gets AdamW's, not SGD's.
"""

from __future__ import annotations

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
