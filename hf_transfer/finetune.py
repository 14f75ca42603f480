"""Fine-tuning: a pretrained (or fresh) backbone, a new head for the data set's labels, the Trainer.

`main(argv)` is what `run_finetune.py` runs and what the tests call in-process. Order
matters for the user: every check that can fail (flags, output directory, data set,
columns, checkpoint) runs before any training time is spent.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

from transformers import EarlyStoppingCallback, set_seed

from .arguments import (
    DataArguments,
    ModelArguments,
    TransferTrainingArguments,
    parse_with_defaults,
    validate_numbers,
)
from .data import UInt8Collator, attach_transforms, load_image_data
from .errors import UserError, run_cli
from .metrics import ComputeMetrics
from .model_card import CardInfo
from .models import load_model, resolve_source
from .trainer import TransferTrainer
from .training import hyperparameters, prepare_output_dir, train_and_evaluate

logger = logging.getLogger(__name__)
ARGUMENT_TYPES = (ModelArguments, DataArguments, TransferTrainingArguments)


def main(argv: Sequence[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    model_args, data_args, args = parse_with_defaults(argv, ARGUMENT_TYPES)
    validate_numbers(model_args, data_args, args)
    check_early_stopping(args)
    source = resolve_source(model_args.model, model_args.model_name_or_path)
    resume_from = prepare_output_dir(args)

    set_seed(args.seed)
    data = load_data(data_args, args.seed)
    loaded = load_model(
        source, data.label_names, from_scratch=model_args.from_scratch, image_size=model_args.image_size,
        revision=model_args.model_revision, trust_remote_code=model_args.trust_remote_code,
    )
    # Now that the model family is known, its recipe fills the optimiser flags the user left out.
    model_args, data_args, args = parse_with_defaults(argv, ARGUMENT_TYPES, family=loaded.family)
    logger.info("model %s (%s), input %s, %d labels", source, loaded.family, loaded.spec.size, len(data.label_names))

    attach_transforms(data, data_args.augmentation)
    trainer = TransferTrainer(
        model=loaded.model,
        args=args,
        train_dataset=data.train,
        eval_dataset=data.validation,
        data_collator=UInt8Collator(loaded.spec.size, loaded.spec.interpolation),
        processing_class=loaded.spec.to_image_processor(),
        compute_metrics=ComputeMetrics(len(data.label_names)),
        callbacks=early_stopping(args),
        image_spec=loaded.spec,
    )
    card = CardInfo(
        model_name=args.hub_model_id or args.output_dir,
        base_model=source,
        from_scratch=model_args.from_scratch,
        dataset=data.name,
        label_names=data.label_names,
        hyperparameters=hyperparameters(
            args, model=source, family=loaded.family, **{"image size": f"{loaded.spec.size[0]} px"},
            augmentation=data_args.augmentation, recipe=model_args.recipe,
        ),
    )
    return train_and_evaluate(trainer, data, card, resume_from)


def load_data(data_args: DataArguments, seed: int):
    return load_image_data(
        dataset_name=data_args.dataset_name, dataset_config_name=data_args.dataset_config_name,
        train_dir=data_args.train_dir, validation_dir=data_args.validation_dir, test_dir=data_args.test_dir,
        image_column=data_args.image_column, label_column=data_args.label_column,
        validation_split=data_args.validation_split, max_train_samples=data_args.max_train_samples,
        max_eval_samples=data_args.max_eval_samples, seed=seed,
    )


def check_early_stopping(args) -> None:
    if args.early_stopping_patience is not None and not args.load_best_model_at_end:
        raise UserError("--early_stopping_patience needs --load_best_model_at_end (the default)")


def early_stopping(args) -> list:
    if args.early_stopping_patience is None:
        return []
    return [EarlyStoppingCallback(early_stopping_patience=args.early_stopping_patience)]


def cli() -> None:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    sys.exit(run_cli(main))
