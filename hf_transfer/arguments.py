"""Command-line arguments: dataclasses parsed by `HfArgumentParser`, recipes, and their checks.

Every `TrainingArguments` flag works. `TransferTrainingArguments` only changes defaults to
what image fine-tuning needs (per-epoch evaluation and model selection on validation
accuracy, `remove_unused_columns=False` for the on-the-fly transforms, ...).

Recipes: CNNs and ViTs want different optimisers. A recipe is a set of TrainingArguments
flags per model family, placed *before* the user's flags, so anything given on the
command line wins (`--recipe tutorial` reproduces the tutorial's settings).
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import HfArgumentParser, TrainingArguments

from .augment import AUGMENTATIONS
from .errors import UserError
from .freezing import parse_schedule
from .models import preset_help

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


def _default_workers() -> int:
    """DataLoader workers per process: the cores this process may use, less one for the main loop."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    per_process = cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(0, min(8, per_process - 1))


@dataclass
class ModelArguments:
    model: str | None = field(
        default=None,
        metadata={"help": "Model preset (default resnet50 unless --model_name_or_path is given). "
                          + preset_help().replace("%", "%%")},
    )
    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Any Hub id or local directory of an image-classification checkpoint, "
                          "transformers-native or timm (`timm/...`). Overrides --model."},
    )
    from_scratch: bool = field(
        default=False,
        metadata={"help": "Random weights: the architecture only, no weight download."},
    )
    image_size: int | None = field(
        default=None,
        metadata={"help": "Input size in pixels (square). Default: the checkpoint's own input size."},
    )
    recipe: str = field(
        default="default",
        metadata={"help": "Optimiser/schedule defaults per model family; flags you pass win.",
                  "choices": list(RECIPES)},
    )
    model_revision: str | None = field(default=None, metadata={"help": "Branch, tag or commit of the checkpoint."})
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Allow code from the checkpoint's repository to run (off by default)."}
    )

    def run_name_default(self) -> str:
        """Name of the default output directory: the preset, or the checkpoint's last path component."""
        return self.model or (Path(self.model_name_or_path).name if self.model_name_or_path else "resnet50")


@dataclass
class StudentArguments(ModelArguments):
    """The model being trained by run_distill.py; `--student` is `--model` under its own name."""

    model: str | None = field(
        default=None,
        metadata={"aliases": ["--student"], "help": "Student preset (default resnet18). Same presets as run_finetune.py."},
    )
    model_name_or_path: str | None = field(
        default=None,
        metadata={"aliases": ["--student_model_name_or_path"],
                  "help": "Any Hub id or local directory of an image-classification checkpoint for the student."},
    )

    def run_name_default(self) -> str:
        return (self.model or (Path(self.model_name_or_path).name if self.model_name_or_path else "resnet18")) + "-distilled"


@dataclass
class DistillationArguments:
    teacher_model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "The teacher: an output directory of run_finetune.py, or any Hub/local image-classification "
                          "checkpoint fine-tuned on the same labels."},
    )
    teacher_revision: str | None = field(default=None, metadata={"help": "Branch, tag or commit of the teacher."})
    alpha: float = field(
        default=0.5,
        metadata={"help": "Weight of the distillation (KL) term, in [0, 1]; the label cross-entropy gets 1 - alpha. "
                          "0 is plain fine-tuning, 1 ignores the labels."},
    )
    temperature: float = field(
        default=2.0, metadata={"help": "Softmax temperature (> 0) of the distillation term; the term is scaled by T^2."}
    )
    cache_teacher_logits: bool = field(
        default=False,
        metadata={"help": "Compute the teacher's logits once per training image and reuse them every epoch "
                          "(only with --augmentation none; stored in the output directory)."},
    )


@dataclass
class DataArguments:
    dataset_name: str = field(
        default="uoft-cs/cifar10",
        metadata={"help": "Hub data set id, local directory (parquet repo, save_to_disk or image folder), "
                          "or 'digits' (scikit-learn's bundled digits, no download)."},
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "Configuration of the Hub data set."})
    train_dir: str | None = field(default=None, metadata={"help": "Image folder (one subfolder per class)."})
    validation_dir: str | None = field(default=None, metadata={"help": "Image folder for validation."})
    test_dir: str | None = field(default=None, metadata={"help": "Image folder for the final test."})
    image_column: str | None = field(default=None, metadata={"help": "Image column (default: found from the features)."})
    label_column: str | None = field(default=None, metadata={"help": "Label column (default: found from the features)."})
    validation_split: float = field(
        default=0.1,
        metadata={"help": "Fraction of train held out (stratified, seeded) when the data set has no validation split."},
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only this many training images."})
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "Use only this many validation and test images (quick runs)."}
    )
    augmentation: str = field(
        default="auto",
        metadata={"help": "Training augmentation: none, crop (random crop, 1/8 padding), basic (crop + horizontal flip), "
                          "strong; auto is basic on CIFAR-10/100 and none elsewhere (no flips unless known to be safe).",
                  "choices": list(AUGMENTATIONS)},
    )
    skip_corrupt_images: bool = field(
        default=False,
        metadata={"help": "Decode every image before training and drop (and count) those that fail, instead of "
                          "stopping at the first broken one."},
    )


