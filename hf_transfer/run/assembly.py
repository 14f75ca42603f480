"""What a run is assembled from: its data (in memory or streamed) and the parts of its trainer (callbacks, collator,
metrics, class weights), as the pipeline's steps (pipeline.py) and the tests build them."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from ..data.dataset import ImageData, load_image_data
from ..data.samples import EpochCallback, UInt8Collator
from ..data.streaming import load_streaming_data
from ..errors import UserError
from ..integrations.tracking import LastStepLog, RunConfigCallback, ThroughputCallback
from ..models.loading import LoadedModel
from ..models.structure import depth_groups
from ..tasks.metrics import ComputeMetrics
from ..trainers.freezing import UnfreezeCallback, trainable_names
from ..trainers.selection import EarlyStopping, chooses
from .checkpoints import StopOnSignal
from .output_dir import FindBestCheckpoint, RecordInCheckpoints

logger = logging.getLogger(__name__)


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
