"""Recipes: the optimiser and schedule defaults of each model family, per `--recipe`.

CNNs and ViTs want different optimisers. The family comes from the checkpoint (attention layers
mean ViT) before the flags are parsed, and its recipe becomes the parser's defaults: every flag
the user passes wins, and a recipe's keys count as set (the data-fitted defaults leave them alone).
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
