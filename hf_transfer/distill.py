"""Distillation: train a smaller or faster student to mimic a fine-tuned teacher.

`main(argv)` is what `run_distill.py` runs. It is fine-tuning (same data, checks, recipes,
outputs; see finetune.py) with a teacher loaded and checked first and `DistillationTrainer`
in place of `TransferTrainer`.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from dataclasses import asdict

from transformers import set_seed

from .arguments import (
    DataArguments,
    DistillationArguments,
    StudentArguments,
    TransferTrainingArguments,
    fit_to_data,
    given_flags,
    parse_with_defaults,
    validate_distillation,
)
from .augment import resolve_augmentation
from .data import attach_transforms
from .distillation import DistillationTrainer, teacher_cache_path
from .errors import run_cli
from .model_card import CardInfo
from .models import load_teacher, resolve_source
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
ARGUMENT_TYPES = (StudentArguments, DistillationArguments, DataArguments, TransferTrainingArguments)


def main(argv: Sequence[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    student_args, distill_args, data_args, args = parse_and_check(argv, ARGUMENT_TYPES)
    validate_distillation(distill_args, data_args, args)
    source = resolve_source(student_args.model, student_args.model_name_or_path, default="resnet18")
    resume_from = prepare_output_dir(args)

    set_seed(args.seed)
    data = load_data(data_args, args.seed)
    teacher = load_teacher(distill_args.teacher_model_name_or_path, data.label_names,
                           revision=distill_args.teacher_revision, trust_remote_code=student_args.trust_remote_code)
    student = load_trained_model(student_args, source, data)
    student_args, distill_args, data_args, args = parse_with_defaults(argv, ARGUMENT_TYPES, family=student.family)
    for change in fit_to_data(args, len(data.train), given_flags(argv, student_args.recipe, student.family)):
        logger.info("small data set: %s", change)
    data_args.augmentation = resolve_augmentation(data_args.augmentation, data.name)
    logger.info("teacher %s (input %s) -> student %s (input %s), augmentation %s", teacher.source, teacher.spec.size,
                source, student.spec.size, data_args.augmentation)

    # Hashing the teacher's weights costs a second on a ViT-B: only when the cache is asked for. Before
    # attach_transforms, which changes the data set's fingerprint.
    cache_path = (teacher_cache_path(args.output_dir, teacher.model, teacher.spec, data.train)
                  if distill_args.cache_teacher_logits else None)
    attach_transforms(data, data_args.augmentation, args.seed)
    push_to = hub_push_plan(args)
    run_config = {**asdict(student_args), **asdict(distill_args), **asdict(data_args)}
    trainer = DistillationTrainer(teacher=teacher.model, teacher_spec=teacher.spec, alpha=distill_args.alpha,
                                  temperature=distill_args.temperature,
                                  **trainer_kwargs(args, data, student, run_config, tags=["distillation"]))
    if distill_args.cache_teacher_logits:
        trainer.use_cached_teacher_logits(data.train, cache_path)
    card = CardInfo(
        model_name=push_to or args.output_dir, base_model=source, from_scratch=student_args.from_scratch,
        dataset=data.name, label_names=data.label_names, teacher=teacher.source,
        hyperparameters=hyperparameters(
            args, model=source, family=student.family, image_size=student.spec.size[0],
            augmentation=data_args.augmentation, recipe=student_args.recipe, teacher=teacher.source,
            alpha=distill_args.alpha, temperature=distill_args.temperature,
        ),
    )
    return train_and_evaluate(trainer, data, card, resume_from, push_to)


def cli() -> None:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    sys.exit(run_cli(main))
