"""`TransferConfig`: the fine-tuning trainer's configuration, a `TrainingArguments` with the project's fields."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from functools import cache
from importlib.util import find_spec

import torch
from transformers import TrainingArguments
from transformers.utils import is_torch_bf16_gpu_available

from ..tasks.classification import metric_name
from .freezing import parse_schedule
from .selection import TIE_BREAKS

# Optimizers `TransferTrainer.create_optimizer` can build from its parameter groups: torch-style classes that
# take groups and per-group learning rates. The Trainer's others (GaLore, LOMO, APOLLO, bitsandbytes, schedule-free,
# ...) need their own construction or parameter selection.
SUPPORTED_OPTIMIZERS = ("adamw_torch", "adamw_torch_fused", "adafactor", "sgd", "adagrad", "rmsprop")


def _default_workers() -> int:
    """DataLoader workers per process: on a GPU machine, the cores this process may use less one for the main
    loop (at most 8); on a CPU-only one, none. There the model's threads use every core, and workers decoding
    beside them cost more than they save (benchmarks/benchmark.py); small data sets are decoded once anyway."""
    if not torch.cuda.is_available():
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    per_process = cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(0, min(8, per_process - 1))


# Fields the Trainer sets on its arguments itself (transformers 5.x: DeepSpeed's configuration; with
# --auto_find_batch_size the batch size it finds).
TRAINER_SETS = frozenset({"hf_deepspeed_config", "deepspeed_plugin"})


class FrozenConfigError(AttributeError):
    """Project code set a field of a resolved configuration: a bug, not a user's mistake."""


@cache
def _init_fields(cls) -> frozenset[str]:
    return frozenset(f.name for f in fields(cls) if f.init)


