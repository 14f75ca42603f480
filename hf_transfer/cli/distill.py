"""`run_distill.py`: train a smaller or faster student to mimic a fine-tuned teacher.

`main(argv)` is what the script runs. It is fine-tuning (same data, checks, recipes, outputs;
see finetune.py) with a teacher loaded and checked first and `DistillationTrainer` in place of
`TransferTrainer`.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from dataclasses import asdict

from transformers import set_seed

from ..config.flags import DistillationDataArguments, StudentArguments, parse_arguments
from ..config.recipes import fit_to_data, fitted_fields
from ..data.augmentation import resolve_augmentation
from ..data.samples import attach_transforms
from ..data.unlabeled import add_unlabeled_images
from ..errors import UserError, check_local_path
from ..models.loading import load_teacher
from ..models.presets import resolve_source
from ..run import record as run_args
from ..run.card import CardInfo, hyperparameters
from ..run.output_dir import prepare_output_dir, report_finished, save_run_args
from ..run.workflow import (
    check_setup,
    check_validation_split,
    fit_workers,
    load_data,
    load_trained_model,
    train_and_evaluate,
    trainer_kwargs,
)
from ..tasks.classification import check_metric
from ..trainers.distillation_config import DistillationConfig
from ..trainers.distillation_trainer import DistillationTrainer, teacher_cache_path

logger = logging.getLogger(__name__)


def main(argv: Sequence[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    parsed = parse_arguments(argv, StudentArguments, DistillationConfig, DistillationDataArguments)
    student_args, data_args, args = parsed.model, parsed.data, parsed.training
    check_local_path("--teacher_model_name_or_path", args.teacher_model_name_or_path)  # a typo fails now, not later
    if not args.do_train:
        raise UserError("run_distill.py trains a student; to evaluate a trained one as it is use "
                        "run_finetune.py --model_name_or_path STUDENT --do_train false")
    data_args.augmentation = resolve_augmentation(data_args.augmentation, data_args.train_dir or data_args.dataset_name)
    if args.cache_teacher_logits and (data_args.augmentation != "none" or data_args.random_erasing):
        raise UserError(f"--cache_teacher_logits needs --augmentation none and no --random_erasing (this run's "
                        f"augmentation is {data_args.augmentation}): with augmentation the teacher must see every "
                        "new view of an image")
    check_setup(args)
    source = resolve_source(student_args.model, student_args.model_name_or_path, StudentArguments.default_model)
    record, fitted = run_args.shaping(student_args, data_args, args), fitted_fields(args, parsed.given)
    output = prepare_output_dir(args, record, fitted)
    if output.finished is not None:
        return report_finished(args.output_dir, output.finished)

    set_seed(args.seed)
    data = load_data(data_args, args.seed, student_args.cache_dir)
    check_validation_split(data, parsed.passed)
    # the label column decided the task; the validation evaluation adds the distillation term (it can choose)
    check_metric(args.metric_for_best_model, data.task, args.ema_decay, also=("kd_loss",))
    if data_args.unlabeled_dir or data_args.unlabeled_dataset:
        if data.task.multi_label:
            raise UserError("images without labels are distilled into one-class-per-image students only; "
                            "this data set has several labels per image: leave --unlabeled_dir/--unlabeled_dataset out")
        add_unlabeled_images(data, data_args.unlabeled_dir, data_args.unlabeled_dataset, data_args.unlabeled_split,
                             student_args.cache_dir)
    teacher = load_teacher(args.teacher_model_name_or_path, data.label_names, revision=args.teacher_revision,
                           trust_remote_code=student_args.trust_remote_code, cache_dir=student_args.cache_dir,
                           problem_type=data.task.problem_type)
    student = load_trained_model(student_args, source, data)
    for change in [*fit_to_data(args, data.train_size, parsed.given, data.task), *fit_judge(args, parsed.given, data.task)]:
        logger.info("fitted to the data: %s", change)
    logger.info("teacher %s (input %s) -> student %s (input %s), augmentation %s", teacher.source, teacher.spec.size,
                source, student.spec.size, data_args.augmentation)

    # Hashing the teacher's weights costs a second on a ViT-B, and image files are read: only when the cache is
    # asked for. Before attach_transforms, which changes the data set's fingerprint.
    precision = "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32"
    cache_path = (teacher_cache_path(args.output_dir, teacher.model, teacher.spec, data.train, data.image_column,
                                     precision) if args.cache_teacher_logits else None)
    attach_transforms(data, data_args.augmentation, args.seed, data_args.random_erasing)
    fit_workers(args, data)
    run_config = {**asdict(student_args), **asdict(data_args)}
    trainer = DistillationTrainer(teacher=teacher.model, teacher_spec=teacher.spec,
                                  **trainer_kwargs(args, data, student, run_config, tags=["distillation"]))
    if cache_path is not None:
        trainer.use_cached_teacher_logits(data.train, cache_path)
    card = CardInfo(
        model_name=args.output_dir, base_model=source, from_scratch=student_args.from_scratch,
        dataset=data.name, label_names=data.label_names, teacher=teacher.source,
        hyperparameters=hyperparameters(
            args, student_args, data_args, model=source, family=student.family, image_size=student.spec.size[0],
            teacher=teacher.source, alpha=args.alpha, temperature=args.temperature,
            **({"unlabeled images": data.unlabeled} if data.unlabeled else {}),
        ),
    )
    save_run_args(args, "distill", run_args.shaping(student_args, data_args, args), fitted, argv, card)  # as fitted
    return train_and_evaluate(trainer, data, card, output.resume_from)


def fit_judge(args, given: set[str], task) -> list[str]:
    """Unless --metric_for_best_model is given, a student with one class per image is chosen by the distillation
    loss on the validation images (`eval_kd_loss`, labels unused): on digits' 144 validation images it never kept a
    student worse than the last weights, where validation accuracy kept ones up to 5 points worse
    (docs/distillation.md, "Which checkpoint is kept")."""
    if "metric_for_best_model" in given or task.multi_label:
        return []
    args.metric_for_best_model, args.greater_is_better = "kd_loss", False
    return ["--metric_for_best_model kd_loss (the checkpoint is chosen by the distillation loss on the validation "
            "images)"]
