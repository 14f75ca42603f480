"""The run's arguments, saved as `run_args.json` in its output directory, and compared when the directory is used again.

A rerun of the same command continues a partial run or, for a finished one, leaves it untouched;
a command that would train differently (model, data, length, global batch, processes, seed,
recipe and optimiser) is refused with the settings that differ, so that a resumed run is always
the run it claims to be. The file is readable JSON: the report shows some of it.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

FILE = "run_args.json"

# What makes two runs train differently. Logging, output, tracking and Hub flags are not here.
SHAPING = {
    "model": ("model", "model_name_or_path", "from_scratch", "image_size", "recipe", "model_revision", "drop_path_rate"),
    "data": ("dataset_name", "dataset_config_name", "train_dir", "validation_dir", "test_dir", "image_column",
             "label_column", "validation_split", "max_train_samples", "max_eval_samples", "augmentation",
             "random_erasing", "skip_corrupt_images", "unlabeled_dir", "unlabeled_dataset", "unlabeled_split"),
    "training": ("num_train_epochs", "max_steps", "min_train_steps", "seed", "learning_rate", "optim", "optim_args",
                 "weight_decay", "lr_scheduler_type", "warmup_steps", "max_grad_norm", "freeze_backbone",
                 "unfreeze_schedule", "backbone_lr_scale", "layer_decay", "lr_step_size", "lr_step_gamma", "mixup",
                 "cutmix", "label_smoothing_factor", "teacher_model_name_or_path", "alpha", "temperature", "ema_decay",
                 "class_weights", "precise_bn_images"),
}


def shaping(model_args, data_args, args) -> dict:
    """The settings that shape training, as parsed (before data-fitted defaults, which follow from them)."""
    sections = {"model": asdict(model_args), "data": asdict(data_args), "training": args.to_dict()}
    record = {f"{section}.{key}": _plain(sections[section].get(key)) for section, keys in SHAPING.items()
              for key in keys if key in sections[section]}
    record["processes"] = max(1, args.world_size)
    record["global_batch_size"] = args.per_device_train_batch_size * args.gradient_accumulation_steps * \
        record["processes"]
    return record


def _plain(value):
    return getattr(value, "value", value)  # enums (optimizer, schedule) as their names


def differences(saved: dict, current: dict) -> list[str]:
    """'key saved -> current' for every shaping setting that changed."""
    return [f"{key.split('.')[-1]} {_show(saved.get(key))} -> {_show(current.get(key))}"
            for key in sorted(set(saved) | set(current)) if saved.get(key) != current.get(key)]


def _show(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def read(output_dir: str | Path) -> dict | None:
    path = Path(output_dir) / FILE
    return json.loads(path.read_text())["shaping"] if path.is_file() else None


def write(output_dir: str | Path, command: str, record: dict, fitted: dict, argv: list[str],
          card: dict | None = None) -> None:
    """`fitted`: what the data-fitted defaults chose (epochs, batch size), for the reader; `card`: the model
    card's facts, so that a later push can render it for the repository it goes to."""
    payload = {"command": command, "argv": argv, "shaping": record, "fitted": fitted, "card": card}
    (Path(output_dir) / FILE).write_text(json.dumps(payload, indent=2, default=str) + "\n")


def read_card(output_dir: str | Path) -> dict | None:
    path = Path(output_dir) / FILE
    return json.loads(path.read_text()).get("card") if path.is_file() else None
