"""`TransferTrainer`: the transformers Trainer, fed uint8 image batches. Its config: `TransferConfig`.

The DataLoader delivers uint8 images at storage resolution (`hf_transfer/data/`, the batch's keys in
`data/batch.py`); accelerate moves them to the device; `_prepare_inputs` -- the Trainer's own hook for
"make this batch ready for the model", used by training and evaluation alike -- turns them into the
model's float input there, batched (and, in training, mixes them when `--mixup`/`--cutmix` ask for it),
with `data/batch.py`'s `pictures` and `model_input`, as the BatchNorm statistics and the distillation
teacher do. In training it also passes the batch's `pictures` on, for losses that need another model's input.

The other overrides exist because the Trainer has no option for them:
- `create_optimizer`: parameter groups with per-layer learning rates, no weight decay on
  biases and norms, and every parameter included so that layers unfrozen later train.
- `create_scheduler`: adds the tutorial's step decay to the Trainer's schedules.
- `get_batch_samples`, `compute_loss`: the loss (cross-entropy with the soft targets mixup/CutMix
  produce, class weights, label smoothing) is the per-sample mean over the whole optimizer step,
  whatever the model, the accumulation and the process count; no training on a NaN/inf loss or
  gradient (`nonfinite.py`; with --max_nan_steps the optimizer is guarded so that a skipped step
  leaves it alone).
- `log`: adds the learning rate of each parameter group.
- `push_to_hub`, `_push_from_checkpoint`: one push path, `hub.py` (no pickles, no card but the run's).
- `_load_from_checkpoint`, `_load_best_model`: a transformers 5 bug (`compat.py`); with EMA, they
  also restore the average.
- `_determine_best_metric`: a tie on the metric that chooses the checkpoint is broken (`selection.py`); the
  Trainer keeps the first checkpoint that reached a value, so a saturated metric kept the earliest weights.
- `train`, `evaluate`, `_save_checkpoint`: the weight EMA (`--ema_decay`, `ema.py`); `train` and
  `evaluate` also recompute BatchNorm statistics for the weights evaluated (`--precise_bn_images`, `batchnorm.py`).
- `_get_train_sampler`: no training batch of a single image for a model with BatchNorm (`batchnorm.py`).
- `get_train_dataloader`, and the stream's position in `get_batch_samples`, `_save_checkpoint` and
  `_load_from_checkpoint`: a `--streaming` train split reads its own shards in each process and
  resumes where it stopped (`data/streaming.py`).

`DistillationTrainer` builds on this class and adds the teacher.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import DefaultFlowCallback, Trainer
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, HubStrategy, get_last_checkpoint
from transformers.utils import PushInProgress

from ..data.batch import STREAM, Pictures, as_batch, model_input, pictures
from ..data.streaming import StreamingSplit
from ..errors import UserError
from ..integrations.compat import deepspeed_dtype, load_checkpoint_weights
from ..integrations.hub import push_at_end, push_checkpoint
from ..integrations.launch import check_sharding
from ..integrations.tracking import forward_flops
from ..on_device.mixing import BatchMix
from ..on_device.preprocessing import ImageSpec, ToModelInput
from ..tasks.classification import SingleLabel
from ..tasks.objectives import Supervised
from .batchnorm import (
    completion,
    has_batchnorm,
    normalisable,
    recompute_statistics,
    trainable_batchnorm_layers,
)
from .ema import EmaCallback, WeightEma, swapped_weights
from .nonfinite import LossGuard, LossWatch, NonFiniteLossError, StepSkipper
from .optimizer import param_groups, step_schedule, updates_per_epoch
from .selection import Choice, chooses, describe_choice, take_latest, take_tie

logger = logging.getLogger(__name__)


@dataclass
class BatchCounts:
    """What one optimizer step's losses divide by (`TransferTrainer.get_batch_samples`)."""

    labelled: torch.Tensor  # labelled images (their labelled share, after mixup) of the whole step
    images: torch.Tensor  # all images of the whole step
    processes: int  # the processes counted: DDP averages their gradients, so each loss is multiplied back


