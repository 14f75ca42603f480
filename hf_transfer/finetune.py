"""Fine-tuning: a pretrained (or fresh) backbone, a new head for the data set's labels, the Trainer.

`main(argv)` is what `run_finetune.py` runs and what the tests call in-process. Every check
that can fail (flags, output directory, data set, columns, checkpoint) runs before any
training time is spent.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from dataclasses import asdict

from transformers import set_seed

from .arguments import (
    DataArguments,
    ModelArguments,
    TransferTrainingArguments,
    fit_to_data,
    given_flags,
    parse_with_defaults,
)
from .augment import resolve_augmentation
from .data import attach_transforms
from .errors import run_cli
from .model_card import CardInfo
from .models import resolve_source
from .trainer import TransferTrainer
from .training import (
    hub_push_plan,
    hyperparameters,
    load_data,
    load_trained_model,
    parse_and_check,
    prepare_output_dir,
    train_and_evaluate,
    trainer_kwargs,
)

logger = logging.getLogger(__name__)
ARGUMENT_TYPES = (ModelArguments, DataArguments, TransferTrainingArguments)


def main(argv: Sequence[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    model_args, data_args, args = parse_and_check(argv, ARGUMENT_TYPES)
    source = resolve_source(model_args.model, model_args.model_name_or_path)
    resume_from = prepare_output_dir(args)

    set_seed(args.seed)
    data = load_data(data_args, args.seed)
    loaded = load_trained_model(model_args, source, data)
    # Now that the model family is known, its recipe fills the optimiser flags the user left out.
    model_args, data_args, args = parse_with_defaults(argv, ARGUMENT_TYPES, family=loaded.family)
    for change in fit_to_data(args, len(data.train), given_flags(argv, model_args.recipe, loaded.family)):
        logger.info("small data set: %s", change)
    data_args.augmentation = resolve_augmentation(data_args.augmentation, data.name)
    logger.info("model %s (%s), input %s, %d labels, augmentation %s", source, loaded.family, loaded.spec.size,
                len(data.label_names), data_args.augmentation)

    attach_transforms(data, data_args.augmentation, args.seed)
    push_to = hub_push_plan(args)
    run_config = {**asdict(model_args), **asdict(data_args)}
    trainer = TransferTrainer(**trainer_kwargs(args, data, loaded, run_config, tags=["fine-tuning"]))
    card = CardInfo(
        model_name=push_to or args.output_dir, base_model=source, from_scratch=model_args.from_scratch,
        dataset=data.name, label_names=data.label_names,
        hyperparameters=hyperparameters(args, model=source, family=loaded.family, image_size=loaded.spec.size[0],
                                        augmentation=data_args.augmentation, recipe=model_args.recipe),
    )
    return train_and_evaluate(trainer, data, card, resume_from, push_to)


def cli() -> None:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    sys.exit(run_cli(main))
