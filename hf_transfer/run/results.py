"""The end of a run: train, keep the checkpoint chosen on validation, test it once, and write what it measured (results
files, the test report, the model card), then save the model and push it."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from ..data.dataset import ROW, ImageData
from ..data.streaming import StreamingSplit
from ..errors import Preempted
from ..integrations.tracking import ThroughputCallback, peak_memory, reset_peak_memory
from .calibration import Calibration, calibrate, calibration_results, not_calibrated
from .card import CardInfo, write_model_card
from .checkpoints import StopOnSignal

logger = logging.getLogger(__name__)


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
    results.update(data.leaks)  # the data check's (run/pipeline.py): validation/test images seen in training
    choice = trainer.checkpoint_choice()  # which weights the run kept, and why: in the results and the card
    results.update(choice.results())
    logger.info("kept %s", choice.sentence())
    if choice.warning:
        logger.warning(choice.warning)
    trainer.log_metrics("train", {k: v for k, v in results.items() if k != "selected_by"})  # said above, in a line
    trainer.save_metrics("train", results)
    trainer.save_state()

    # The temperature first (run/calibration.py): the multi-label threshold is then chosen on the scores the saved
    # model gives, the calibrated ones.
    calibration = calibrate(trainer, data) if trainer.args.calibrate else not_calibrated(trainer.model, False)
    if data.task.multi_label:  # the decision threshold, chosen on validation predictions (never on test)
        if calibration.validation_logits is not None:
            logits, labels = calibration.validation_logits / calibration.temperature, calibration.validation_labels
        else:
            output = trainer.predict(data.validation, metric_key_prefix="threshold")
            logits, labels = output.predictions, output.label_ids
        threshold = data.task.choose_threshold(logits, labels)
        trainer.model.config.multi_label_threshold = threshold  # saved in config.json with the model
        logger.info("decision threshold %.2f (best micro-F1 on the validation split)", threshold)
    eval_metrics, test_metrics = evaluate(trainer, data, calibration)
    results.update({**eval_metrics, **test_metrics})
    if trainer.is_world_process_zero():
        card.model_name = trainer.hub_model_id or card.model_name  # the repo the card will live in, when pushed
        write_model_card(trainer.args.output_dir, card, test_metrics, eval_metrics)
    # Last, so that a push (the Trainer calls push_to_hub from here with --push_to_hub) finds the whole run:
    # the model (safetensors + config with label names), the image processor, the card and the results.
    trainer.save_model()
    return results


def evaluate(trainer, data: ImageData, calibration: Calibration | None = None) -> tuple[dict, dict]:
    """The final evaluation on validation (--do_eval) and the one on test (--do_predict): metrics, calibration (the
    run's `calibration`; None: the model's own, an evaluation-only run), and for test the per-class report, confusion
    matrix and predictions. Also the whole of an evaluation-only run."""
    if calibration is None:
        calibration = not_calibrated(trainer.model, evaluation=True)
    eval_metrics, test_metrics = {}, {}
    if trainer.args.do_eval:
        eval_metrics = dict(trainer.evaluate(), eval_samples=len(data.validation))
    output = None
    if trainer.args.do_predict and data.test is not None:
        output = trainer.predict(data.test, metric_key_prefix="test")
    elif trainer.args.do_predict:
        logger.warning("the data set has no test split: the run reports validation results only")
    found = calibration_results(trainer.args.output_dir, calibration,
                                None if output is None else output.predictions,
                                None if output is None else output.label_ids,
                                data.task.multi_label, trainer.is_world_process_zero())
    if trainer.args.do_eval:
        eval_metrics.update({k: v for k, v in found.items() if k.startswith("eval_") or output is None})
        trainer.log_metrics("eval", eval_metrics)
        trainer.save_metrics("eval", eval_metrics)
    if output is not None:
        test_metrics = dict(output.metrics, test_samples=len(data.test))
        extra = trainer.extra_test_metrics(data.test, output)
        extra.update({k: v for k, v in found.items() if not k.startswith("eval_")})
        if "test_ece" in extra:
            logger.info("test ECE %.4f (%.4f before the temperature %.3f)", extra["test_ece"],
                        extra["test_ece_uncalibrated"], extra["calibration_temperature"])
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
    return eval_metrics, test_metrics


def _callback(trainer, kind):
    return next((c for c in trainer.callback_handler.callbacks if isinstance(c, kind)), None)