class TransferTrainer(Trainer):
    """`image_spec`: the input the model expects (size, mean, std), made on the device from each uint8 batch;
    `class_weights`: per-class weights of the training cross-entropy (None: unweighted)."""

    # The loss is always the project's (`compute_loss`), divided by the counts of the whole optimizer step: the
    # Trainer must neither pass loss arguments to the model nor divide the loss by the accumulation steps.
    loss_is_scaled_for_ga = True

    def __init__(self, *args, image_spec: ImageSpec, channels_last: bool = False,
                 class_weights: torch.Tensor | None = None, task: SingleLabel | None = None, **kwargs):
        if channels_last:  # the weights too, so convolutions need no layout conversion
            kwargs["model"].to(memory_format=torch.channels_last)
        super().__init__(*args, **kwargs)
        check_sharding(self.args, self.is_fsdp_enabled, self.is_deepspeed_enabled, self.accelerator.num_processes)
        self.model_accepts_loss_kwargs = False  # the model computes no loss here (compute_loss does)
        self.class_weights = class_weights  # (classes,), from --class_weights and the training labels
        # One class or several labels per image (tasks.py): the loss, the labelled count, mixup's targets.
        self.task = task if task is not None else SingleLabel(self.model.config.num_labels)
        self.to_model_input = ToModelInput(image_spec, channels_last=channels_last)
        self.objective = self.make_objective()  # what a training step minimises (tasks/objectives.py)
        self._terms = dict.fromkeys(self.objective.terms, 0.0)  # the objective's terms, summed since the last log
        self._terms_since: int | None = None  # the step of that log (or of the start of training)
        self._forward_flops: int | None = None  # of one image, measured at the first training step
        mixup, cutmix = self.args.mixup, self.args.cutmix
        self.batch_mix = BatchMix(self.task.targets, mixup, cutmix) if mixup or cutmix else None
        self.ema = WeightEma(self.model, self.args.ema_decay) if self.args.ema_decay else None
        self._raw_weights: dict | None = None  # once the EMA weights are the model's, the raw ones (for eval_raw_*)
        self._statistics_step: int | None = None  # the step whose weights the BatchNorm statistics belong to
        # The loader of the training images they are computed from (batchnorm.py), made once: a new one at every
        # evaluation would start new persistent DataLoader workers each time, all alive until garbage-collected.
        self._statistics_loader = None
        # Never training on non-finite numbers (nonfinite.py): stop, or skip up to --max_nan_steps steps.
        gradients = not (self.is_fsdp_enabled or self.is_deepspeed_enabled)  # sharded gradients: the loss only
        self.loss_watch, self.skipper = LossWatch(), None
        if self.args.max_nan_steps:
            agree = (lambda t: self.accelerator.reduce(t, reduction="sum")) if self.accelerator.num_processes > 1 \
                else None
            self.skipper = StepSkipper(self.args.max_nan_steps, agree, self.stop, gradients)
            callbacks = self.callback_handler.callbacks  # right after the flow callback: the others see no step
            callbacks.insert(1 + next(i for i, c in enumerate(callbacks) if isinstance(c, DefaultFlowCallback)),
                             self.skipper)
        else:
            self.add_callback(LossGuard(self.loss_watch, self.stop, gradients))  # after those that ask for a save
        if self.ema is not None:
            self.add_callback(EmaCallback(self.ema, skipped=lambda: self.skipper is not None and self.skipper.skipping))
        self.stream = self.train_dataset if isinstance(self.train_dataset, StreamingSplit) else None
        self._batchnorm = has_batchnorm(self.model)
        if self._batchnorm and self.args.do_train and self._train_batch_size < 2 and not self.args.freeze_backbone:
            raise UserError("the batch size per device is 1 (--per_device_train_batch_size, or fitted to a tenth of the "
                            "training set across processes and --gradient_accumulation_steps): the model's BatchNorm "
                            "layers normalise each training batch by its own statistics, which one image gives only "
                            "within itself, and not at all at a 1 x 1 feature map (training stops there); pass "
                            "--per_device_train_batch_size 2 or more (with fewer --gradient_accumulation_steps for the "
                            "same step)")
        self._completion_logged = False
        if self.stream is not None and not self.args.ignore_data_skip:
            # A resumed stream goes on from the position its checkpoint holds (`_load_from_checkpoint`); the
            # Trainer's own resume would read and drop every batch already trained on (config/fitting.py sets it).
            raise ValueError("a streamed train split needs ignore_data_skip (config/fitting.py, fit_stream)")

    def get_train_dataloader(self):
        if self.stream is not None:  # each process reads its own shards (data/streaming.py)
            return self.stream.loader(self._train_batch_size, self.data_collator, self.args)
        return super().get_train_dataloader()

    def _get_train_sampler(self, train_dataset=None):
        """The Trainer's sampler, drawing a few images again at the end of an epoch whose last batch would hold
        one image, which BatchNorm cannot normalise (`batchnorm.completion`); the epoch keeps its steps."""
        sampler = super()._get_train_sampler(train_dataset)
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if type(sampler) is not torch.utils.data.RandomSampler or not self._batchnorm:
            return sampler
        extra = completion(len(dataset), self._train_batch_size, self.accelerator.num_processes,
                           self.accelerator.even_batches)
        if extra and not self._completion_logged:
            logger.info("the last training batch of each epoch would hold 1 of the %d images, which BatchNorm cannot "
                        "normalise: it is completed with %d images drawn again at random", len(dataset), extra)
            self._completion_logged = True
        return torch.utils.data.RandomSampler(dataset, num_samples=len(dataset) + extra) if extra else sampler

    # ---------------------------------------------------------------- inputs

    def _prepare_inputs(self, inputs: dict) -> dict:
        """The model's input from a collated batch (`data/batch.py`), with the labels; in training, also the batch's
        `pictures` (the augmented, mixed images every model's input is made from) and `row_index`, for a loss that
        needs another model's input (the distillation teacher)."""
        batch = as_batch(super()._prepare_inputs(inputs))  # on the device, still uint8
        training = self.model.training
        images, labels = pictures(batch, augmented=training), batch.labels
        if self.batch_mix is not None and training and labels is not None:
            mixed, labels, views = self.batch_mix(images.images, labels, images.views)
            images = Pictures(mixed, views, images.fitted, images.squash)
        prepared = {"pixel_values": self.cast_for_model(model_input(images, self.to_model_input))}
        if labels is not None:
            prepared["labels"] = labels
        if training:
            prepared.update(pictures=images, row_index=batch.row_index)
        return prepared

    def floating_point_ops(self, inputs: dict) -> int:
        """A training batch's FLOPs (the Trainer's `total_flos`): forward x 3, at the model's input size.

        The Trainer's own estimate counts the batch as it arrives, uint8 at storage size (a 32 px
        CIFAR image is 49 times fewer pixels than the 224 px the model sees). The forward is
        counted once (tracking.forward_flops); sharded models keep the Trainer's estimate, rescaled.
        """
        images = inputs["pixel_values"]
        if self.is_fsdp_enabled or self.is_deepspeed_enabled:
            height, width = self.to_model_input.spec.size
            return int(super().floating_point_ops(inputs) * height * width / (images.shape[-2] * images.shape[-1]))
        if self._forward_flops is None:
            self._forward_flops = forward_flops(self.accelerator.unwrap_model(self.model), self.to_model_input.spec.size)
        return 3 * self._forward_flops * len(images)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """Evaluation in inference mode (the Trainer's own uses no_grad): no autograd bookkeeping at all.
        Sharded models (FSDP, DeepSpeed) keep no_grad: their parameter gathering is not checked under it."""
        if self.is_fsdp_enabled or self.is_deepspeed_enabled:
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)
        with torch.inference_mode():
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)

    def cast_for_model(self, pixel_values: torch.Tensor) -> torch.Tensor:
        # DeepSpeed holds the weights in its own dtype and, unlike autocast, does not cast inputs.
        if self.is_deepspeed_enabled:
            return pixel_values.to(deepspeed_dtype(self.accelerator))
        return pixel_values

    # ---------------------------------------------------------------- loss

    def get_batch_samples(self, epoch_iterator, num_batches: int, device: torch.device):
        """The Trainer's batches of one optimizer step, with what the loss divides by (`BatchCounts`): the
        labelled and all images of every micro-batch and, unless --average_tokens_across_devices false,
        every process. The Trainer counts only labels, and only for students whose forward takes loss
        keyword arguments (transformers-native ones, not timm's), so the same step's loss would otherwise
        depend on the student and the accumulation."""
        batches, _ = super().get_batch_samples(epoch_iterator, num_batches, device)
        if not batches:
            return batches, None
        if self.stream is not None:  # where the stream goes on after this step (still on the CPU: no sync)
            for batch in batches:
                self.stream.consumed(batch.pop(STREAM))
        labels = [batch["labels"] for batch in batches]
        counts = torch.stack([sum(self.task.label_mass(lab).sum() for lab in labels),
                              torch.tensor(float(sum(len(lab) for lab in labels)), device=labels[0].device)])
        processes = 1
        if self.args.average_tokens_across_devices and self.accelerator.num_processes > 1:
            counts = self.accelerator.reduce(counts.to(device), reduction="sum")  # one all-reduce per step
            processes = self.accelerator.num_processes
        return batches, BatchCounts(labelled=counts[0].clamp(min=1e-6), images=counts[1], processes=processes)

    def make_objective(self) -> Supervised:
        """The task's loss (cross-entropy with soft targets from mixup/CutMix, class weights, label smoothing)."""
        return Supervised(self.task, self.args.label_smoothing_factor, self.class_weights)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """In training, the objective's loss as the per-sample mean of the optimizer step, never training on a NaN/inf
        loss, its terms summed for the next log; in evaluation, the task's loss over the batch, unweighted (so that
        evaluation losses compare across runs and objectives)."""
        outputs = model(pixel_values=inputs["pixel_values"])
        if not model.training:
            loss = self.task.loss(outputs.logits, inputs["labels"], None, self.args.label_smoothing_factor)
            return (loss, outputs) if return_outputs else loss
        counts = num_items_in_batch if isinstance(num_items_in_batch, BatchCounts) else None
        loss, terms = self.objective(outputs.logits, inputs["labels"], counts, self.teacher_answers(inputs))
        processes = counts.processes if counts is not None else 1  # DDP averages the processes' gradients
        loss = self.guard_loss(loss * processes)
        if self._terms_since is None:  # the first step of this train() call (a resumed run starts mid-way)
            self._terms_since = self.state.global_step
        # Summed over the step's micro-batches, like the Trainer's logged loss: per-sample means of the step.
        # (a step skipped for a non-finite loss, --max_nan_steps, adds nothing, as it adds nothing to the loss)
        for name, value in terms.items():
            self._terms[name] += torch.nan_to_num(value * processes, nan=0.0, posinf=0.0, neginf=0.0)
        return (loss, outputs) if return_outputs else loss

    def teacher_answers(self, inputs) -> torch.Tensor | None:
        """The logits the objective learns from besides the labels (distillation's teacher); none here."""
        return None

    def guard_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """Never train on a NaN/inf loss (`nonfinite.py`): the run stops before weights a bad step touched are
        logged, evaluated or saved (the last checkpoint stays good), or, with --max_nan_steps, the step is
        skipped. Neither reads the loss on the host here."""
        if self.skipper is not None:
            return self.skipper.observe_loss(loss)
        self.loss_watch.observe(loss, self.state.global_step + 1)
        bad = self.loss_watch.first_bad_step(wait=False)  # the verdicts that have reached the host
        if bad is not None:
            self.stop(*bad)
        return loss

    def stop(self, bad_step: int, value: float, what: str = "training loss") -> None:
        # Inside a step (compute_loss) global_step is the previous one; in a callback, the step just done.
        applied = bad_step <= self.state.global_step and self.skipper is None
        when = f"after step {self.state.global_step}, before saving anything trained on it" if applied else \
            "before applying it"
        last = get_last_checkpoint(self.args.output_dir) if os.path.isdir(self.args.output_dir) else None
        allowed = f" (more than the {self.args.max_nan_steps} steps --max_nan_steps skips)" if self.skipper else ""
        raise NonFiniteLossError(
            f"the {what} is {value} at step {bad_step} of {self.state.max_steps}{allowed}; stopped {when}, the last "
            f"checkpoint is {last or 'not written yet'}; lower --learning_rate, prefer --bf16 over --fp16, or "
            "tolerate a few such steps with --max_nan_steps"
        )

    # ---------------------------------------------------------------- optimizer and schedule

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            model = self.model if model is None else model
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, model)
            groups = param_groups(model, self.args.learning_rate, self.args.weight_decay,
                                  backbone_lr_scale=self.args.backbone_lr_scale, layer_decay=self.args.layer_decay)
            self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
            if self.skipper is not None:
                self.skipper.guard(self.optimizer)  # a skipped step leaves the weights and their state alone
        return self.optimizer

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        step_size = self.args.lr_step_size
        if self.lr_scheduler is None and step_size:
            steps_per_epoch = updates_per_epoch(len(self.get_train_dataloader()), self.args.gradient_accumulation_steps)
            self.lr_scheduler = step_schedule(optimizer or self.optimizer, steps_per_epoch, step_size,
                                              self.args.lr_step_gamma, self.args.get_warmup_steps(num_training_steps))
            return self.lr_scheduler
        return super().create_scheduler(num_training_steps, optimizer)

    # ---------------------------------------------------------------- weight EMA (trainers/ema.py)

    def train(self, *args, **kwargs):
        self._statistics_step = None
        self._terms, self._terms_since = dict.fromkeys(self._terms, 0.0), None
        result = super().train(*args, **kwargs)
        # The best checkpoint was saved right after its evaluation, statistics included; other final weights
        # may not have been evaluated since their last step.
        best_loaded = self.chooses() and self.state.best_model_checkpoint is not None
        if self.ema is not None:  # the run ends with the EMA weights (of the best checkpoint, when one was loaded)
            self._raw_weights = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
            self.model.load_state_dict(self.ema.state_dict())
        if not best_loaded and self._statistics_step != self.state.global_step:
            self.recompute_batchnorm_statistics()
        return result

    def recompute_batchnorm_statistics(self) -> None:
        """Precise BatchNorm statistics (`batchnorm.py`) for the weights the model holds now, from
        --precise_bn_images training images (a fixed, seeded choice), in the training view without mixing.
        Under FSDP the forward gathers the sharded weights as in training; BatchNorm buffers are whole everywhere."""
        model = self.accelerator.unwrap_model(self.model)
        if not self.args.precise_bn_images or not trainable_batchnorm_layers(model):
            return
        if self._statistics_loader is None:
            if self.stream is not None:
                images = self.stream.head(self.args.precise_bn_images)
            else:
                rows = np.random.default_rng(self.args.seed).permutation(len(self.train_dataset))
                images = self.train_dataset.select(np.sort(rows[:self.args.precise_bn_images]))
            self._statistics_loader = self.get_test_dataloader(images)

        def batches():
            for batch in self._statistics_loader:
                yield self.cast_for_model(model_input(pictures(batch, augmented=True), self.to_model_input))

        reduce = (lambda t: self.accelerator.reduce(t, reduction="mean")) if self.accelerator.num_processes > 1 else None
        device = self.args.device
        # Its own random state (dropout, drop path): training draws the same numbers with or without it.
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), \
                self.compute_loss_context_manager():
            recompute_statistics(model, normalisable(batches()), reduce)
        self._statistics_step = self.state.global_step

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """With EMA, the EMA weights are the ones scored (and chosen by); the raw ones come as `<prefix>_raw_*`.
        In training, BatchNorm statistics are recomputed first for the weights scored (and then saved)."""
        if self.is_in_train and self._statistics_step != self.state.global_step:
            self.recompute_batchnorm_statistics()
        if self.ema is None:
            return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        if self._raw_weights is None:  # training: the model holds the raw weights
            raw = super().evaluate(eval_dataset, ignore_keys, f"{metric_key_prefix}_raw")
            with swapped_weights(self.model, self.ema.state_dict()):
                if self.is_in_train:  # the average's own statistics, kept with it (and saved in ema.safetensors)
                    self._statistics_step = None
                    self.recompute_batchnorm_statistics()
                    self.ema.average.module.load_state_dict(self.model.state_dict())
                averaged = super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        else:  # after training: the model holds the EMA weights
            with swapped_weights(self.model, self._raw_weights):
                raw = super().evaluate(eval_dataset, ignore_keys, f"{metric_key_prefix}_raw")
            averaged = super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        return {**averaged, **{k: v for k, v in raw.items() if "accuracy" in k or k.endswith(("_loss", "_map"))}}

    def _save_checkpoint(self, model, trial) -> None:
        """The EMA and each process's stream position first, then the Trainer's checkpoint (whose
        trainer_state.json, written last, marks it complete)."""
        folder = Path(self.args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        if self.ema is not None and self.args.should_save:
            self.ema.save(folder)
        if self.stream is not None:
            folder.mkdir(parents=True, exist_ok=True)
            self.stream.save(folder)
        super()._save_checkpoint(model, trial)

    # ---------------------------------------------------------------- choosing the checkpoint (selection.py)

    def _determine_best_metric(self, metrics: dict[str, float], trial) -> bool:
        """The Trainer's choice (a strictly better metric), then a tie broken by --best_model_tie_break instead of
        keeping the first checkpoint that reached the value; with too few validation images, the latest."""
        if not self.chooses():
            return take_latest(metrics, self.state, self.args)
        return super()._determine_best_metric(metrics, trial) or take_tie(metrics, self.state, self.args)

    @property
    def validation_images(self) -> int | None:
        return len(self.eval_dataset) if hasattr(self.eval_dataset, "__len__") else None

    def chooses(self) -> bool:
        """Whether the run ends with its best checkpoint on validation (selection.chooses) or its last weights."""
        return chooses(self.args, self.validation_images)

    def checkpoint_choice(self) -> Choice:
        """Which weights the run ended with, and why (after `train`)."""
        return describe_choice(self.args, self.state, self.validation_images)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """The run's model whole (safetensors and config, for `from_pretrained`, `pipeline` and the Hub), also when
        FSDP writes its checkpoints sharded (SHARDED_STATE_DICT), where the Trainer would save no weights at all."""
        plugin = self.accelerator.state.fsdp_plugin if self.is_fsdp_enabled else None
        if _internal_call or plugin is None or "FULL_STATE_DICT" in str(plugin.state_dict_type):
            return super().save_model(output_dir, _internal_call)
        sharded = plugin.state_dict_type
        plugin.set_state_dict_type("FULL_STATE_DICT")
        try:
            super().save_model(output_dir, _internal_call)
        finally:
            plugin.set_state_dict_type(sharded)

    # ---------------------------------------------------------------- loading checkpoints

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        if not self._load_whole(resume_from_checkpoint, model):
            super()._load_from_checkpoint(resume_from_checkpoint, model)
        if self.stream is not None:
            self.stream.resume(resume_from_checkpoint, self.args.process_index, self.args.world_size,
                               self.args.dataloader_num_workers)
        if self.ema is not None and not self.ema.load(resume_from_checkpoint):
            logger.warning("checkpoint %s has no EMA weights: the average restarts from its weights",
                           resume_from_checkpoint)
            self.ema.restart(self.accelerator.unwrap_model(model if model is not None else self.model))

    def _load_best_model(self) -> None:
        if not self.chooses():  # too few validation images to choose: the run keeps its last weights
            return
        if self.is_fsdp_enabled and self.state.best_global_step == self.state.global_step:
            # The best is the weights in memory. Reloading the last step's sharded checkpoint gave other weights on
            # CPU processes (FSDP2, accelerate 1.16: test accuracy 0.667 where the same weights in memory and the
            # DDP run give 0.896), while earlier checkpoints load right; the kept weights are these either way.
            return
        if not self._load_whole(self.state.best_model_checkpoint):
            super()._load_best_model()
        if self.ema is not None:
            self.ema.load(self.state.best_model_checkpoint)

    def _load_whole(self, checkpoint: str, model=None) -> bool:
        """Every layer of a checkpoint, as `from_pretrained` reads it (`compat.load_checkpoint_weights`);
        sharded (FSDP, DeepSpeed) checkpoints keep the Trainer's own path."""
        if self.is_fsdp_enabled or self.is_deepspeed_enabled:
            return False
        model = self.accelerator.unwrap_model(model if model is not None else self.model)
        logger.info("loading weights from %s", checkpoint)
        return load_checkpoint_weights(model, checkpoint)

    # ---------------------------------------------------------------- the Hub

    def push_to_hub(self, commit_message: str | None = "End of training", blocking: bool = True,
                    token: str | None = None, revision: str | None = None, **kwargs) -> str | None:
        """The one push path: the output directory as the run leaves it (model, image processor, model card,
        results; never checkpoints or caches). The Trainer calls this from `save_model`, which the run calls
        last; a failure keeps the run on disk and names the command that pushes it later."""
        if not self.is_world_process_zero():
            return None
        url = push_at_end(self.args, self.hub_model_id or self.args.hub_model_id,
                          revision=revision or self.args.hub_revision)
        logger.info("pushed to %s", url)
        return url

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        """The pushes during training (--hub_strategy other than end) through hub.push_checkpoint: the
        Trainer's own would upload its pickled arguments and, later, a card of its own (compat.py)."""
        if not self.is_world_process_zero() or self.args.hub_strategy == HubStrategy.END:
            return
        if self.push_in_progress is not None and not self.push_in_progress.is_done() and not self.args.hub_always_push:
            return  # the previous push is still going: skip this one, as the Trainer does
        step = f"step {self.state.global_step}" if self.args.save_strategy == "steps" else f"epoch {int(self.state.epoch)}"
        jobs = push_checkpoint(checkpoint_folder, self.hub_model_id, self.args.hub_strategy.value,
                               f"Training in progress, {step}", revision=self.args.hub_revision)
        if self.push_in_progress is None or self.push_in_progress.is_done():
            self.push_in_progress = PushInProgress(jobs)
        else:
            self.push_in_progress.jobs.extend(jobs)

    # ---------------------------------------------------------------- logging

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """A training log gets the objective's terms (distillation's `ce_loss`, `kd_loss`), as the Trainer computes
        `loss`: summed over each step's micro-batches, averaged over the steps since the last log and over the
        processes, so that loss = (1 - alpha) * ce_loss + alpha * kd_loss; and each parameter group's learning rate."""
        steps = self.state.global_step - (self._terms_since or 0)
        if "loss" in logs and self._terms and self._terms_since is not None and steps > 0:
            for name, total in self._terms.items():
                mean = torch.as_tensor(total, device=self.args.device, dtype=torch.float32) / steps
                logs[name] = round(self.accelerator.reduce(mean, reduction="mean").item(), 4)
            self._terms = dict.fromkeys(self._terms, 0.0)
            self._terms_since = self.state.global_step
        if "learning_rate" in logs and self.optimizer is not None:
            # `learning_rate` is the rate of the step just taken (the first group's, the head's); the
            # schedule has moved on since, but it scales every group alike, so their ratios hold.
            groups = self.optimizer.param_groups
            rates = {}
            for group in groups:
                ratio = group.get("initial_lr", group["lr"]) / groups[0].get("initial_lr", groups[0]["lr"])
                rates.setdefault(group.get("name", "all"), logs["learning_rate"] * ratio)
            if len(rates) > 1:
                logs.update({f"learning_rate/{name}": lr for name, lr in rates.items()})
        super().log(logs, start_time)

    def extra_test_metrics(self, dataset, output) -> dict[str, float]:
        """More numbers measured on the test split, prefixed `test_` (the distillation trainer adds the teacher's)."""
        return {}
