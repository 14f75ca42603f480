"""The run's arguments, saved as `run_args.json` in its output directory, and compared when the directory is used again.

A rerun of the same command continues a partial run or, for a finished one, leaves it untouched;
a command that would train differently is refused with the settings that differ, so that a resumed
run is always the run it claims to be. What "differently" means is each field's own fact: the
project's fields say it in their metadata (`"shapes": True`), `TRAINER_SHAPING` names the
Trainer's own fields that do (they cannot carry the project's metadata).

The file holds what the run used: data-fitted values (epochs, batch size; `config/fitting.fit_to_data`)
as they were fitted. A new command is compared with them: the exact command of a run whose length
was fitted is the same run (the same data fit the same way); one that names another length, or
the fitted length where the first run named one, is not.

Local folders (the data, the checkpoint, the teacher) are recorded whole (resolved), with the folder the
run was started in (`working_dir`): the record means the same data from any working folder, and a
command that names the same folder from elsewhere is the same run. A run recorded before (no
`working_dir`) holds them as typed, relative to a folder it did not record; compared from here, they
mean what they mean here (as they always did).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, fields
from pathlib import Path

FILE = "run_args.json"

# The Trainer's own fields that shape training. Logging, output, tracking and Hub flags are not here.
TRAINER_SHAPING = ("max_steps", "seed", "data_seed", "learning_rate", "optim", "optim_args", "weight_decay",
                   "adam_beta1", "adam_beta2", "adam_epsilon", "lr_scheduler_type", "lr_scheduler_kwargs",
                   "warmup_steps", "max_grad_norm", "label_smoothing_factor", "bf16", "fp16", "eval_steps",
                   "average_tokens_across_devices")
# What `config/fitting.fit_to_data` may set from the data: compared as fitted or as given (module docstring).
FITTABLE = ("training.num_train_epochs", "global_batch_size", "training.metric_for_best_model")
# Keys fitted only since a later version: a run saved before holds the old default, which is what fitting gives for
# the data such runs had (one class per image), so it is the same setting and that run continues.
FITTED_SINCE = {"training.metric_for_best_model": "accuracy"}
# Settings added in a later version, with the value every run saved before used: such a run is the same run.
# --calibrate acts after training: a run recorded before it existed trained what a calibrated run trains, and resumes
# under the default (its model is calibrated at the end; a finished one is reported as it is).
ADDED_SINCE = {"training.distillation_loss": "kl", "training.calibrate": True}
# The settings that may name a local folder (else a Hub id or a preset), with the names that are never a folder
# (the loaders take them first: data/dataset.py).
LOCAL_PATHS = ("model.model_name_or_path", "data.dataset_name", "data.train_dir", "data.validation_dir",
               "data.test_dir", "data.unlabeled_dir", "data.unlabeled_dataset", "training.teacher_model_name_or_path")
# A setting one side does not have: the record was written by another version of the project.
_NOT_RECORDED, _NOT_NOW = object(), object()


def shaping_fields(cls) -> list[str]:
    """The fields of an arguments dataclass that shape training."""
    return [f.name for f in fields(cls) if f.metadata.get("shapes", f.name in TRAINER_SHAPING)]


def shaping(model_args, data_args, args) -> dict:
    """The settings that shape training, as they are now (before or after the data-fitted defaults)."""
    sections = {"model": model_args, "data": data_args, "training": args}
    values = {"model": asdict(model_args), "data": asdict(data_args), "training": args.to_dict()}
    record = {f"{section}.{key}": _plain(values[section].get(key)) for section, obj in sections.items()
              for key in shaping_fields(type(obj))}
    record.update({key: local_path(key, record[key]) for key in LOCAL_PATHS if key in record})
    record["processes"] = max(1, args.world_size)
    record["global_batch_size"] = args.per_device_train_batch_size * args.gradient_accumulation_steps * \
        record["processes"]
    return record


def whole_paths(resolved: dict) -> dict:
    """`RunConfig.resolved()` with its local folders made whole (`local_path`), as the record keeps them."""
    resolved = {**resolved, "source": local_path("model.model_name_or_path", resolved["source"])}
    for section in ("model", "data"):
        resolved[section] = {key: local_path(f"{section}.{key}", value) if f"{section}.{key}" in LOCAL_PATHS else value
                             for key, value in resolved[section].items()}
    return resolved


def _plain(value):
    return getattr(value, "value", value)  # enums (optimizer, schedule) as their names


def local_path(key: str, value):
    """`value` of setting `key` as the run records it: a name of an existing local file or folder made whole
    (symlinks resolved, so that two spellings of one folder are one value); a Hub id, a preset or a built-in data
    set (`digits`) as it is."""
    if not isinstance(value, str) or not value or (key.startswith("data.") and value in _built_in_data()):
        return value
    path = Path(value).expanduser()
    return str(path.resolve()) if path.exists() else value


def _built_in_data() -> tuple[str, ...]:
    # (imported here: the data modules load datasets, which reading a record does not need)
    from ..data.sources import DIGITS, DIGITS_MULTI

    return DIGITS, DIGITS_MULTI


def differences(saved: dict, current: dict, fitted: set[str] = frozenset()) -> list[str]:
    """'key saved -> current' for every shaping setting that differs between a saved run (`read`) and a new
    command (`current`, of which `fitted` are the keys the data will set)."""
    record, saved_fitted = saved["shaping"], set(saved.get("fitted_fields", ()))
    legacy = "fitted_fields" not in saved  # a file that kept the flags as parsed: compared as parsed
    changed = []
    for key in sorted(set(record) | set(current)):
        before = record.get(key, ADDED_SINCE.get(key, _NOT_RECORDED))
        if key in LOCAL_PATHS:  # a relative path of an older record means what it means here, as it always did
            before = local_path(key, before)
        if key in FITTABLE and not legacy and key in fitted:
            if key not in saved_fitted and before != FITTED_SINCE.get(key, object()):
                changed.append(f"{key.split('.')[-1]} {_show(before)} -> fitted to the data")
        elif before != current.get(key, _NOT_NOW):
            changed.append(f"{key.split('.')[-1]} {_show(before)} -> {_show(current.get(key, _NOT_NOW))}")
    return changed


def _show(value) -> str:
    if value is _NOT_RECORDED:
        return "(not recorded by the version that wrote the run)"
    if value is _NOT_NOW:
        return "(not a setting of this version)"
    return f"{value:g}" if isinstance(value, float) else str(value)


def read(output_dir: str | Path) -> dict | None:
    path = Path(output_dir) / FILE
    return json.loads(path.read_text()) if path.is_file() else None


def write(output_dir: str | Path, command: str, record: dict, fitted: set[str], argv: list[str],
          card: dict | None = None, resolved: dict | None = None) -> None:
    """`record`: what the run uses, fitted values included; `fitted`: which of its keys the data set; `card`: the
    model card's facts, so that a later push can render it for the repository it goes to; `resolved`: what the flags
    named (RunConfig.resolved: the checkpoint, the recipe, the model and data flags), read back by the tools."""
    payload = {"command": command, "argv": argv, "working_dir": os.getcwd(), "shaping": record,
               "fitted_fields": sorted(fitted), "card": card, "resolved": resolved}
    (Path(output_dir) / FILE).write_text(json.dumps(payload, indent=2, default=str) + "\n")


def read_card(output_dir: str | Path) -> dict | None:
    saved = read(output_dir)
    return saved.get("card") if saved else None
