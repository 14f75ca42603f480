"""The run's arguments, saved as `run_args.json` in its output directory, and compared when the directory is used again.

A rerun of the same command continues a partial run or, for a finished one, leaves it untouched;
a command that would train differently is refused with the settings that differ, so that a resumed
run is always the run it claims to be. What "differently" means is each field's own fact: the
project's fields say it in their metadata (`"shapes": True`), `TRAINER_SHAPING` names the
Trainer's own fields that do (they cannot carry the project's metadata).

The file holds what the run used: data-fitted values (epochs, batch size; `arguments.fit_to_data`)
as they were fitted. A new command is compared with them: the exact command of a run whose length
was fitted is the same run (the same data fit the same way); one that names another length, or
the fitted length where the first run named one, is not.
"""

from __future__ import annotations

import json
from dataclasses import asdict, fields
from pathlib import Path

FILE = "run_args.json"

# The Trainer's own fields that shape training. Logging, output, tracking and Hub flags are not here.
TRAINER_SHAPING = ("max_steps", "seed", "data_seed", "learning_rate", "optim", "optim_args", "weight_decay",
                   "adam_beta1", "adam_beta2", "adam_epsilon", "lr_scheduler_type", "lr_scheduler_kwargs",
                   "warmup_steps", "max_grad_norm", "label_smoothing_factor", "bf16", "fp16", "eval_steps",
                   "average_tokens_across_devices")
# What `arguments.fit_to_data` may set from the data: compared as fitted or as given (module docstring).
FITTABLE = ("training.num_train_epochs", "global_batch_size", "training.metric_for_best_model")
# Keys fitted only since a later version: a run saved before holds the old default, which is what fitting gives for
# the data such runs had (one class per image), so it is the same setting and that run continues.
FITTED_SINCE = {"training.metric_for_best_model": "accuracy"}


def shaping_fields(cls) -> list[str]:
    """The fields of an arguments dataclass that shape training."""
    return [f.name for f in fields(cls) if f.metadata.get("shapes", f.name in TRAINER_SHAPING)]


def shaping(model_args, data_args, args) -> dict:
    """The settings that shape training, as they are now (before or after the data-fitted defaults)."""
    sections = {"model": model_args, "data": data_args, "training": args}
    values = {"model": asdict(model_args), "data": asdict(data_args), "training": args.to_dict()}
    record = {f"{section}.{key}": _plain(values[section].get(key)) for section, obj in sections.items()
              for key in shaping_fields(type(obj))}
    record["processes"] = max(1, args.world_size)
    record["global_batch_size"] = args.per_device_train_batch_size * args.gradient_accumulation_steps * \
        record["processes"]
    return record


def _plain(value):
    return getattr(value, "value", value)  # enums (optimizer, schedule) as their names


def differences(saved: dict, current: dict, fitted: set[str] = frozenset()) -> list[str]:
    """'key saved -> current' for every shaping setting that differs between a saved run (`read`) and a new
    command (`current`, of which `fitted` are the keys the data will set)."""
    record, saved_fitted = saved["shaping"], set(saved.get("fitted_fields", ()))
    legacy = "fitted_fields" not in saved  # a file that kept the flags as parsed: compared as parsed
    changed = []
    for key in sorted(set(record) | set(current)):
        if key in FITTABLE and not legacy and key in fitted:
            if key not in saved_fitted and record.get(key) != FITTED_SINCE.get(key, object()):
                changed.append(f"{key.split('.')[-1]} {_show(record.get(key))} -> fitted to the data")
        elif record.get(key) != current.get(key):
            changed.append(f"{key.split('.')[-1]} {_show(record.get(key))} -> {_show(current.get(key))}")
    return changed


def _show(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def read(output_dir: str | Path) -> dict | None:
    path = Path(output_dir) / FILE
    return json.loads(path.read_text()) if path.is_file() else None


def write(output_dir: str | Path, command: str, record: dict, fitted: set[str], argv: list[str],
          card: dict | None = None) -> None:
    """`record`: what the run uses, fitted values included; `fitted`: which of its keys the data set; `card`: the
    model card's facts, so that a later push can render it for the repository it goes to."""
    payload = {"command": command, "argv": argv, "shaping": record, "fitted_fields": sorted(fitted), "card": card}
    (Path(output_dir) / FILE).write_text(json.dumps(payload, indent=2, default=str) + "\n")


def read_card(output_dir: str | Path) -> dict | None:
    saved = read(output_dir)
    return saved.get("card") if saved else None