@dataclass
class TransferTrainingArguments(TrainingArguments):
    output_dir: str | None = field(
        default=None, metadata={"help": "Where the model, checkpoints and results go (default runs/<model>)."}
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Start afresh in an output directory that already holds files (its old checkpoints are removed)."},
    )
    early_stopping_patience: int | None = field(
        default=None, metadata={"help": "Stop after this many evaluations without a better validation accuracy."}
    )
    # Transfer strategies (README, "Transfer strategies")
    freeze_backbone: bool = field(default=False, metadata={"help": "Linear probe: only the classification head trains."})
    unfreeze_schedule: str | None = field(
        default=None,
        metadata={"help": "Gradual unfreezing, EPOCH:STAGE pairs from epoch 0, e.g. \"0:head,2:last_stage,4:all\". "
                          "Stages: head, last_stage (ResNet layer4 / last quarter of ViT blocks), all."},
    )
    backbone_lr_scale: float = field(
        default=1.0, metadata={"help": "The backbone trains at learning_rate x this; the head at learning_rate."}
    )
    layer_decay: float | None = field(
        default=None,
        metadata={"help": "Layer-wise learning-rate decay in (0, 1]: each block/stage below the head gets this factor once more."},
    )
    lr_step_size: float | None = field(
        default=None,
        metadata={"help": "Step decay (the tutorial's StepLR): multiply the learning rate by --lr_step_gamma every this many "
                          "epochs. Replaces --lr_scheduler_type."},
    )
    lr_step_gamma: float = field(default=0.1, metadata={"help": "Factor of the step decay."})
    mixup: float = field(default=0.0, metadata={"help": "Mixup alpha (0: off); a draw per sample, on the device."})
    cutmix: float = field(default=0.0, metadata={"help": "CutMix alpha (0: off); a box per sample, on the device."})
    max_nan_steps: int = field(
        default=0,
        metadata={"help": "Training steps with a NaN/inf loss to skip before stopping the run (0: stop at the first)."},
    )
    min_train_steps: int = field(
        default=200,
        metadata={"help": "Unless --num_train_epochs or --max_steps is given: train 3 epochs, or as many more as it takes "
                          "to reach this many optimizer steps (small data sets need many epochs); 0 turns it off."},
    )
    channels_last: bool | None = field(
        default=None,
        metadata={"help": "Channels-last memory format for CNNs (faster convolutions with tensor cores). "
                          "Default: on for CNNs when training on a GPU."},
    )

    # Defaults that differ from TrainingArguments':
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Keep False: the on-the-fly transforms need the raw columns."}
    )
    per_device_train_batch_size: int = field(default=128, metadata={"help": "Batch size per device for training."})
    per_device_eval_batch_size: int = field(default=256, metadata={"help": "Batch size per device for evaluation."})
    eval_strategy: str = field(default="epoch", metadata={"help": "When to evaluate on the validation split."})
    save_strategy: str = field(default="epoch", metadata={"help": "When to save a checkpoint."})
    logging_steps: float = field(default=50, metadata={"help": "Log every this many steps."})
    save_total_limit: int | None = field(default=2, metadata={"help": "Keep at most this many checkpoints (best kept)."})
    load_best_model_at_end: bool = field(
        default=True, metadata={"help": "Finish with the checkpoint of best validation accuracy."}
    )
    metric_for_best_model: str | None = field(default="accuracy", metadata={"help": "Metric for model selection."})
    hub_strategy: str = field(
        default="end",
        metadata={"help": "With --push_to_hub: 'end' pushes the finished run once (model, processor, card, results); "
                          "'every_save', 'checkpoint', 'all_checkpoints' also push during training (the Trainer's)."},
    )
    dataloader_num_workers: int = field(
        default_factory=_default_workers, metadata={"help": "DataLoader worker processes per process (default: cores - 1)."}
    )
    dataloader_persistent_workers: bool = field(
        default=True, metadata={"help": "Keep DataLoader workers alive between epochs (when there are workers)."}
    )

    def __post_init__(self):
        if (self.freeze_backbone or self.unfreeze_schedule) and self.ddp_find_unused_parameters is None:
            self.ddp_find_unused_parameters = True  # frozen parameters get no gradient (freezing.py)
        if self.dataloader_num_workers == 0:
            self.dataloader_persistent_workers = False  # the DataLoader refuses it without workers
        if not torch.cuda.is_available():
            self.dataloader_pin_memory = False  # pinned memory only helps copies to a GPU
        super().__post_init__()


