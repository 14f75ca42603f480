"""Command-line arguments: the model and the data flags, and parsing them once with the recipe as defaults.

The training flags are the trainers' own configurations (`TransferConfig`, `DistillationConfig`;
every `TrainingArguments` flag works). The flags are parsed once: argparse reads the model flags
first (no dataclass is built), the checkpoint's family picks its recipe, and the recipe and the
default output directory become the parser's defaults. Every flag the user passes wins, and the
object whose `__post_init__` checked the numbers is the one that trains.
"""

from __future__ import annotations

import json
import logging
import re
from argparse import ArgumentDefaultsHelpFormatter
from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from transformers import HfArgumentParser

from ..data.augmentation import check_augmentation
from ..errors import OneLineArgumentParser, UserError
from ..integrations.compat import field_for_argparse
from ..models.presets import preset_help
from ..trainers.transfer_config import SUPPORTED_OPTIMIZERS
from .recipes import FAMILY_NAMES, RECIPES

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelArguments:
    model: str | None = field(
        default=None,
        metadata={"shapes": True, "help": "Model preset (default resnet50 unless --model_name_or_path is given). "
                          + preset_help().replace("%", "%%")},
    )
    model_name_or_path: str | None = field(
        default=None,
        metadata={"shapes": True, "help": "Any Hub id or local directory of an image-classification checkpoint, "
                          "transformers-native or timm (`timm/...`). Overrides --model."},
    )
    from_scratch: bool = field(
        default=False,
        metadata={"shapes": True, "help": "Random weights: the architecture only, no weight download."},
    )
    image_size: int | None = field(
        default=None,
        metadata={"shapes": True, "help": "Input size in pixels (square). Default: the checkpoint's own input size."},
    )
    crop_pct: float | None = field(
        default=None,
        metadata={"shapes": True, "card": "centre crop (crop_pct)",
                  "help": "Replace the checkpoint's geometry: resize the shorter edge to the input size / crop_pct, keeping the "
                          "aspect ratio, and cut out the centre (1.0: the whole shorter edge, for images whose content "
                          "reaches their border). Default: the checkpoint's own (its processor or timm crop_pct)."},
    )
    recipe: str = field(
        default="default",
        metadata={"shapes": True, "help": "Optimiser/schedule defaults per model family; flags you pass win.",
                  "choices": list(RECIPES)},
    )
    model_revision: str | None = field(default=None, metadata={"shapes": True, "help": "Branch, tag or commit of the checkpoint."})
    trust_remote_code: bool = field(
        default=False, metadata={"shapes": False, "help": "Allow code from the checkpoint's repository to run (off by default)."}
    )
    drop_path_rate: float | None = field(
        default=None,
        metadata={"shapes": True, "card": "drop path rate", "help": "Stochastic depth (drop path) rate for models that have it (timm models, ConvNeXt, Swin, "
                          "BEiT, ...): blocks are skipped at random in training, up to this rate for the last one."},
    )
    cache_dir: str | None = field(
        default=None,
        metadata={"shapes": False, "help": "Where downloaded checkpoints and data sets are stored (default: the Hugging Face cache)."},
    )

    default_model = "resnet50"  # the preset when neither --model nor --model_name_or_path is given
    output_suffix = ""  # runs/<model>-<data set><suffix> is the default output directory

    def __post_init__(self):
        if self.image_size is not None and self.image_size <= 0:
            raise ValueError(f"--image_size must be a positive number of pixels, got {self.image_size}")
        if self.crop_pct is not None and not 0 < self.crop_pct <= 1:
            raise ValueError(f"--crop_pct must be in (0, 1], got {self.crop_pct}")
        if self.drop_path_rate is not None and not 0 <= self.drop_path_rate < 1:
            raise ValueError(f"--drop_path_rate must be in [0, 1), got {self.drop_path_rate}")


@dataclass(frozen=True)
class StudentArguments(ModelArguments):
    """The model being trained by run_distill.py; `--student` is `--model` under its own name."""

    model: str | None = field(
        default=None,
        metadata={"shapes": True, "aliases": ["--student"],
                  "help": "Student preset (default resnet18 unless --student_model_name_or_path is given). "
                          + preset_help().replace("%", "%%")},
    )
    model_name_or_path: str | None = field(
        default=None,
        metadata={"shapes": True, "aliases": ["--student_model_name_or_path"],
                  "help": "Any Hub id or local directory of an image-classification checkpoint for the student."},
    )

    default_model = "resnet18"
    output_suffix = "-distilled"


