"""The workflow both commands share, step by step.

`commands/finetune.py` and `commands/distill.py` call these in order: check the setup and the
output directory, load the data and the model, build the Trainer's arguments, then
`train_and_evaluate` (train, pick the best checkpoint on validation, test once, write the
results and the model card, save the model and push it).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ..data.dataset import ROW, ImageData, load_image_data
from ..data.samples import EpochCallback, UInt8Collator
from ..data.streaming import StreamingSplit, load_streaming_data
from ..errors import Preempted, UserError
from ..integrations.hub import check_push_possible
from ..integrations.launch import check_launch
from ..integrations.tracking import (
    LastStepLog,
    RunConfigCallback,
    ThroughputCallback,
    check_tracking,
    peak_memory,
    reset_peak_memory,
)
from ..models.loading import LoadedModel, load_model
from ..models.structure import depth_groups
from ..tasks.metrics import ComputeMetrics
from ..trainers.freezing import UnfreezeCallback, trainable_names
from ..trainers.selection import EarlyStopping, chooses
from .card import CardInfo, write_model_card
from .checkpoints import StopOnSignal
from .output_dir import FindBestCheckpoint, RecordInCheckpoints

logger = logging.getLogger(__name__)


def check_setup(args) -> None:
    """What the launch, the trackers and the Hub need, checked before anything is downloaded or written."""
    check_launch(args)
    check_tracking(args)
    check_push_possible(args)


def load_data(data_args, seed: int, cache_dir: str | None = None) -> ImageData:
    if data_args.streaming:
        return load_streaming_data(
            data_args.dataset_name, data_args.dataset_config_name, data_args.image_column, data_args.label_column,
            data_args.max_eval_samples, seed, data_args.shuffle_buffer, data_args.skip_corrupt_images, cache_dir,
        )
    return load_image_data(
        dataset_name=data_args.dataset_name, dataset_config_name=data_args.dataset_config_name,
        train_dir=data_args.train_dir, validation_dir=data_args.validation_dir, test_dir=data_args.test_dir,
        image_column=data_args.image_column, label_column=data_args.label_column,
        validation_split=data_args.validation_split, max_train_samples=data_args.max_train_samples,
        max_eval_samples=data_args.max_eval_samples, seed=seed, skip_corrupt_images=data_args.skip_corrupt_images,
        cache_dir=cache_dir, multi_label=data_args.multi_label,
    )


def check_validation_split(data: ImageData, passed: set[str]) -> None:
    """--validation_split carves validation out of train only when the data set has no validation split: one that has
    one would train with the flag silently ignored."""
    if "validation_split" in passed and not data.validation_from_train:
        raise UserError(f"--validation_split: {data.name} has a validation split of its own "
                        f"({len(data.validation)} images), which the run uses; leave --validation_split out")


def load_trained_model(model_args, source: str, data: ImageData) -> LoadedModel:
    """The model to train, with a head for the data set's labels."""
    return load_model(
        source, data.label_names, from_scratch=model_args.from_scratch, image_size=model_args.image_size,
        crop_pct=model_args.crop_pct, revision=model_args.model_revision, trust_remote_code=model_args.trust_remote_code,
        cache_dir=model_args.cache_dir, drop_path_rate=model_args.drop_path_rate, problem_type=data.task.problem_type,
    )


def fit_workers(args, data: ImageData) -> None:
    """Without a GPU, no DataLoader workers for data decoded in memory (`attach_transforms` says so): they would
    only stack rows already in memory, taking cores from the model's threads (docs/performance.md)."""
    if args.device.type != "cuda" and data.in_memory and args.dataloader_num_workers > 0:
        logger.info("--dataloader_num_workers %d: 0 instead, the images are decoded in memory and batches are "
                    "made on the %s (workers would only take cores from the model)", args.dataloader_num_workers,
                    args.device.type)
        args.dataloader_num_workers, args.dataloader_persistent_workers = 0, False
        args.dataloader_prefetch_factor = None


