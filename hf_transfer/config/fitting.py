"""Defaults fitted to the data: the training flags nobody set that depend on the training split, the task, the
machine and the stream. Each function returns what it fits (`Fit`: the flag, its value, why) and changes nothing;
`RunConfig.fitted_to` builds the run's training flags with those values (run_config.py).

- The metric that chooses the checkpoint: the task's (tasks/classification.py): accuracy, or mAP when the images
  have several labels each; a distilled student's, the distillation loss on the validation images.
- Batch size: at most a tenth of the training set (at least 8), so that an epoch has about ten optimizer steps or
  more; the default 128 is meant for CIFAR-sized data.
- Length: the default 3 epochs, or more until `--min_train_steps` optimizer steps and `--min_seen_images` images
  seen (distillation's patient teacher). 100 real digits at batch 10 reach 0.87 test accuracy in 15 epochs and 0.96
  in 20 (one seed, benchmarks/transfer.py): on small data the number of updates, not of epochs, decides.
- DataLoader workers: none without a GPU for data decoded in memory (they would only take cores from the model).
- A stream resumes from the position its checkpoints keep (data/streaming.py), not by the Trainer's skipping.
"""

from __future__ import annotations

import math
from typing import NamedTuple


class Fit(NamedTuple):
    flag: str  # a training flag (TransferConfig field)
    value: object
    why: str  # for the log line: "fitted to the data: --flag value (why)"

    def __str__(self) -> str:
        return f"--{self.flag} {self.value:g} ({self.why})" if isinstance(self.value, float) else \
            f"--{self.flag} {self.value} ({self.why})"


def fitted_fields(args, given: set[str]) -> set[str]:
    """The settings `fit_to_data` takes from the data (keys as in run/record.py): those of the flags nobody set."""
    fitted = set()
    if "per_device_train_batch_size" not in given:
        fitted.add("global_batch_size")  # through the batch size per device
    if not ({"num_train_epochs", "max_steps"} & given) and (args.min_train_steps > 0 or args.min_seen_images > 0):
        fitted.add("training.num_train_epochs")
    if "metric_for_best_model" not in given:
        fitted.add("training.metric_for_best_model")  # the task's: accuracy, or mAP for several labels per image
    return fitted


def fit_to_data(args, num_train: int | None, given: set[str], task=None, judge: str | None = None) -> list[Fit]:
    """The batch size, the length and the metric for the flags nobody set (module docstring); for a stream, whose
    size is unknown and whose length --max_steps gives (`num_train` None), only the metric. `judge`: the metric of
    a distilled student with one class per image (its distillation loss), else the task's."""
    fits = []
    fitted = fitted_fields(args, given)
    if "training.metric_for_best_model" in fitted and task is not None:
        metric = judge if judge is not None and not task.multi_label else task.best_metric
        why = ("the checkpoint is chosen by the distillation loss on the validation images" if metric == judge else
               f"the checkpoint is chosen by {'mAP: several labels per image' if task.multi_label else 'accuracy'}")
        if args.metric_for_best_model != metric:
            fits.append(Fit("metric_for_best_model", metric, why))
    if num_train is None:
        return fits
    processes = max(1, args.world_size)
    batch = args.per_device_train_batch_size
    if "global_batch_size" in fitted:
        cap = max(8, num_train // 10)
        if batch * args.gradient_accumulation_steps * processes > cap:
            batch = max(1, cap // (args.gradient_accumulation_steps * processes))
            why = f"a tenth of the {num_train} training images" + (", at least 8" if num_train // 10 < 8 else "")
            fits.append(Fit("per_device_train_batch_size", batch, why))
    if "training.num_train_epochs" in fitted:
        steps_per_epoch = max(1, math.ceil(num_train / (batch * args.gradient_accumulation_steps * processes)))
        epochs = max(math.ceil(args.min_train_steps / steps_per_epoch), math.ceil(args.min_seen_images / num_train))
        if epochs > args.num_train_epochs:
            rule = (f"--min_train_steps {args.min_train_steps}" if not args.min_seen_images else
                    f"--min_train_steps {args.min_train_steps}, --min_seen_images {args.min_seen_images}")
            fits.append(Fit("num_train_epochs", float(epochs), f"{epochs * steps_per_epoch} steps; {rule}"))
    return fits


def fit_workers(args, in_memory: bool) -> list[Fit]:
    """Without a GPU, no DataLoader workers for data decoded in memory (`samples.attach_transforms` says so): they
    would only stack rows already in memory, taking cores from the model's threads (docs/performance.md)."""
    if args.device.type == "cuda" or not in_memory or args.dataloader_num_workers == 0:
        return []
    why = (f"not {args.dataloader_num_workers}: the images are decoded in memory and batches are made on the "
           f"{args.device.type} (workers would only take cores from the model)")
    return [Fit("dataloader_num_workers", 0, why), Fit("dataloader_persistent_workers", False, "no workers"),
            Fit("dataloader_prefetch_factor", None, "no workers")]


def fit_stream(args, streamed: bool) -> list[Fit]:
    """A streamed train split goes on from the position its checkpoint holds (data/streaming.py); the Trainer's own
    resume would read and drop every batch already trained on."""
    if not streamed or args.ignore_data_skip:
        return []
    return [Fit("ignore_data_skip", True, "a stream resumes from the position its checkpoint keeps")]