@dataclass(frozen=True)
class DataArguments:
    dataset_name: str = field(
        default="uoft-cs/cifar10",
        metadata={"shapes": True, "help": "Hub data set id, local directory (parquet repo, save_to_disk or image folder), "
                          "or 'digits' (scikit-learn's bundled digits, no download)."},
    )
    dataset_config_name: str | None = field(default=None, metadata={"shapes": True, "help": "Configuration of the Hub data set."})
    train_dir: str | None = field(default=None, metadata={"shapes": True, "help": "Image folder (one subfolder per class)."})
    validation_dir: str | None = field(default=None, metadata={"shapes": True, "help": "Image folder for validation."})
    test_dir: str | None = field(default=None, metadata={"shapes": True, "help": "Image folder for the final test."})
    # The aliases are the transformers image-classification example's names, so that its commands carry over.
    image_column: str | None = field(
        default=None,
        metadata={"shapes": True, "aliases": ["--image_column_name"], "help": "Image column (default: found from the features)."},
    )
    label_column: str | None = field(
        default=None,
        metadata={"shapes": True, "aliases": ["--label_column_name"], "help": "Label column (default: found from the features)."},
    )
    validation_split: float = field(
        default=0.1,
        metadata={"shapes": True, "aliases": ["--train_val_split"],
                  "help": "Fraction of train held out (stratified, seeded) when the data set has no validation split."},
    )
    max_train_samples: int | None = field(default=None, metadata={"shapes": True, "help": "Use only this many training images."})
    max_eval_samples: int | None = field(
        default=None, metadata={"shapes": True, "help": "Use only this many validation and test images (quick runs)."}
    )
    augmentation: str = field(
        default="auto",
        metadata={"shapes": True, "help": "Training augmentation: a preset (none, crop, flip, basic = crop + flip, rrc = "
                          "random-resized crop, strong, randaugment, "
                          "trivialaugment) or several joined by '+', e.g. crop+randaugment; auto is basic on "
                          "CIFAR-10/100 and none elsewhere (no flips unless known to be safe)."},
    )
    random_erasing: float = field(
        default=0.0,
        metadata={"shapes": True, "card": "random erasing", "help": "Probability of blanking a random rectangle of each training image (after --augmentation)."},
    )
    multi_label: bool = field(
        default=False,
        metadata={"shapes": True, "help": "Several labels per image: a sigmoid per class and binary cross-entropy, mAP and F1 at a "
                          "threshold chosen on validation. Detected when the label column holds lists; this flag "
                          "makes a column of single labels multi-label too (independent scores per class)."},
    )
    skip_corrupt_images: bool = field(
        default=False,
        metadata={"shapes": True, "help": "Decode every image before training and drop (and count) those that fail, instead of "
                          "stopping at the first broken one (with --streaming: skip and count them as they come)."},
    )
    streaming: bool = field(
        default=False,
        metadata={"shapes": True, "help": "Read the train split as a stream, a shard at a time, never whole: a Hub data set or a "
                          "local folder of Parquet/Arrow shards larger than the disk or memory. Needs --max_steps; "
                          "validation (at most --max_eval_samples, default 10,000) and test are read once into the "
                          "cache; a killed run resumes where the stream stopped (docs/guide.md, \"The data path\")."},
    )
    data_check: bool = field(
        default=True,
        metadata={"shapes": False, "help": "Check the data at the start of the run (docs/data-check.md): unreadable and hidden "
                          "files, images smaller than the model's input, class counts, and duplicates within and across "
                          "splits (leaks); one line per finding, data_check.json and data_check.html in --output_dir, "
                          "the leak counts in the results and the card. About 0.3 s per 1,000 small images."},
    )
    on_data_leak: str = field(
        default="warn",
        metadata={"shapes": False, "choices": ["warn", "stop"],
                  "help": "What the data check does when a validation or test image is also in an earlier split "
                          "(exact or near duplicate): warn (log it, count it in the results) or stop before training."},
    )
    shuffle_buffer: int = field(
        default=2000,
        metadata={"shapes": True, "help": "With --streaming: images read and shuffled together, per process and DataLoader "
                          "worker (on top of a shuffled shard order). More mixes better and holds more in memory."},
    )

    def __post_init__(self):
        check_augmentation(self.augmentation)
        if not 0 <= self.random_erasing <= 1:
            raise ValueError(f"--random_erasing must be a probability in [0, 1], got {self.random_erasing}")
        if not 0 < self.validation_split < 1:
            raise ValueError(f"--validation_split must be between 0 and 1 (exclusive), got {self.validation_split}")
        if self.max_train_samples is not None and self.max_train_samples < 1:
            raise ValueError("--max_train_samples must be >= 1")
        if self.max_eval_samples is not None and self.max_eval_samples < 1:
            raise ValueError("--max_eval_samples must be >= 1")
        if self.shuffle_buffer < 1:
            raise ValueError(f"--shuffle_buffer must be >= 1, got {self.shuffle_buffer}")