class ArgumentParser(HfArgumentParser):
    """HfArgumentParser whose errors are one line (argparse would print the whole usage first)."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see --help)\n")


def parse_arguments(argv: Sequence[str] | None, types: tuple) -> tuple:
    """Parse `argv` into the dataclasses `types`; a bad combination is a one-line UserError."""
    parser = ArgumentParser(types)
    try:
        parsed = parser.parse_args_into_dataclasses(args=list(argv) if argv is not None else None)
    except ValueError as exc:  # TrainingArguments.__post_init__ checks, some of them several lines long
        raise UserError(" ".join(line.strip() for line in str(exc).strip().splitlines())) from exc
    for arguments in parsed:
        _move_token_to_environment(arguments)
    return parsed


def _move_token_to_environment(arguments) -> None:
    """`--hub_token` goes where huggingface_hub reads it (HF_TOKEN) and out of the arguments, which
    the Trainer pickles into every checkpoint (training_args.bin) and trackers record."""
    token = getattr(arguments, "hub_token", None)
    if token:
        os.environ["HF_TOKEN"] = token
        arguments.hub_token = None
        # Trackers record the command line (W&B's run metadata): keep the token out of it too.
        sys.argv[:] = [a.replace(token, "<hub_token>") for a in sys.argv]


def recipe_flags(recipe: str, family: str) -> list[str]:
    flags = []
    for key, value in RECIPES[recipe][family].items():
        flags += [f"--{key}", str(value)]
    return flags


def validate_numbers(model_args: ModelArguments, data_args: DataArguments, args: TransferTrainingArguments) -> None:
    """Checks that must fail before any data or weights are downloaded (README, "Validated arguments")."""
    checks = [
        (args.learning_rate > 0, f"--learning_rate must be > 0, got {args.learning_rate}"),
        (args.per_device_train_batch_size >= 1,
         f"--per_device_train_batch_size must be >= 1, got {args.per_device_train_batch_size}"),
        (args.per_device_eval_batch_size >= 1,
         f"--per_device_eval_batch_size must be >= 1, got {args.per_device_eval_batch_size}"),
        (args.num_train_epochs > 0 or args.max_steps > 0, "--num_train_epochs must be > 0 (or set --max_steps)"),
        (args.gradient_accumulation_steps >= 1, "--gradient_accumulation_steps must be >= 1"),
        (0 < data_args.validation_split < 1,
         f"--validation_split must be between 0 and 1 (exclusive), got {data_args.validation_split}"),
        (model_args.image_size is None or model_args.image_size > 0,
         f"--image_size must be a positive number of pixels, got {model_args.image_size}"),
        (data_args.max_train_samples is None or data_args.max_train_samples >= 1, "--max_train_samples must be >= 1"),
        (data_args.max_eval_samples is None or data_args.max_eval_samples >= 1, "--max_eval_samples must be >= 1"),
        (args.early_stopping_patience is None or args.early_stopping_patience >= 1,
         "--early_stopping_patience must be >= 1"),
        (args.dataloader_num_workers >= 0, "--dataloader_num_workers must be >= 0"),
        (args.backbone_lr_scale >= 0, f"--backbone_lr_scale must be >= 0, got {args.backbone_lr_scale}"),
        (args.layer_decay is None or 0 < args.layer_decay <= 1, f"--layer_decay must be in (0, 1], got {args.layer_decay}"),
        (args.lr_step_size is None or args.lr_step_size > 0, f"--lr_step_size must be > 0 epochs, got {args.lr_step_size}"),
        (0 < args.lr_step_gamma <= 1, f"--lr_step_gamma must be in (0, 1], got {args.lr_step_gamma}"),
        (args.mixup >= 0 and args.cutmix >= 0, "--mixup and --cutmix must be >= 0"),
        (args.max_nan_steps >= 0, f"--max_nan_steps must be >= 0, got {args.max_nan_steps}"),
        (0 <= args.label_smoothing_factor < 1, f"--label_smoothing_factor must be in [0, 1), got {args.label_smoothing_factor}"),
        (not (args.freeze_backbone and args.unfreeze_schedule), "pass either --freeze_backbone or --unfreeze_schedule, not both"),
    ]
    for ok, message in checks:
        if not ok:
            raise UserError(message)
    if model_args.model and model_args.model_name_or_path:
        raise UserError("pass either --model or --model_name_or_path, not both")
    freeze_schedule(args)  # checks the schedule's syntax and stage names


def freeze_schedule(args) -> list[tuple[int, str]] | None:
    """The unfreezing schedule the flags ask for, or None when everything trains from the start."""
    if args.freeze_backbone:
        return [(0, "head")]
    return parse_schedule(args.unfreeze_schedule) if args.unfreeze_schedule else None


def validate_distillation(distill_args: DistillationArguments, data_args: DataArguments,
                          args: TransferTrainingArguments) -> None:
    if not distill_args.teacher_model_name_or_path:
        raise UserError("pass --teacher_model_name_or_path (an output directory of run_finetune.py or a Hub id)")
    if not 0.0 <= distill_args.alpha <= 1.0:
        raise UserError(f"--alpha must be in [0, 1], got {distill_args.alpha}")
    if distill_args.temperature <= 0:
        raise UserError(f"--temperature must be > 0, got {distill_args.temperature}")
    if distill_args.cache_teacher_logits and (data_args.augmentation != "none" or args.mixup or args.cutmix):
        raise UserError("--cache_teacher_logits needs --augmentation none and no --mixup/--cutmix: with "
                        "augmentation the teacher must see every new view of an image")


def _given(argv: Sequence[str], name: str) -> bool:
    return any(a == f"--{name}" or a.startswith(f"--{name}=") for a in argv)


def given_flags(argv: Sequence[str], recipe: str | None = None, family: str | None = None) -> set[str]:
    """The names of the flags the user passed, plus those the recipe sets: what data-fitted defaults must not touch."""
    names = {a[2:].split("=", 1)[0] for a in argv if a.startswith("--")}
    if recipe is not None and family is not None:
        names |= set(RECIPES[recipe][family])
    return names


def fit_to_data(args: TransferTrainingArguments, num_train: int, given: set[str]) -> list[str]:
    """Defaults that depend on the training set's size, for the flags nobody set; returns what changed.

    - Batch size: at most a tenth of the training set (at least 8), so that an epoch has about
      ten optimizer steps or more; the default 128 is meant for CIFAR-sized data.
    - Length: the default 3 epochs, or more until `--min_train_steps` optimizer steps. 100
      real digits at batch 10 reach 0.87 test accuracy in 15 epochs and 0.96 in 20 (one seed,
      benchmarks/transfer.py): on small data the number of updates, not of epochs, decides.
    """
    changes = []
    processes = max(1, args.world_size)
    if "per_device_train_batch_size" not in given:
        cap = max(8, num_train // 10)
        global_batch = args.per_device_train_batch_size * args.gradient_accumulation_steps * processes
        if global_batch > cap:
            args.per_device_train_batch_size = max(1, cap // (args.gradient_accumulation_steps * processes))
            changes.append(f"--per_device_train_batch_size {args.per_device_train_batch_size} "
                           f"(a tenth of the {num_train} training images)")
    if not ({"num_train_epochs", "max_steps"} & given) and args.min_train_steps > 0:
        global_batch = args.per_device_train_batch_size * args.gradient_accumulation_steps * processes
        steps_per_epoch = max(1, math.ceil(num_train / global_batch))
        epochs = math.ceil(args.min_train_steps / steps_per_epoch)
        if epochs > args.num_train_epochs:
            args.num_train_epochs = float(epochs)
            changes.append(f"--num_train_epochs {epochs} ({epochs * steps_per_epoch} steps; --min_train_steps "
                           f"{args.min_train_steps})")
    return changes


def parse_with_defaults(argv: Sequence[str], types: tuple, family: str | None = None) -> tuple:
    """Parse `argv`, filling what the user left out: `--output_dir runs/<model>`, and, once the
    model family is known, the recipe's flags. User flags come last, so they always win."""
    argv = list(argv)
    parsed = parse_arguments(argv, types)
    prefix = []
    if not _given(argv, "output_dir"):
        prefix += ["--output_dir", str(Path("runs") / parsed[0].run_name_default())]
    if family is not None:
        prefix += recipe_flags(parsed[0].recipe, family)
    return parse_arguments(prefix + argv, types) if prefix else parsed
