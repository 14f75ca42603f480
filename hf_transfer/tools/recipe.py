"""A finished run's recipe as run_finetune.py flags, rebuilt from its record (run_args.json), never from the command
line it was started with: that one may name folders relative to a working folder the tool is not in.

The record holds what the flags named (`resolved`: the model and data flags, local folders whole) and every setting
that shapes training as the run used it (`shaping`), with the keys the data fitted (`fitted_fields`). `recipe_flags`
writes the model and data flags that differ from their defaults, then the training settings that differ from what
those flags alone give (the family's recipe): the flags a user would have typed. The data-fitted settings (batch
size, length, the metric) are left out, so that a run of the same recipe on other data (a fold of the training
split) fits them to its own data, as the run did to its. The rebuilt configuration is checked against the record:
any setting that comes out differently is refused rather than trained.
"""

from __future__ import annotations

import json
from dataclasses import asdict, fields

from ..config.flags import DataArguments, ModelArguments, data_arguments
from ..config.run_config import RunConfig, parse_command
from ..errors import UserError
from ..run.record import shaping

# Record keys that are not flags of their own: how many processes trained (a rebuilt run trains in this one), and the
# batch over all of them (given to the rebuilt run as its per-device batch).
_NOT_FLAGS = ("processes", "global_batch_size")


def recipe_flags(saved: dict, instead: str) -> list[str]:
    """run_finetune.py flags that train the recipe of the run `saved` (its run_args.json) on its data, without an
    output folder; `instead`: what to do when the run's data is not there any more (the refusal's advice)."""
    if not saved.get("resolved"):
        raise UserError(f"the run's run_args.json has no resolved configuration (written by an earlier version); "
                        f"{instead}")
    base = [*_flags(saved["resolved"]["model"], ModelArguments), *data_flags(saved, instead)]
    recorded, fitted = saved["shaping"], set(saved.get("fitted_fields", ()))
    defaults = _plain(shaping_of(parse_command("finetune", base)))
    training = [part for key, value in recorded.items()
                if key.startswith("training.") and key not in fitted and value != defaults.get(key)
                for part in (f"--{key.split('.', 1)[1]}", _flag_value(value))]
    if "global_batch_size" not in fitted and recorded.get("global_batch_size") != defaults.get("global_batch_size"):
        training += ["--per_device_train_batch_size", str(recorded["global_batch_size"])]
    return [*base, *training]


def data_flags(saved: dict, instead: str) -> list[str]:
    """The run's data flags (its folders whole, checked to be there) that differ from their defaults."""
    data = asdict(data_arguments(saved, instead))
    return _flags({f.name: data[f.name] for f in fields(DataArguments)}, DataArguments)


def check_rebuilt(config: RunConfig, saved: dict, what: str) -> None:
    """Refuse a rebuilt configuration whose settings differ from the run's record (the data-fitted ones aside)."""
    recorded, fitted = saved["shaping"], set(saved.get("fitted_fields", ()))
    now = _plain(shaping_of(config))
    differ = [f"{key.split('.')[-1]} {recorded[key]} -> {now.get(key)}" for key in recorded
              if key not in fitted and key not in _NOT_FLAGS and now.get(key) != recorded[key]]
    if differ:
        raise UserError(f"the run's recipe could not be rebuilt for {what} from its run_args.json ("
                        f"{'; '.join(differ)}); the run may come from another version of this project")


def shaping_of(config: RunConfig) -> dict:
    return shaping(config.model, config.data, config.training)


def _flags(values: dict, kind: type) -> list[str]:
    defaults = {f.name: f.default for f in fields(kind)}
    return [part for name, value in values.items()
            if name in defaults and value is not None and value != defaults[name]
            for part in (f"--{name}", _flag_value(value))]


def _flag_value(value) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    return str(value)


def _plain(record: dict) -> dict:
    """A record as run_args.json holds it (JSON's types), to compare with one read back from the file."""
    return json.loads(json.dumps(record, default=str))