@dataclass(frozen=True)
class DistillationDataArguments(DataArguments):
    """run_distill.py's data flags: those of fine-tuning, and images without labels (data/unlabeled.py)."""

    unlabeled_dir: str | None = field(
        default=None,
        metadata={"shapes": True, "help": "Images without labels for the teacher to label: every image file under this folder, at any "
                          "depth (folder names are ignored; unreadable files are skipped and counted). They train the "
                          "student through the distillation term only; an image that is also a test image is refused."},
    )
    unlabeled_dataset: str | None = field(
        default=None,
        metadata={"shapes": True, "help": "The same from a Hub or local data set (as --dataset_name takes them); a label column, if "
                          "any, is ignored."},
    )
    unlabeled_split: str = field(default="train", metadata={"shapes": True, "help": "The split of --unlabeled_dataset."})

    def __post_init__(self):
        super().__post_init__()
        if self.unlabeled_dir and self.unlabeled_dataset:
            raise ValueError("pass either --unlabeled_dir or --unlabeled_dataset, not both")


class _HelpFormatter(ArgumentDefaultsHelpFormatter):
    """Shows the defaults a run really uses: a recipe's per-family values where the recipe sets the flag."""

    def _get_help_string(self, action):
        family_defaults = getattr(action, "family_defaults", None)
        if family_defaults:
            return f"{action.help or ''} (default: {family_defaults})".replace("%", "%%")
        if "default" in (action.help or "").lower():  # the help says it better than "(default: None)"
            return action.help
        return super()._get_help_string(action)


class ArgumentParser(OneLineArgumentParser, HfArgumentParser):
    """HfArgumentParser whose errors are one line with a "did you mean" (`errors.OneLineArgumentParser`), and a
    --help that shows each recipe's defaults per model family.
    Abbreviated flags are refused (argparse would take `--per_device_train_bat` for
    `--per_device_train_batch_size`): every flag is spelled out, so what was given is known exactly."""

    def __init__(self, types):
        super().__init__(types, formatter_class=_HelpFormatter, allow_abbrev=False)
        for action in self._actions:
            values = {family: recipe[action.dest] for family, recipe in RECIPES["default"].items()
                      if action.dest in recipe}
            if values:
                action.family_defaults = ", ".join(f"{v} for {FAMILY_NAMES[f]}" for f, v in values.items())
            if action.dest == "optim":
                action.choices = SUPPORTED_OPTIMIZERS  # the ones TransferTrainer can build from its parameter groups

    @staticmethod
    def _parse_dataclass_field(parser, field):
        HfArgumentParser._parse_dataclass_field(parser, field_for_argparse(field))  # compat.py


