"""A run's calibration step (tasks/calibration.py does the arithmetic): after the kept checkpoint is loaded and before
the test, a temperature is fitted on the validation predictions and folded into the classifier's last layer, so that
the saved model gives calibrated probabilities; after the test, `calibration.json`, `test_reliability.png` and the
`*_ece` results say what it changed.

The temperature is recorded in the model's config (`calibration_temperature`, in config.json): a distillation teacher
multiplies it back (models/loading.py `load_teacher`), and a checkpoint saved during training never carries it (the
fold comes after the last one), so a resumed run folds once, on the weights it trained.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..models.structure import classifier_linears
from ..tasks.calibration import (
    TEMPERATURE_KEY,
    calibration_summary,
    fit_temperature,
    fold_temperature,
    plot_reliability,
)

logger = logging.getLogger(__name__)

CONFIG_KEY = TEMPERATURE_KEY  # in the saved model's config.json


@dataclass
class Calibration:
    """What the model's probabilities were divided by: the temperature folded (1.0, and `skipped` saying why, when
    none was), where it was fitted and folded, and the validation predictions before it (None when the step did not
    predict them: --calibrate false, an evaluation of a saved model)."""

    temperature: float
    folded_into: list[str]
    skipped: str | None = None
    fitted_on: str | None = "validation"
    validation_logits: np.ndarray | None = None
    validation_labels: np.ndarray | None = None


def calibrate(trainer, data) -> Calibration:
    """Predict the validation split, fit the temperature, fold it into the model (every process the same: the
    predictions are gathered from all of them), and record it in the model's config."""
    output = trainer.predict(data.validation, metric_key_prefix="calibration")
    logits = output.predictions[0] if isinstance(output.predictions, tuple) else output.predictions
    logits, labels = np.asarray(logits, dtype=np.float64), np.asarray(output.label_ids)
    model = trainer.model
    temperature, skipped = fit_temperature(logits, labels, data.task.multi_label)
    linears, why_not = classifier_linears(model)
    if trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled:
        why_not = "the weights are sharded or partitioned (FSDP, DeepSpeed): the classifier is not folded"
    skipped = skipped or why_not
    folded = []
    if skipped is None:
        fold_temperature(linears, temperature)
        folded = _names(model, linears)
        setattr(model.config, CONFIG_KEY, temperature)  # saved in config.json with the model
        logger.info("calibration: temperature %.3f fitted on %d validation images, folded into %s", temperature,
                    len(labels), ", ".join(folded))
    else:
        temperature = 1.0
        forget_temperature(model.config)
        logger.warning("calibration: no temperature folded (%s)", skipped)
    return Calibration(temperature, folded, skipped, "validation", logits, labels)


def not_calibrated(model, evaluation: bool) -> Calibration:
    """No step of this run folds a temperature. An evaluation of a saved model reports the one it carries (folded when
    it was trained; never a second one). --calibrate false folds none, and a temperature the model started with no
    longer belongs to its weights, which trained further: it is dropped from the config."""
    temperature = getattr(model.config, CONFIG_KEY, None)
    if evaluation and temperature is not None:
        return Calibration(float(temperature), _names(model, classifier_linears(model)[0]), None,
                           "validation, when the model was trained")
    if not evaluation:
        forget_temperature(model.config)
    return Calibration(1.0, [], "the model carries no temperature" if evaluation else "--calibrate false", None)


def _names(model, linears) -> list[str]:
    ids = {id(p) for linear in linears for p in linear.parameters()}
    return [name for name, p in model.named_parameters() if id(p) in ids]


def forget_temperature(config) -> None:
    if hasattr(config, CONFIG_KEY):
        delattr(config, CONFIG_KEY)


def calibration_results(output_dir, calibration: Calibration, test_logits: np.ndarray | None,
                        test_labels: np.ndarray | None, multi_label: bool, write: bool) -> dict:
    """The `*_ece` results (`test_ece`: the model's own probabilities, `test_ece_uncalibrated`: those before the
    temperature, the same without one), and (`write`: the main process) calibration.json and test_reliability.png."""
    t = calibration.temperature
    results = {"calibration_temperature": t}
    record = {"temperature": t, "fitted_on": calibration.fitted_on,
              "folded_into": ", ".join(calibration.folded_into) or None}
    if calibration.skipped:
        record["skipped"] = calibration.skipped
    splits = {}
    if test_logits is not None:  # predicted by the model as it is saved: after the fold
        splits["test"] = (np.asarray(test_logits, dtype=np.float64), np.asarray(test_labels))
    if calibration.validation_logits is not None:  # predicted before the fold
        splits["validation"] = (calibration.validation_logits / t, calibration.validation_labels)
    prefix = {"test": "test", "validation": "eval"}
    for split, (logits, labels) in splits.items():
        after = calibration_summary(logits, labels, multi_label)
        before = calibration_summary(logits * t, labels, multi_label) if t != 1.0 else after
        results.update({f"{prefix[split]}_ece": after["ece"], f"{prefix[split]}_ece_uncalibrated": before["ece"]})
        record[split] = {"before": before, "after": after}
    if write and splits:
        output_dir = Path(output_dir)
        (output_dir / "calibration.json").write_text(json.dumps(record, indent=2))
        split = "test" if "test" in record else "validation"  # a data set without a test split: validation's
        shown = record[split]
        plot_reliability(shown["before"]["bins"], shown["after"]["bins"] if t != 1.0 else None,
                         output_dir / f"{split}_reliability.png", f"reliability ({split} split)",
                         shown["before"]["ece"], shown["after"]["ece"], t)
    return results