@dataclass
class TransferConfig(TrainingArguments):
    """`TrainingArguments` with the project's own fields and image fine-tuning defaults, checked here.

    Read by `TransferTrainer` from `self.args`. Only defaults change for the Trainer's own fields
    (per-epoch evaluation and model selection on validation accuracy, `remove_unused_columns=False`
    for the on-the-fly transforms, ...); every `TrainingArguments` flag works.
    """

    output_dir: str | None = field(
        default=None, metadata={"shapes": False, "help": "Where the model, checkpoints and results go (default runs/<model>-<data set>)."}
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"shapes": False, "help": "Start afresh in an output directory that already holds files (its old checkpoints are removed)."},
    )
    early_stopping_patience: int | None = field(
        default=None, metadata={"shapes": True, "card": "early stopping patience", "help": "Stop after this many evaluations without a better validation accuracy."}
    )
    # Transfer strategies (README, "Transfer strategies")
    freeze_backbone: bool = field(default=False, metadata={"shapes": True, "help": "Linear probe: only the classification head trains."})
    unfreeze_schedule: str | None = field(
        default=None,
        metadata={"shapes": True, "help": "Gradual unfreezing, EPOCH:STAGE pairs from epoch 0, e.g. \"0:head,2:last_stage,4:all\". "
                          "Stages: head, last_stage (ResNet layer4 / last quarter of ViT blocks), all."},
    )
    backbone_lr_scale: float = field(
        default=1.0, metadata={"shapes": True, "card": "backbone lr scale", "help": "The backbone trains at learning_rate x this; the head at learning_rate."}
    )
    layer_decay: float | None = field(
        default=None,
        metadata={"shapes": True, "card": "layer decay", "help": "Layer-wise learning-rate decay in (0, 1]: each block/stage below the head gets this factor once more."},
    )
    lr_step_size: float | None = field(
        default=None,
        metadata={"shapes": True, "help": "Step decay (the tutorial's StepLR): multiply the learning rate by --lr_step_gamma every this many "
                          "epochs. Replaces --lr_scheduler_type."},
    )
    lr_step_gamma: float = field(default=0.1, metadata={"shapes": True, "help": "Factor of the step decay."})
    mixup: float = field(default=0.0, metadata={"shapes": True, "card": "mixup", "help": "Mixup alpha (0: off); a draw per sample, on the device."})
    cutmix: float = field(default=0.0, metadata={"shapes": True, "card": "cutmix", "help": "CutMix alpha (0: off); a box per sample, on the device."})
    max_nan_steps: int = field(
        default=0,
        metadata={"shapes": True, "help": "Training steps with a NaN/inf loss to skip before stopping the run (0: stop at the first)."},
    )
    class_weights: str | None = field(
        default=None,
        metadata={"shapes": True, "card": "class weights", "help": "Weight the cross-entropy per class, for imbalanced data: 'auto' (inversely to each class's "
                          "share of the training set) or one weight per class, comma-separated."},
    )
    ema_decay: float | None = field(
        default=None,
        metadata={"shapes": True, "card": "weight EMA decay", "help": "Keep an exponential moving average of the weights with this decay per optimizer step "
                          "(e.g. 0.999; timm's ModelEmaV3 with warm-up); it is evaluated, chosen by and saved. "
                          "Off by default."},
    )
    min_train_steps: int = field(
        default=200,
        metadata={"shapes": True, "help": "Unless --num_train_epochs or --max_steps is given: train 3 epochs, or as many more as it takes "
                          "to reach this many optimizer steps (small data sets need many epochs); 0 turns it off."},
    )
    min_seen_images: int = field(
        default=0,
        metadata={"shapes": True, "help": "Unless --num_train_epochs or --max_steps is given: also train until this many images have been "
                          "seen, repeats counted (run_distill.py: 18,000, a patient teacher on small data); 0 turns it off."},
    )
    precise_bn_images: int = field(
        default=2048,
        metadata={"shapes": True, "card": "BatchNorm statistics recomputed from (images)", "help": "Before each evaluation in training (and at its end), recompute the running statistics of "
                          "BatchNorm layers from this many training images with the current weights, so that what is "
                          "evaluated, chosen and saved matches the weights (trainers/batchnorm.py); 0 turns it off. "
                          "Models without BatchNorm (ViTs) are not affected."},
    )
    calibrate: bool = field(
        default=True,
        metadata={"shapes": True, "card": "calibration (temperature folded into the classifier)",
                  "help": "After training, fit one temperature on the validation predictions and fold it into the "
                          "classifier's last layer, so that the saved model's probabilities are calibrated (its top-1 "
                          "unchanged; docs/calibration.md); false leaves the weights as training made them."},
    )
    channels_last: bool | None = field(
        default=None,
        metadata={"shapes": False, "help": "Channels-last memory format for CNNs (faster convolutions with tensor cores). "
                          "Default: on for CNNs when training on a GPU."},
    )

    # Defaults that differ from TrainingArguments':
    do_train: bool = field(
        default=True, metadata={"shapes": False, "help": "Train (--do_train false: evaluate --model_name_or_path as it is)."}
    )
    do_eval: bool = field(default=True, metadata={"shapes": False, "help": "Evaluate the final model on the validation split."})
    do_predict: bool = field(
        default=True,
        metadata={"shapes": False, "help": "Evaluate the final model once on the test split (metrics, confusion matrix, predictions)."},
    )
    remove_unused_columns: bool = field(
        default=False, metadata={"shapes": False, "help": "Keep False: the on-the-fly transforms need the raw columns."}
    )
    num_train_epochs: float = field(
        default=3.0,
        metadata={"shapes": True, "help": "Training epochs; unless this or --max_steps is given, small data sets train longer "
                          "(--min_train_steps)."},
    )
    per_device_train_batch_size: int = field(
        default=128,
        metadata={"shapes": False, "help": "Batch size per device for training; unless given, at most a tenth of the training set."},
    )
    per_device_eval_batch_size: int = field(default=256, metadata={"shapes": False, "help": "Batch size per device for evaluation."})
    eval_strategy: str = field(default="epoch", metadata={"shapes": True, "help": "When to evaluate on the validation split."})
    save_strategy: str = field(default="epoch", metadata={"shapes": False, "help": "When to save a checkpoint."})
    logging_steps: float = field(
        default=0.02,
        metadata={"shapes": False, "help": "Log every this many steps, or, below 1, this fraction of the run (0.02: 50 points per run, "
                          "however short, for the loss curves)."},
    )
    save_total_limit: int | None = field(default=2, metadata={"shapes": False, "help": "Keep at most this many checkpoints (best kept)."})
    load_best_model_at_end: bool = field(
        default=True, metadata={"shapes": True, "help": "Finish with the checkpoint of best validation accuracy."}
    )
    metric_for_best_model: str | None = field(default="accuracy", metadata={"shapes": True, "help": "Metric for model selection."})
    # benchmarks/selection.py: on 5 to 50 validation images a tie to the later checkpoint kept weights closer to the
    # last ones on test than a tie to the lower validation loss, in every regime measured (docs/guide.md).
    best_model_tie_break: str = field(
        default="last",
        metadata={"shapes": True, "card": "tie on the selection metric broken by",
                  "help": "Which of two checkpoints with the same --metric_for_best_model to keep (a small validation split "
                          "saturates, e.g. accuracy 1.0 from the first epoch): 'last', the later one, or 'loss', the "
                          "lower validation loss (the Trainer alone keeps the first). Early stopping counts a tie won "
                          "by a lower loss as an improvement; a plateau still stops the run."},
    )
    best_model_min_images: int = field(
        default=0,
        metadata={"shapes": True, "card": "fewest validation images that choose a checkpoint",
                  "help": "With fewer validation images than this, no checkpoint is chosen: the run keeps its last "
                          "weights and says so (0: always choose; run_distill.py: 144, measured)."},
    )
    hub_strategy: str = field(
        default="end",
        metadata={"shapes": False, "help": "With --push_to_hub: 'end' pushes the finished run once (model, processor, card, results); "
                          "'every_save', 'checkpoint', 'all_checkpoints' also push during training (the Trainer's)."},
    )
    dataloader_num_workers: int = field(
        default_factory=_default_workers,
        metadata={"shapes": False, "help": "DataLoader worker processes per process (default: cores - 1 up to 8 with a GPU, 0 without)."}
    )
    dataloader_persistent_workers: bool = field(
        default=True, metadata={"shapes": False, "help": "Keep DataLoader workers alive between epochs (when there are workers)."}
    )
    logging_nan_inf_filter: bool = field(
        default=False,
        metadata={"shapes": False, "help": "The Trainer's filter that keeps NaN/inf losses out of the logged loss. Off: it reads the loss "
                          "on the host every step (on a GPU the CPU waits for the device each time), and a NaN/inf "
                          "loss stops the run or is skipped anyway (--max_nan_steps)."},
    )

    def __post_init__(self):
        if self.metric_for_best_model:  # one spelling of `eval_loss` and `loss` (the Trainer takes both): runs compare
            self.metric_for_best_model = metric_name(self.metric_for_best_model)
        if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
            if find_spec("deepspeed") is None:
                raise ValueError("the accelerate config asks for DeepSpeed, which is not installed: "
                                 "pip install 'hf-vision-transfer[deepspeed]'")
            if not (self.bf16 or self.fp16):
                # DeepSpeed takes its precision from the accelerate config; the Trainer refuses arguments that differ.
                launched = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
                self.bf16, self.fp16 = launched == "bf16", launched == "fp16"
        self._check()
        if self.ddp_find_unused_parameters is None:
            # Frozen parameters get no gradient (trainers/freezing.py); otherwise every parameter has one, and the
            # Trainer's default (True for transformers models) only costs a graph traversal and a torch warning.
            self.ddp_find_unused_parameters = bool(self.freeze_backbone or self.unfreeze_schedule)
        if self.dataloader_num_workers == 0:
            self.dataloader_persistent_workers = False  # the DataLoader refuses it without workers
        if not torch.cuda.is_available():
            self.dataloader_pin_memory = False  # pinned memory only helps copies to a GPU
        if self.dataloader_pin_memory and (self.accelerator_config is None or isinstance(self.accelerator_config, dict)):
            # Batches go to the GPU from pinned memory without the CPU waiting for the copy (and so for every
            # kernel queued before it): accelerate's non_blocking, off unless asked for.
            self.accelerator_config = {"non_blocking": True, **(self.accelerator_config or {})}
        super().__post_init__()

    def freeze(self) -> TransferConfig:
        """From now on setting a field to another value raises `FrozenConfigError` (config/run_config.py: the run's
        configuration is resolved once); the fields the Trainer itself sets (`TRAINER_SETS`) excepted."""
        object.__setattr__(self, "_frozen", True)
        return self

    def __setattr__(self, name, value):
        trainers = TRAINER_SETS | ({"per_device_train_batch_size"} if self.__dict__.get("auto_find_batch_size") else set())
        if self.__dict__.get("_frozen") and name in _init_fields(type(self)) and name not in trainers and \
                getattr(self, name) != value:
            raise FrozenConfigError(f"{name}: the run's configuration is frozen once resolved (config/run_config.py); "
                                    f"{getattr(self, name)!r} cannot become {value!r}")
        super().__setattr__(name, value)

    def _check(self) -> None:
        """The numbers a run cannot start with; one line each (README, "Validated arguments")."""
        checks = [
            (self.learning_rate > 0, f"--learning_rate must be > 0, got {self.learning_rate}"),
            (self.per_device_train_batch_size >= 1,
             f"--per_device_train_batch_size must be >= 1, got {self.per_device_train_batch_size}"),
            (self.per_device_eval_batch_size >= 1,
             f"--per_device_eval_batch_size must be >= 1, got {self.per_device_eval_batch_size}"),
            (self.num_train_epochs > 0 or self.max_steps > 0, "--num_train_epochs must be > 0 (or set --max_steps)"),
            (self.gradient_accumulation_steps >= 1, "--gradient_accumulation_steps must be >= 1"),
            (self.early_stopping_patience is None or self.early_stopping_patience >= 1,
             "--early_stopping_patience must be >= 1"),
            (self.early_stopping_patience is None or self.load_best_model_at_end,
             "--early_stopping_patience needs --load_best_model_at_end (the default)"),
            (self.best_model_min_images >= 0, f"--best_model_min_images must be >= 0, got {self.best_model_min_images}"),
            (self.best_model_tie_break in TIE_BREAKS,
             f"--best_model_tie_break must be one of {', '.join(TIE_BREAKS)}, got {self.best_model_tie_break!r}"),
            (self.dataloader_num_workers >= 0, "--dataloader_num_workers must be >= 0"),
            (self.backbone_lr_scale >= 0, f"--backbone_lr_scale must be >= 0, got {self.backbone_lr_scale}"),
            (self.layer_decay is None or 0 < self.layer_decay <= 1,
             f"--layer_decay must be in (0, 1], got {self.layer_decay}"),
            (self.lr_step_size is None or self.lr_step_size > 0,
             f"--lr_step_size must be > 0 epochs, got {self.lr_step_size}"),
            (0 < self.lr_step_gamma <= 1, f"--lr_step_gamma must be in (0, 1], got {self.lr_step_gamma}"),
            (self.mixup >= 0 and self.cutmix >= 0, "--mixup and --cutmix must be >= 0"),
            (self.max_nan_steps >= 0, f"--max_nan_steps must be >= 0, got {self.max_nan_steps}"),
            (self.min_train_steps >= 0, f"--min_train_steps must be >= 0, got {self.min_train_steps}"),
            (self.min_seen_images >= 0, f"--min_seen_images must be >= 0, got {self.min_seen_images}"),
            (self.precise_bn_images >= 0, f"--precise_bn_images must be >= 0, got {self.precise_bn_images}"),
            (self.ema_decay is None or 0 < self.ema_decay < 1, f"--ema_decay must be in (0, 1), got {self.ema_decay}"),
            (0 <= self.label_smoothing_factor < 1,
             f"--label_smoothing_factor must be in [0, 1), got {self.label_smoothing_factor}"),
            (not (self.freeze_backbone and self.unfreeze_schedule),
             "pass either --freeze_backbone or --unfreeze_schedule, not both"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        self.stage_schedule()  # checks the schedule's syntax and stage names
        self.explicit_class_weights()  # checks their syntax
        self._check_device()
        optim = getattr(self.optim, "value", self.optim)
        if optim not in SUPPORTED_OPTIMIZERS:
            raise ValueError(f"--optim {optim} is not supported here (the project builds its own parameter groups); "
                             f"choose one of: {', '.join(SUPPORTED_OPTIMIZERS)}")
        if self.enable_jit_checkpoint:
            raise ValueError("--enable_jit_checkpoint is not needed: runs already save a checkpoint at the end of the "
                             "step when they receive SIGTERM (agreed across processes), and the two handlers would "
                             "compete; leave the flag out")

    def _check_device(self) -> None:
        """Mixed precision the machine cannot do, refused with the fix (the Trainer's own message names neither)."""
        gpu = torch.cuda.is_available() and not self.use_cpu
        if self.fp16 and not gpu:
            raise ValueError("--fp16 needs a GPU and this run has none: drop --fp16, or use --bf16 --use_cpu for "
                             "bfloat16 autocast on the CPU")
        if self.bf16 and not self.use_cpu and not is_torch_bf16_gpu_available():
            raise ValueError("--bf16 needs a GPU and this machine has none: add --use_cpu for bfloat16 autocast on "
                             "the CPU, or drop --bf16")

    def explicit_class_weights(self) -> list[float] | None:
        """The weights given one per class (None for none or 'auto', which needs the data set)."""
        if self.class_weights in (None, "auto"):
            return None
        try:
            weights = [float(w) for w in self.class_weights.split(",")]
        except ValueError:
            weights = []
        if not weights or any(w < 0 for w in weights):
            raise ValueError(f"--class_weights must be 'auto' or comma-separated non-negative numbers, got "
                             f"'{self.class_weights}'")
        return weights

    def stage_schedule(self) -> list[tuple[int, str]] | None:
        """The unfreezing schedule the flags ask for, or None when everything trains from the start."""
        if self.freeze_backbone:
            return [(0, "head")]
        return parse_schedule(self.unfreeze_schedule) if self.unfreeze_schedule else None
