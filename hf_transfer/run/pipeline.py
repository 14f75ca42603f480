"""The pipeline of a run: its steps in order, one method each, read top to bottom in `run`.

    FineTune(config).run()   run_finetune.py: a pretrained (or fresh) backbone, a new head, TransferTrainer
    Evaluate(config).run()   run_finetune.py --do_train false: a trained model scored as it is
    Distill(config).run()    run_distill.py: fine-tuning's steps, with images without labels, a frozen teacher and
                             DistillationTrainer

`pipeline_for(config)` picks the one the configuration's command needs (config/run_config.py); the hyperparameter
search runs FineTune for each trial. Every check that can fail (flags, output directory, data set, columns,
checkpoint) runs before any training time is spent, and the configuration is never changed: the data-fitted
values make a new one (`fit`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from transformers import TrainerCallback, set_seed

from ..config.fitting import fit_stream, fit_to_data, fit_workers
from ..config.run_config import RunConfig, parse_command
from ..data.check import FILE as CHECK_FILE
from ..data.check import check_image_data, leak_results, local_folders, summary, write_report
from ..data.dataset import ImageData
from ..data.samples import attach_transforms
from ..data.streaming import StreamingSplit
from ..data.unlabeled import add_unlabeled_images
from ..errors import UserError
from ..integrations.hub import check_push_possible
from ..integrations.launch import check_launch
from ..integrations.tracking import check_tracking
from ..models.loading import LoadedModel, load_model, load_teacher
from ..tasks.classification import check_metric, threshold_of
from ..tasks.objectives import DISTILLATION_LOSSES
from ..trainers.distillation_trainer import DistillationTrainer, teacher_cache_path
from ..trainers.transfer_trainer import TransferTrainer
from .assembly import load_data, trainer_kwargs
from .card import CardInfo, hyperparameters
from .output_dir import prepare_output_dir, report_finished, save_run_args
from .record import shaping as record_shaping
from .results import evaluate, train_and_evaluate

logger = logging.getLogger(__name__)


class FineTune:
    """run_finetune.py. `callbacks`: more Trainer callbacks for the run (a search trial's reporter)."""

    tags = ("fine-tuning",)
    judge: str | None = None  # the metric that chooses the checkpoint, where not the task's (Distill)

    def __init__(self, config: RunConfig, callbacks: Sequence[TrainerCallback] = ()):
        self.config, self.callbacks = config, list(callbacks)

    def run(self) -> dict:
        self.check_setup()
        output = prepare_output_dir(self.config.training, shaping(self.config), self.config.fitted_keys())
        if output.finished is not None:
            return report_finished(self.config.training.output_dir, output.finished)
        set_seed(self.config.training.seed)
        data = self.load_data()
        model = self.load_model(data)
        self.attach_transforms(data)
        self.check_data(data, model)
        self.config = self.fit(data)
        trainer = self.trainer(data, model)
        card = self.card(data, model)
        save_run_args(self.config, card)
        return self.train_and_evaluate(trainer, data, card, output.resume_from)

    # ---------------------------------------------------------------- the steps

    def check_setup(self) -> None:
        """What the launch, the trackers and the Hub need, checked before anything is downloaded or written."""
        check_launch(self.config.training)
        check_tracking(self.config.training)
        check_push_possible(self.config.training)

    def load_data(self) -> ImageData:
        """The data set, its splits checked against the flags (the label column decided the task: the metric that
        chooses the checkpoint is one its evaluations report)."""
        config = self.config
        data = load_data(config.data, config.training.seed, config.model.cache_dir)
        if "validation_split" in config.passed and not data.validation_from_train:
            raise UserError(f"--validation_split: {data.name} has a validation split of its own "
                            f"({len(data.validation)} images), which the run uses; leave --validation_split out")
        check_metric(config.training.metric_for_best_model, data.task, config.training.ema_decay,
                     also=(self.judge,) if self.judge else ())
        return data

    def load_model(self, data: ImageData) -> LoadedModel:
        """The model to train, with a head for the data set's labels."""
        model = self.config.model
        return load_model(
            self.config.source, data.label_names, from_scratch=model.from_scratch, image_size=model.image_size,
            crop_pct=model.crop_pct, revision=model.model_revision, trust_remote_code=model.trust_remote_code,
            cache_dir=model.cache_dir, drop_path_rate=model.drop_path_rate, problem_type=data.task.problem_type,
            family=self.config.family)

    def attach_transforms(self, data: ImageData) -> None:
        attach_transforms(data, self.config.data.augmentation, self.config.training.seed, self.config.data.random_erasing)

    def check_data(self, data: ImageData, model: LoadedModel) -> None:
        """The data check (data/check.py) on the splits as loaded, their pixels read where they were decoded once
        (no second decode): one line per finding, data_check.json/.html in the output folder, the leak counts in
        the results; with --on_data_leak stop a leak ends the run here, before training."""
        flags, training = self.config.data, self.config.training
        if not flags.data_check:
            return
        if isinstance(data.train, StreamingSplit):
            logger.info("data check: a streamed data set is not checked at the start of a run (python -m "
                        "hf_transfer check-data checks it whole)")
            return
        report = check_image_data(data, min(model.spec.size), local_folders(flags), data.decoded)
        data.leaks = leak_results(report)
        for severity, line in summary(report):
            logger.log(logging.INFO if severity == "info" else logging.WARNING, line)
        path = Path(training.output_dir) / CHECK_FILE
        if training.process_index == 0:
            write_report(report, training.output_dir, data)
        leaks = report["leaks"]["exact"] + report["leaks"]["near"]
        if leaks and flags.on_data_leak == "stop":
            raise UserError(f"{leaks} validation/test image(s) are also in an earlier split ({report['leaks']['exact']} "
                            f"exact, {report['leaks']['near']} near; listed in {path}); remove them, or pass "
                            "--on_data_leak warn to train anyway")

    def fit(self, data: ImageData) -> RunConfig:
        """The configuration with the defaults that depend on the data (config/fitting.py), each said in one line."""
        training = self.config.training
        fits = [*fit_to_data(training, data.train_size, self.config.given, data.task, self.judge),
                *fit_workers(training, data.in_memory), *fit_stream(training, isinstance(data.train, StreamingSplit))]
        for fit in fits:
            if fit.value is not None and not isinstance(fit.value, bool):
                logger.info("fitted to the data: %s", fit)
        return self.config.fitted_to({fit.flag: fit.value for fit in fits})

    def trainer(self, data: ImageData, model: LoadedModel) -> TransferTrainer:
        logger.info("model %s (%s), input %s, %d labels, augmentation %s", self.config.source, self.config.family,
                    model.spec.size, len(data.label_names), self.config.data.augmentation)
        return TransferTrainer(**self.trainer_kwargs(data, model))

    def trainer_kwargs(self, data: ImageData, model: LoadedModel) -> dict:
        run_config = {**asdict(self.config.model), **asdict(self.config.data)}  # for the trackers (W&B)
        return trainer_kwargs(self.config.training, data, model, run_config, tags=self.tags, callbacks=self.callbacks)

    def card(self, data: ImageData, model: LoadedModel, **extra) -> CardInfo:
        config = self.config
        return CardInfo(
            model_name=config.training.output_dir, base_model=config.source, from_scratch=config.model.from_scratch,
            dataset=data.name, label_names=data.label_names, teacher=extra.get("teacher"),
            data_leaks=dict(data.leaks) or None,
            hyperparameters=hyperparameters(config.training, config.model, config.data, model=config.source,
                                            family=config.family, image_size=model.spec.size[0], **extra),
        )

    def train_and_evaluate(self, trainer, data: ImageData, card: CardInfo, resume_from: str | None) -> dict:
        return train_and_evaluate(trainer, data, card, resume_from)


class Evaluate(FineTune):
    """run_finetune.py --do_train false: score the checkpoint on this data set's validation and test splits,
    unchanged."""

    tags = ("evaluation",)

    def fit(self, data: ImageData) -> RunConfig:
        """The DataLoader workers alone: nothing trains."""
        return self.config.fitted_to({f.flag: f.value for f in fit_workers(self.config.training, data.in_memory)})

    def trainer(self, data: ImageData, model: LoadedModel) -> TransferTrainer:
        return TransferTrainer(**trainer_kwargs(self.config.training, data, model, tags=self.tags))

    def card(self, data: ImageData, model: LoadedModel, **extra) -> None:
        return None  # no new model: no card

    def train_and_evaluate(self, trainer, data: ImageData, card, resume_from) -> dict:
        eval_metrics, test_metrics = evaluate(trainer, data)
        return {**eval_metrics, **test_metrics, **data.leaks}

    def load_model(self, data: ImageData) -> LoadedModel:
        model = super().load_model(data)
        if model.head_reset:
            raise UserError(f"--do_train false evaluates {model.source} as it is, but its classification head was "
                            f"made for other labels than this data set's ({len(data.label_names)}); evaluate a model "
                            "fine-tuned on these labels")
        if threshold_of(model.model.config) is not None:  # several labels per image: the threshold it was saved with
            data.task.threshold = threshold_of(model.model.config)
        return model

    def attach_transforms(self, data: ImageData) -> None:
        attach_transforms(data, "none", self.config.training.seed)


class Distill(FineTune):
    """run_distill.py: the student learns from a frozen teacher's answers (trainers/distillation_trainer.py), on the
    labelled images and on images without labels (data/unlabeled.py)."""

    tags = ("distillation",)
    # A student with one class per image is chosen by the distillation loss on the validation images, unless
    # --metric_for_best_model says otherwise (docs/distillation.md, "Which checkpoint is kept").
    judge = "kd_loss"

    def load_data(self) -> ImageData:
        data = super().load_data()
        loss = self.config.training.distillation_loss
        if data.task.multi_label and not DISTILLATION_LOSSES[loss].multi_label:
            raise UserError(f"--distillation_loss {loss} compares each image's class distribution (a softmax), and "
                            f"this data set has several labels per image: use --distillation_loss "
                            f"{' or '.join(n for n, c in DISTILLATION_LOSSES.items() if c.multi_label)}")
        flags = self.config.data
        if flags.unlabeled_dir or flags.unlabeled_dataset:
            if data.task.multi_label:
                raise UserError("images without labels are distilled into one-class-per-image students only; this "
                                "data set has several labels per image: leave --unlabeled_dir/--unlabeled_dataset out")
            add_unlabeled_images(data, flags.unlabeled_dir, flags.unlabeled_dataset, flags.unlabeled_split,
                                 self.config.model.cache_dir)
        return data

    def load_model(self, data: ImageData) -> LoadedModel:
        """The teacher (checked against the data set's labels and task), then the student."""
        training, model = self.config.training, self.config.model
        self.teacher = load_teacher(training.teacher_model_name_or_path, data.label_names,
                                    revision=training.teacher_revision, trust_remote_code=model.trust_remote_code,
                                    cache_dir=model.cache_dir, problem_type=data.task.problem_type)
        return super().load_model(data)

    def attach_transforms(self, data: ImageData) -> None:
        # The teacher-logit cache's file is named by the data set's fingerprint before the transforms change it.
        # Hashing the teacher's weights costs a second on a ViT-B, and image files are read: only when asked for.
        training = self.config.training
        precision = "bf16" if training.bf16 else "fp16" if training.fp16 else "fp32"
        self.cache_path = (teacher_cache_path(training.output_dir, self.teacher.model, self.teacher.spec, data.train,
                                              data.image_column, precision)
                           if training.cache_teacher_logits else None)
        super().attach_transforms(data)

    def trainer(self, data: ImageData, model: LoadedModel) -> DistillationTrainer:
        logger.info("teacher %s (input %s) -> student %s (input %s), augmentation %s", self.teacher.source,
                    self.teacher.spec.size, self.config.source, model.spec.size, self.config.data.augmentation)
        trainer = DistillationTrainer(teacher=self.teacher.model, teacher_spec=self.teacher.spec,
                                      **self.trainer_kwargs(data, model))
        if self.cache_path is not None:
            trainer.use_cached_teacher_logits(data.train, self.cache_path)
        return trainer

    def card(self, data: ImageData, model: LoadedModel, **extra) -> CardInfo:
        training = self.config.training
        return super().card(data, model, teacher=self.teacher.source, alpha=training.alpha,
                            temperature=training.temperature,
                            **({"unlabeled images": data.unlabeled} if data.unlabeled else {}))


def pipeline_for(config: RunConfig, callbacks: Sequence[TrainerCallback] = ()) -> FineTune:
    return {"finetune": FineTune, "evaluate": Evaluate, "distill": Distill}[config.command](config, callbacks)


def run(command: str, argv: Sequence[str], callbacks: Sequence[TrainerCallback] = ()) -> dict:
    """`command` ("finetune", "distill") with the flags `argv`, parsed once: what the scripts and each search trial
    run. `callbacks`: more Trainer callbacks (a search trial's reporter)."""
    return pipeline_for(parse_command(command, argv), callbacks).run()


def shaping(config: RunConfig) -> dict:
    """The settings of `config` that shape training (run/record.py), as the output folder's record compares them."""
    return record_shaping(config.model, config.data, config.training)
