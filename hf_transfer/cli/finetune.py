"""`run_finetune.py`: a pretrained (or fresh) backbone, a new head for the data set's labels, the Trainer.

`main(argv)` is what the script runs and what the tests call in-process. Every check that can
fail (flags, output directory, data set, columns, checkpoint) runs before any training time is spent.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from dataclasses import asdict

from transformers import TrainerCallback, set_seed

from ..config.flags import parse_arguments
from ..config.recipes import fit_to_data, fitted_fields
from ..data.augmentation import resolve_augmentation
from ..data.samples import attach_transforms
from ..errors import UserError
from ..models.presets import resolve_source
from ..run import record as run_args
from ..run.card import CardInfo, hyperparameters
from ..run.output_dir import prepare_output_dir, report_finished, save_run_args
from ..run.workflow import (
    check_setup,
    check_validation_split,
    evaluate,
    fit_workers,
    load_data,
    load_trained_model,
    train_and_evaluate,
    trainer_kwargs,
)
from ..tasks.classification import check_metric, threshold_of
from ..trainers.transfer_trainer import TransferTrainer

logger = logging.getLogger(__name__)


def main(argv: Sequence[str] | None = None, callbacks: Sequence[TrainerCallback] = ()) -> dict:
    """`callbacks`: more Trainer callbacks for the run (a hyperparameter search's trial reporter, search.py)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parsed = parse_arguments(argv)
    model_args, data_args, args = parsed.model, parsed.data, parsed.training
    data_args.augmentation = resolve_augmentation(data_args.augmentation, data_args.train_dir or data_args.dataset_name)
    if not args.do_train and (model_args.from_scratch or args.push_to_hub):
        raise UserError("--do_train false evaluates a trained model as it is: not with --from_scratch (random weights) "
                        "or --push_to_hub (nothing new to push)")
    check_setup(args)
    source = resolve_source(model_args.model, model_args.model_name_or_path)
    record, fitted = run_args.shaping(model_args, data_args, args), fitted_fields(args, parsed.given)
    output = prepare_output_dir(args, record, fitted)
    if output.finished is not None:
        return report_finished(args.output_dir, output.finished)

    set_seed(args.seed)
    data = load_data(data_args, args.seed, model_args.cache_dir)
    check_validation_split(data, parsed.passed)
    check_metric(args.metric_for_best_model, data.task, args.ema_decay)  # the label column decided the task
    loaded = load_trained_model(model_args, source, data)
    if not args.do_train:
        return evaluate_as_is(args, data, loaded, record, fitted, argv)
    for change in fit_to_data(args, data.train_size, parsed.given, data.task):
        logger.info("fitted to the data: %s", change)
    logger.info("model %s (%s), input %s, %d labels, augmentation %s", source, loaded.family, loaded.spec.size,
                len(data.label_names), data_args.augmentation)

    attach_transforms(data, data_args.augmentation, args.seed, data_args.random_erasing)
    fit_workers(args, data)
    run_config = {**asdict(model_args), **asdict(data_args)}
    trainer = TransferTrainer(**trainer_kwargs(args, data, loaded, run_config, tags=["fine-tuning"], callbacks=callbacks))
    card = CardInfo(
        model_name=args.output_dir, base_model=source, from_scratch=model_args.from_scratch,
        dataset=data.name, label_names=data.label_names,
        hyperparameters=hyperparameters(args, model_args, data_args, model=source, family=loaded.family,
                                        image_size=loaded.spec.size[0]),
    )
    save_run_args(args, "finetune", run_args.shaping(model_args, data_args, args), fitted, argv, card)  # as fitted
    return train_and_evaluate(trainer, data, card, output.resume_from)


def evaluate_as_is(args, data, loaded, record: dict, fitted: set[str], argv: list[str]) -> dict:
    """`--do_train false`: score the checkpoint on this data set's validation and test splits, unchanged."""
    if loaded.head_reset:
        raise UserError(f"--do_train false evaluates {loaded.source} as it is, but its classification head was made "
                        f"for other labels than this data set's ({len(data.label_names)}); evaluate a model "
                        "fine-tuned on these labels")
    if threshold_of(loaded.model.config) is not None:  # several labels per image: the threshold it was saved with
        data.task.threshold = threshold_of(loaded.model.config)
    attach_transforms(data, "none", args.seed)
    fit_workers(args, data)
    trainer = TransferTrainer(**trainer_kwargs(args, data, loaded, tags=["evaluation"]))
    save_run_args(args, "evaluate", record, fitted, argv)
    eval_metrics, test_metrics = evaluate(trainer, data)
    return {**eval_metrics, **test_metrics}