def trainer_kwargs(args, data: ImageData, loaded: LoadedModel, run_config: dict | None = None,
                   tags: Sequence[str] = (), callbacks: Sequence = ()) -> dict:
    """What every trainer of this project is built from (nothing is changed here: the arguments and the model are
    as the caller left them); `callbacks`: the caller's, after the project's."""
    callbacks = [StopOnSignal(), EpochCallback(data.epoch), RunConfigCallback(run_config or {}, [*tags, loaded.family]),
                 ThroughputCallback(), LastStepLog(), RecordInCheckpoints(), FindBestCheckpoint(), *callbacks]
    schedule = args.stage_schedule()
    if schedule is not None:
        for _, stage in schedule:
            trainable_names(loaded.model, stage)  # fails now, not at the first epoch, if the stage has no modules
        callbacks.append(UnfreezeCallback(schedule))
    if args.layer_decay is not None or args.backbone_lr_scale != 1.0:
        depth_groups(loaded.model)  # the same check for per-layer learning rates
    on_gpu = args.device.type == "cuda"
    channels_last = loaded.family == "cnn" and (args.channels_last if args.channels_last is not None else on_gpu)
    if args.early_stopping_patience is not None:  # a tie won by a lower loss counts as an improvement, as for the choice
        if not chooses(args, len(data.validation) if hasattr(data.validation, "__len__") else None):
            raise UserError(f"--early_stopping_patience needs a checkpoint choice, and {len(data.validation)} "
                            f"validation images are fewer than --best_model_min_images {args.best_model_min_images}: "
                            "hold out more validation images, or pass --best_model_min_images 0 to choose anyway")
        callbacks.append(EarlyStopping(early_stopping_patience=args.early_stopping_patience))
    return dict(
        model=loaded.model,
        args=args,
        train_dataset=data.train,
        eval_dataset=data.validation,
        data_collator=UInt8Collator(loaded.spec),
        processing_class=loaded.spec.to_image_processor(),
        compute_metrics=ComputeMetrics(data.task),
        callbacks=callbacks,
        image_spec=loaded.spec,
        channels_last=channels_last,
        class_weights=class_weights(args, data),
        task=data.task,
    )


def class_weights(args, data: ImageData) -> torch.Tensor | None:
    """--class_weights for this data set: one per class, or 'auto' from the training split's label counts."""
    if args.class_weights is None:
        return None
    explicit = args.explicit_class_weights()
    if explicit is not None:
        if len(explicit) != len(data.label_names):
            raise UserError(f"--class_weights has {len(explicit)} weights for {len(data.label_names)} classes "
                            f"({', '.join(data.label_names[:4])}{', ...' if len(data.label_names) > 4 else ''})")
        return torch.tensor(explicit)
    weights = data.task.auto_class_weights(data.train.with_format(None)[data.label_column])
    logger.info("%s weights (auto): %s", "positive-class" if data.task.multi_label else "class",
                ", ".join(f"{n} {w:.2f}" for n, w in zip(data.label_names, weights)))
    return weights