def data_arguments(saved: dict, instead: str) -> DistillationDataArguments:
    """The data flags a saved run used (its run_args.json), whatever the working folder: as the run resolved them
    (local folders whole, run/record.py). A run recorded before it kept them whole (no `working_dir`) has its
    command line parsed again: its relative folders are relative to the folder it was started in, which it did not
    record. A folder of the run's data that is not there is refused in one line, with what to do `instead`."""
    names = {f.name for f in fields(DistillationDataArguments)}
    if saved.get("resolved"):  # the run's data flags as it resolved them
        data = DistillationDataArguments(**{k: v for k, v in saved["resolved"]["data"].items() if k in names})
    elif "working_dir" in saved:  # the settings that shape training, local folders whole
        recorded = {key.split(".", 1)[1]: value for key, value in saved["shaping"].items() if key.startswith("data.")}
        data = DistillationDataArguments(**{key: value for key, value in recorded.items() if key in names})
    else:
        argv = list(saved["argv"])
        if argv and _is_arguments_file(argv[0]):
            if not Path(argv[0]).is_file():
                raise UserError(f"the run's arguments file '{argv[0]}' is relative to the folder the run was started "
                                f"in, which a run saved by an earlier version does not record; run the command from "
                                f"that folder, or {instead}")
            argv = [*arguments_file_flags(argv[0]), *argv[1:]]
        data, _ = ArgumentParser((DistillationDataArguments,)).parse_args_into_dataclasses(
            args=argv, return_remaining_strings=True)
        if data.train_dir and not any(a.split("=")[0] == "--dataset_name" for a in argv):
            data = replace(data, dataset_name=None)  # as parse_arguments: the image folders are the data
    for flag in ("dataset_name", "train_dir", "validation_dir", "test_dir"):  # (what loading the data reads)
        folder = getattr(data, flag)
        local = folder and (flag.endswith("_dir") or folder.startswith((".", "/", "~")))  # (else maybe a Hub id)
        if not local or Path(folder).expanduser().is_dir():
            continue
        if "working_dir" in saved or Path(folder).expanduser().is_absolute():
            raise UserError(f"the run's --{flag} '{folder}' is not a folder any more; {instead}")
        raise UserError(f"the run's --{flag} '{folder}' is relative to the folder the run was started in, which a "
                        f"run saved by an earlier version does not record; run the command from that folder, or "
                        f"{instead}")
    return data


def checkpoint_name(source: str) -> str:
    """What the default output directory calls a checkpoint: its folder's name, and for a checkpoint-N folder the
    run's too (`x-checkpoint-209` for runs/x/checkpoint-209: every run has a checkpoint-209)."""
    folder = Path(source)
    if re.fullmatch(r"checkpoint-\d+", folder.name) and folder.resolve().parent.name:
        return f"{folder.resolve().parent.name}-{folder.name}"
    return folder.name


def data_label(known) -> str:
    """What the default output directory calls the data set: the image folder's name (its parent's, for a folder
    called train), or the data set's (`cifar10` for uoft-cs/cifar10)."""
    if known.train_dir:
        folder = Path(known.train_dir).resolve()
        return folder.parent.name if folder.name.lower() in ("train", "training") and folder.parent.name else folder.name
    return Path(str(known.dataset_name).rstrip("/")).name or "data"


def _is_arguments_file(first: str) -> bool:
    return not first.startswith("-") and first.endswith((".json", ".yaml", ".yml"))


def arguments_file_flags(path: str) -> list[str]:
    """A JSON/YAML file of {flag: value} as command-line flags."""
    file = Path(path)
    if not file.is_file():
        raise UserError(f"arguments file '{path}' does not exist")
    try:
        if file.suffix == ".json":
            values = json.loads(file.read_text())
        else:
            import yaml

            values = yaml.safe_load(file.read_text())
    except ValueError as exc:  # json.JSONDecodeError, yaml.YAMLError are ValueErrors or carry a line
        raise UserError(f"arguments file '{path}' cannot be read: {str(exc).splitlines()[0]}") from exc
    except Exception as exc:  # yaml's errors
        raise UserError(f"arguments file '{path}' cannot be read: {str(exc).splitlines()[0]}") from exc
    if not isinstance(values, dict):
        raise UserError(f"arguments file '{path}' must hold a mapping of flag names to values")
    flags = []
    for key, value in values.items():
        if value is None:
            continue
        flags.append(f"--{key}")
        if isinstance(value, bool):
            flags.append(str(value).lower())
        elif isinstance(value, (list, tuple)):
            flags.extend(str(v) for v in value)
        elif isinstance(value, dict):
            flags.append(json.dumps(value))
        else:
            flags.append(str(value))
    return flags


def given_flags(parser: ArgumentParser, argv: Sequence[str]) -> set[str]:
    """The fields the flags in `argv` set, however they are spelled: `--name value` or `--name=value`, with
    underscores or dashes, an alias (`--train_val_split`) or a `--no_` complement."""
    field_of = {option: action.dest for action in parser._actions for option in action.option_strings}
    return {field_of.get(flag, flag[2:]) for flag in (a.split("=", 1)[0] for a in argv if a.startswith("--"))}
