"""The run's configuration: every flag parsed once, what it names resolved once, and nothing changed afterwards.

`parse_arguments(argv)` reads the flags (`flags.py`) with the model family's recipe as the defaults and resolves
what they name: the checkpoint (`source`, `preset`, `family`: a preset knows its family, another checkpoint is
judged from its config), the augmentation `auto` stands for, the default output folder, the defaults the user's own
flags make impossible. The result is a `RunConfig`: frozen model and data flags and a frozen `TransferConfig`
(trainers/transfer_config.py) for the training flags, which raises when anything sets one of its fields.

What depends on the data is known once the data is loaded (the batch size and length fitted to the training
split, the task's metric, the DataLoader workers, a stream's resume; `fitting.py`): `RunConfig.fitted_to` returns a
new RunConfig whose training flags are built again from the flags as parsed plus those values, as if they had been
passed. The fitted RunConfig is what trains, what `run_args.json` records (run/record.py) and what the tools read
back (`RunConfig.saved`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from types import MappingProxyType

from ..data.augmentation import resolve_augmentation
from ..data.streaming import check_streaming
from ..errors import UserError, check_local_path
from ..models.loading import checkpoint_family
from ..models.presets import find_preset
from ..trainers.distillation_config import DistillationConfig
from ..trainers.transfer_config import TransferConfig
from .fitting import fitted_fields
from .flags import (
    ArgumentParser,
    DataArguments,
    DistillationDataArguments,
    ModelArguments,
    StudentArguments,
    _is_arguments_file,
    arguments_file_flags,
    checkpoint_name,
    data_label,
    given_flags,
)
from .recipes import recipe_defaults

logger = logging.getLogger(__name__)

# The flag classes of each training command: (model, training, data), as `parse_arguments` takes them.
FLAGS = {"finetune": (ModelArguments, TransferConfig, DataArguments),
         "distill": (StudentArguments, DistillationConfig, DistillationDataArguments)}


@dataclass(frozen=True)
class RunConfig:
    """One run, resolved: its flags (model, data, training) and what they named."""

    model: ModelArguments
    data: DataArguments
    training: TransferConfig  # frozen: setting a field raises (TransferConfig.freeze)
    source: str  # the checkpoint the model starts from: a preset's Hub id, or --model_name_or_path
    preset: str | None  # the preset --model named (None for --model_name_or_path)
    family: str  # "cnn" or "vit": which recipe filled the defaults
    recipe: Mapping[str, object]  # the recipe's values, the defaults of the flags nobody passed
    given: frozenset[str]  # the flags the user passed and the recipe's: the data-fitted defaults leave them alone
    passed: frozenset[str]  # the flags the user passed
    argv: tuple[str, ...]  # the command line (an arguments file read into flags)
    inputs: Mapping[str, object]  # the training flags as parsed: what `fitted_to` builds the fitted ones from
    fitted: Mapping[str, object] = dataclasses.field(default_factory=lambda: MappingProxyType({}))  # training flags set from the data (`fitted_to`)

    @property
    def command(self) -> str:
        """`distill`, `finetune`, or `evaluate` (run_finetune.py --do_train false)."""
        if isinstance(self.training, DistillationConfig):
            return "distill"
        return "finetune" if self.training.do_train else "evaluate"

    def fitted_keys(self) -> set[str]:
        """The settings (keys of `record`) that the data will set: those of the flags nobody set (recipes.py)."""
        return fitted_fields(self.training, self.given)

    def fitted_to(self, values: Mapping[str, object]) -> RunConfig:
        """This run with the training flags `values` set from the data: built again, as if they had been passed."""
        if not values:
            return self
        fitted = {**self.fitted, **values}
        training = type(self.training)(**{**self.inputs, **fitted}).freeze()
        return replace(self, training=training, fitted=MappingProxyType(fitted))

    def resolved(self) -> dict:
        """What the flags named and what the data set, for run_args.json (the rest is the flags' own record)."""
        return {"source": self.source, "preset": self.preset, "family": self.family, "recipe": dict(self.recipe),
                "fitted": {k: getattr(v, "value", v) for k, v in self.fitted.items()},
                "model": asdict(self.model), "data": asdict(self.data)}


def parse_arguments(argv: Sequence[str], model_type: type = ModelArguments, training_type: type = TransferConfig,
                    data_type: type = DataArguments) -> RunConfig:
    """Parse `argv` once into a frozen `RunConfig`, with the family's recipe as defaults (`FLAGS` names the classes
    of each command).

    `argv` may start with a JSON or YAML file of arguments (as the transformers examples accept);
    the flags after it override the file.
    """
    argv = [*arguments_file_flags(argv[0]), *argv[1:]] if argv and _is_arguments_file(argv[0]) else list(argv)
    parser = ArgumentParser((model_type, data_type, training_type))
    given = given_flags(parser, argv)
    known, _ = parser.parse_known_args(argv)  # the model flags; argparse alone, no dataclass built
    preset = find_preset(known.model, known.model_name_or_path, model_type.default_model)
    source = preset.checkpoint if preset else known.model_name_or_path
    family = preset.family if preset else checkpoint_family(
        source, from_scratch=known.from_scratch, revision=known.model_revision,
        trust_remote_code=known.trust_remote_code, cache_dir=known.cache_dir)
    name = known.model or (checkpoint_name(source) if known.model_name_or_path else model_type.default_model)
    name = f"{name}-{data_label(known)}"  # one directory per model and data set: runs of other data never collide
    optimizer = str(getattr(known.optim, "value", known.optim)) if "optim" in given else None
    recipe, note = recipe_defaults(known.recipe, family, optimizer)
    if note:
        logger.warning(note)
    suffix = model_type.output_suffix if known.do_train else "-eval"
    parser.set_defaults(output_dir=str(Path("runs") / (name + suffix)), **recipe, **_yielding_defaults(known, given))
    (model, data, training), inputs, unknown = _parse_into_dataclasses(parser, argv)
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if data.train_dir and "dataset_name" not in given:
        data = replace(data, dataset_name=None)  # the image folders are the data: nothing else is recorded or compared
    data = replace(data, augmentation=resolve_augmentation(data.augmentation, data.train_dir or data.dataset_name))
    if data.streaming:
        check_streaming(data, training, given)
    _check_together(model, data, training)
    token = _move_token_to_environment(training)
    if token:  # every spelling (--hub_token X, --hub_token=X, --hub-token X): the record never holds it
        argv = [a.replace(token, "<hub_token>") for a in argv]
    inputs = {**inputs, "hub_token": None}
    return RunConfig(model=model, data=data, training=training.freeze(), source=source,
                     preset=known.model or (model_type.default_model if preset else None), family=family,
                     recipe=MappingProxyType(dict(recipe)), given=frozenset(given | set(recipe)),
                     passed=frozenset(given), argv=tuple(argv), inputs=MappingProxyType(inputs))


def _check_together(model, data, training) -> None:
    """What flags of different sections (model, data, training) make impossible together, before anything loads."""
    if isinstance(training, DistillationConfig):
        check_local_path("--teacher_model_name_or_path", training.teacher_model_name_or_path)  # a typo fails now
        if not training.do_train:
            raise UserError("run_distill.py trains a student; to evaluate a trained one as it is use "
                            "run_finetune.py --model_name_or_path STUDENT --do_train false")
        if training.cache_teacher_logits and (data.augmentation != "none" or data.random_erasing):
            raise UserError(f"--cache_teacher_logits needs --augmentation none and no --random_erasing (this run's "
                            f"augmentation is {data.augmentation}): with augmentation the teacher must see every "
                            "new view of an image")
    elif not training.do_train and (model.from_scratch or training.push_to_hub):
        raise UserError("--do_train false evaluates a trained model as it is: not with --from_scratch (random weights) "
                        "or --push_to_hub (nothing new to push)")


def parse_command(command: str, argv: Sequence[str]) -> RunConfig:
    """`parse_arguments` with the flag classes of `command` ("finetune" or "distill")."""
    return parse_arguments(argv, *FLAGS[command])


def _parse_into_dataclasses(parser: ArgumentParser, argv: list[str]) -> tuple[tuple, dict, list[str]]:
    """The flag dataclasses (model, data, training), the training flags as parsed (the keyword arguments its
    dataclass was built with), and what was not recognised. HfArgumentParser's own loop, keeping the inputs."""
    namespace, unknown = parser.parse_known_args(argv)
    objects, inputs, values = [], {}, vars(namespace)
    for kind in parser.dataclass_types:  # (model, data, training): `inputs` ends as the training flags'
        inputs = {f.name: values[f.name] for f in dataclasses.fields(kind) if f.init and f.name in values}
        try:
            objects.append(kind(**inputs))
        except ValueError as exc:  # the __post_init__ checks (TrainingArguments' own can span several lines)
            raise UserError(" ".join(line.strip() for line in str(exc).strip().splitlines())) from exc
    return tuple(objects), inputs, unknown


def _yielding_defaults(known, given: set[str]) -> dict:
    """Project defaults the user's own flags make impossible give way, each with one line saying so;
    two flags the user gave that conflict are left to fail (the Trainer names them)."""
    changed = {}
    if known.streaming and not {"eval_strategy", "save_strategy"} & given:
        # A stream has no epochs to end: evaluate and save every tenth of --max_steps instead.
        changed.update(eval_strategy="steps", save_strategy="steps", eval_steps=0.1, save_steps=0.1)
        logger.info("--streaming: evaluating and saving every tenth of --max_steps (a stream has no epochs)")
        return changed
    strategies = {"eval_strategy": str(getattr(known.eval_strategy, "value", known.eval_strategy)),
                  "save_strategy": str(getattr(known.save_strategy, "value", known.save_strategy))}
    if "no" in strategies.values():
        if not {"load_best_model_at_end", "early_stopping_patience"} & given:
            off = next(k for k, v in strategies.items() if v == "no")
            changed["load_best_model_at_end"] = False
            logger.info("--%s no: the run ends with its last weights (the best checkpoint cannot be chosen)", off)
    elif {"eval_strategy", "save_strategy"} & given and not {"eval_strategy", "save_strategy"} <= given:
        # One strategy given: the other follows it, so that the best checkpoint can still be reloaded.
        mine = "eval_strategy" if "eval_strategy" in given else "save_strategy"
        other = "save_strategy" if mine == "eval_strategy" else "eval_strategy"
        steps = {"eval_strategy": "eval_steps", "save_strategy": "save_steps"}
        changed[other] = strategies[mine]
        if strategies[mine] == "steps" and getattr(known, steps[mine]) is not None:
            changed[steps[other]] = getattr(known, steps[mine])
        logger.info("--%s %s: --%s follows it (the best checkpoint is chosen where both happen)", mine,
                    strategies[mine], other)
    return changed


def _move_token_to_environment(arguments) -> str | None:
    """`--hub_token` goes where huggingface_hub reads it (HF_TOKEN) and out of the arguments, which
    the Trainer pickles into every checkpoint (training_args.bin) and trackers record. Returns the token, for the
    command line the run records to be cleaned of it."""
    token = getattr(arguments, "hub_token", None)
    if token:
        os.environ["HF_TOKEN"] = token
        arguments.hub_token = None
        # Trackers record the command line (W&B's run metadata): keep the token out of it too.
        sys.argv[:] = [a.replace(token, "<hub_token>") for a in sys.argv]
    return token