def train_and_evaluate(trainer, data: ImageData, card: CardInfo, resume_from: str | None = None) -> dict:
    """Train, keep the best checkpoint on validation (a tie broken, trainers/selection.py), test it once, write
    everything, save, push."""
    reset_peak_memory()
    train_result = trainer.train(resume_from_checkpoint=resume_from)
    stopper = _callback(trainer, StopOnSignal)
    if stopper is not None and stopper.stopped_at is not None:
        checkpoint = Path(trainer.args.output_dir) / f"checkpoint-{stopper.stopped_at}"
        raise Preempted(f"SIGTERM at step {stopper.stopped_at}; checkpoint saved in {checkpoint}; "
                        "run the same command again to resume")
    # total_flos from the state: with --disable_tqdm the Trainer's PrinterCallback pops it from the metrics it logs.
    results = dict(train_result.metrics, total_flos=trainer.state.total_flos)
    if isinstance(data.train, StreamingSplit):  # what the stream delivered and skipped, all processes together
        counts = torch.tensor([data.train.images, *data.train.skipped()], device=trainer.args.device)
        counts = trainer.accelerator.reduce(counts, reduction="sum").tolist()
        results.update(train_streamed_images=counts[0], train_skipped_shards=counts[1], train_skipped_images=counts[2])
    else:
        results["train_samples"] = len(data.train)
    if data.unlabeled:
        results["train_unlabeled_samples"] = data.unlabeled
    results.update({f"train_{key}": value for key, value in peak_memory().items()})
    timer = _callback(trainer, ThroughputCallback)
    if timer is not None:
        results.update({f"train_{key}": value for key, value in timer.summary().items()})
    trainer.log({"train_peak_memory_mb": results["train_peak_memory_mb"]})  # the trackers get it too
    results.update({("train_unlabeled" if split == "unlabeled" else split) + "_skipped_images": n
                    for split, n in data.skipped_images.items()})
    choice = trainer.checkpoint_choice()  # which weights the run kept, and why: in the results and the card
    results.update(choice.results())
    logger.info("kept %s", choice.sentence())
    if choice.warning:
        logger.warning(choice.warning)
    trainer.log_metrics("train", {k: v for k, v in results.items() if k != "selected_by"})  # said above, in a line
    trainer.save_metrics("train", results)
    trainer.save_state()

    if data.task.multi_label:  # the decision threshold, chosen on validation predictions (never on test)
        output = trainer.predict(data.validation, metric_key_prefix="threshold")
        threshold = data.task.choose_threshold(output.predictions, output.label_ids)
        trainer.model.config.multi_label_threshold = threshold  # saved in config.json with the model
        logger.info("decision threshold %.2f (best micro-F1 on the validation split)", threshold)
    eval_metrics, test_metrics = evaluate(trainer, data)
    results.update({**eval_metrics, **test_metrics})
    if trainer.is_world_process_zero():
        card.model_name = trainer.hub_model_id or card.model_name  # the repo the card will live in, when pushed
        write_model_card(trainer.args.output_dir, card, test_metrics, eval_metrics)
    # Last, so that a push (the Trainer calls push_to_hub from here with --push_to_hub) finds the whole run:
    # the model (safetensors + config with label names), the image processor, the card and the results.
    trainer.save_model()
    return results


def evaluate(trainer, data: ImageData) -> tuple[dict, dict]:
    """The final evaluation on validation (--do_eval) and the one on test (--do_predict): metrics, and for test
    the per-class report, confusion matrix and predictions. Also the whole of an evaluation-only run."""
    eval_metrics, test_metrics = {}, {}
    if trainer.args.do_eval:
        eval_metrics = dict(trainer.evaluate(), eval_samples=len(data.validation))
        trainer.log_metrics("eval", eval_metrics)
        trainer.save_metrics("eval", eval_metrics)
    if trainer.args.do_predict and data.test is not None:
        output = trainer.predict(data.test, metric_key_prefix="test")
        test_metrics = dict(output.metrics, test_samples=len(data.test))
        extra = trainer.extra_test_metrics(data.test, output)
        if extra:
            trainer.log(dict(extra))  # to the trackers too (the Trainer logged only predict()'s own metrics)
        test_metrics.update(extra)
        trainer.log_metrics("test", test_metrics)
        trainer.save_metrics("test", test_metrics)
        if trainer.is_world_process_zero():
            stored = data.test.with_format(None)
            rows = np.asarray(stored[ROW])
            by_row = {}  # row -> file path, read a chunk at a time: the cells may hold every image's bytes
            for start in range(0, len(stored), 4096):
                chunk = stored[start:start + 4096]
                by_row.update(zip(chunk[ROW], (c.get("path") if isinstance(c, dict) else None
                                               for c in chunk[data.image_column])))
            data.task.write_test_report(trainer.args.output_dir, output.predictions, output.label_ids,
                                        data.label_names, rows, files=[by_row[r] for r in rows.tolist()])
    elif trainer.args.do_predict:
        logger.warning("the data set has no test split: the run reports validation results only")
    return eval_metrics, test_metrics


def _callback(trainer, kind):
    return next((c for c in trainer.callback_handler.callbacks if isinstance(c, kind)), None)
