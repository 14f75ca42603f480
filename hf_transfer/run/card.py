"""The model card (README.md) written into every output directory, from the run's own numbers.

The YAML block is what the Hub reads (base_model, datasets, `model-index` with the test
results); the body says what was trained, how, and how to use it.
"""

from __future__ import annotations

import json
import os
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from ..data.sources import DIGITS_NAME

_TEMPLATE = """---
{{ card_data }}
---

# {{ model_name }}

{{ body }}
"""

_RESULT_KEYS = [("accuracy", "accuracy"), ("f1", "f1 (weighted)"), ("precision", "precision (weighted)"),
                ("recall", "recall (weighted)"), ("f1_macro", "f1 (macro)"), ("top5_accuracy", "top-5 accuracy")]
# Several labels per image (tasks.py): mAP needs no threshold; the rest is at the threshold chosen on validation.
_MULTILABEL_KEYS = [("map", "mAP (macro)"), ("map_micro", "mAP (micro)"), ("f1", "f1 (micro)"),
                    ("f1_macro", "f1 (macro)"), ("precision", "precision (micro)"), ("recall", "recall (micro)"),
                    ("accuracy", "exact-match accuracy (every label right)"),
                    ("threshold", "decision threshold (sigmoid score, chosen on validation)")]


@dataclass
class CardInfo:
    model_name: str
    base_model: str  # checkpoint the run started from (or the architecture, when from scratch)
    from_scratch: bool
    dataset: str
    label_names: list[str]
    hyperparameters: dict[str, object] = field(default_factory=dict)
    teacher: str | None = None  # set for distilled models
    dataset_on_hub: bool | None = None  # decided when the card is made, where the data set's path means something
    data_leaks: dict[str, int] | None = None  # the data check's leak counts (data/check.py), where it ran

    def __post_init__(self):
        if self.dataset_on_hub is None:
            self.dataset_on_hub = _is_hub_id(self.dataset)


def _is_hub_id(name: str) -> bool:
    return name.count("/") == 1 and not Path(name).exists() and not name.startswith((".", "/"))


def _about_dataset(info: CardInfo) -> str:
    """The data set in prose; only a Hub data set goes into the metadata as one."""
    if info.dataset_on_hub:
        return f"`{info.dataset}`"
    if info.dataset == DIGITS_NAME:
        return "scikit-learn's bundled 8x8 handwritten digits (`--dataset_name digits`, not a Hub data set)"
    return f"a local data set (`{info.dataset}`, not on the Hub)"


def _versions() -> list[str]:
    """Library versions, as the transformers Trainer's cards record them."""
    from importlib.metadata import PackageNotFoundError, version

    lines = []
    for package in ("hf-vision-transfer", "transformers", "torch", "timm", "datasets", "accelerate"):
        try:
            lines.append(f"- {package} {version(package)}")
        except PackageNotFoundError:
            continue
    return lines


def render_model_card(info: CardInfo, test_metrics: dict | None, eval_metrics: dict | None,
                      train_metrics: dict | None = None) -> ModelCard:
    test_metrics, eval_metrics, train_metrics = test_metrics or {}, eval_metrics or {}, train_metrics or {}
    eval_results = [
        EvalResult(task_type="image-classification", dataset_type=info.dataset if info.dataset_on_hub else "custom",
                   dataset_name=info.dataset,
                   dataset_split="test", metric_type=key, metric_name=name,
                   metric_value=round(float(test_metrics[f"test_{key}"]), 4))
        for key, name in _result_keys(test_metrics) if f"test_{key}" in test_metrics and key != "threshold"
    ]
    tags = ["image-classification", "vision", "hf-vision-transfer",
            "knowledge-distillation" if info.teacher else "transfer-learning"]
    if "test_map" in test_metrics:
        tags.append("multi-label-classification")
    data = ModelCardData(
        license="apache-2.0",
        library_name="transformers",
        pipeline_tag="image-classification",
        tags=tags,
        model_name=info.model_name,
        base_model=info.base_model if _is_hub_id(info.base_model) and not info.from_scratch else None,
        datasets=[info.dataset] if info.dataset_on_hub else None,
        eval_results=eval_results or None,
    )
    return ModelCard.from_template(data, template_str=_TEMPLATE, model_name=info.model_name,
                                   body=_body(info, test_metrics, eval_metrics, train_metrics))


def _result_keys(test_metrics: dict) -> list[tuple[str, str]]:
    return _MULTILABEL_KEYS if "test_map" in test_metrics else _RESULT_KEYS


def _kept(train_metrics: dict) -> str | None:
    """Which weights the model is and why (trainers/selection.py, recorded in train_results.json)."""
    if "selected_step" not in train_metrics:  # a run from before the choice was recorded
        return None
    step, last = train_metrics["selected_step"], train_metrics.get("train_steps")
    which = "the last" if step == last else f"of {last}" if last else ""
    epoch = f"epoch {train_metrics['selected_epoch']:g}" if "selected_epoch" in train_metrics else ""
    detail = ", ".join(part for part in (which, epoch) if part)
    return f"Kept weights: step {step}{f' ({detail})' if detail else ''}, {train_metrics['selected_by']}."


def _body(info: CardInfo, test_metrics: dict, eval_metrics: dict, train_metrics: dict) -> str:
    if info.teacher:  # the student: its architecture and where its weights started, then the teacher
        begun = ("from random weights (the architecture of " if info.from_scratch else "from the weights of ") + \
            f"`{info.base_model}`" + (")" if info.from_scratch else "")
        start = f"distilled from the teacher `{info.teacher}` into a student that started {begun},"
    else:
        start = (f"trained from random weights (the architecture of `{info.base_model}`)" if info.from_scratch
                 else f"fine-tuned from `{info.base_model}`")
    lines = [f"An image classifier {start} on {_about_dataset(info)} ({len(info.label_names)} classes), "
             "made with hf-vision-transfer and the transformers `Trainer`.", ""]

    lines += ["## Results", ""]
    several = "test_map" in test_metrics or "eval_map" in eval_metrics  # several labels per image
    if several:
        lines += ["Several labels per image: each label has its own sigmoid score (`pipeline` returns them all); a "
                  "label is predicted when its score reaches the decision threshold, saved in `config.json` as "
                  "`multi_label_threshold`.", ""]
    kept = _kept(train_metrics)
    if kept:
        lines += [kept, ""]
    if test_metrics:
        chosen_on = "these weights" if kept else \
            f"the checkpoint chosen on {'validation mAP' if several else 'validation accuracy'}"
        lines += [f"Test split, evaluated once after training with {chosen_on}:", "",
                  "| metric | value |", "|---|---|"]
        lines += [f"| {name} | {test_metrics[f'test_{key}']:.4f} |" for key, name in _result_keys(test_metrics)
                  if f"test_{key}" in test_metrics]
        for key, name in (("test_teacher_accuracy", "teacher accuracy"), ("test_teacher_map", "teacher mAP"),
                          ("test_agreement", "student-teacher agreement")):
            if key in test_metrics:
                lines.append(f"| {name} | {test_metrics[key]:.4f} |")
    else:
        lines.append("The data set has no test split; see the validation results below.")
    lines += _calibration(test_metrics)
    images = f" ({eval_metrics['eval_samples']} images)" if "eval_samples" in eval_metrics else ""
    if "eval_map" in eval_metrics:
        lines += ["", f"Validation mAP{images}: {eval_metrics['eval_map']:.4f}."]
    elif "eval_accuracy" in eval_metrics:
        lines += ["", f"Validation accuracy{images}: {eval_metrics['eval_accuracy']:.4f}."]

    if info.data_leaks is not None:
        exact, near = info.data_leaks.get("data_leaks_exact", 0), info.data_leaks.get("data_leaks_near", 0)
        lines += ["", f"Data check: {exact + near} validation/test images are also in an earlier split ({exact} exact "
                  f"copies, {near} near-duplicates; data_check.json)" + (": the figures above count them." if exact + near
                                                                         else ".")]

    lines += ["", "## Training", "", "| setting | value |", "|---|---|"]
    lines += [f"| {key} | {value} |" for key, value in info.hyperparameters.items()]

    lines += ["", "## Usage", "", "```python", "from transformers import pipeline", "",
              f'classifier = pipeline("image-classification", model="{info.model_name}")',
              'print(classifier("image.png"))', "```", "",
              "The saved image processor applies the same resize, crop and normalisation as the evaluation did.", "",
              "## Labels", "", ", ".join(f"{i}: {name}" for i, name in enumerate(info.label_names)),
              "", "## Framework versions", "", *_versions()]
    return "\n".join(lines)


def _calibration(test_metrics: dict) -> list[str]:
    """The temperature folded into the classifier and what it did to the test split's expected calibration error."""
    if "test_ece" not in test_metrics:
        return []
    t, before, after = (test_metrics.get("calibration_temperature", 1.0), test_metrics.get("test_ece_uncalibrated"),
                        test_metrics["test_ece"])
    if t == 1.0:
        return ["", f"Calibration: no temperature folded into the classifier; test expected calibration error (ECE, "
                    f"15 bins) {after:.4f}."]
    return ["", f"Calibration: the classifier's last layer is divided by a temperature of {t:.3f}, fitted on the "
                f"validation split, so that the probabilities `pipeline` returns are calibrated (the top-1 is "
                f"unchanged; recorded in `config.json` as `calibration_temperature`). Test expected calibration "
                f"error (ECE, 15 bins): {before:.4f} before, {after:.4f} after."]


def write_model_card(output_dir: str | Path, info: CardInfo, test_metrics: dict | None,
                     eval_metrics: dict | None) -> Path:
    """The card of a run, whose train_results.json (written before) says which weights were kept."""
    path = Path(output_dir) / "README.md"
    train = path.with_name("train_results.json")
    train_metrics = json.loads(train.read_text()) if train.is_file() else None
    kept = added_sections(path.read_text()) if path.is_file() else ""
    render_model_card(info, test_metrics, eval_metrics, train_metrics).save(path)
    if kept:  # sections the tools added (export's latency table) survive the card rendered again (a push)
        path.write_text(path.read_text().rstrip("\n") + "\n\n" + kept)
    return path


def _markers(name: str) -> tuple[str, str]:
    return f"<!-- hf_transfer:{name} -->", f"<!-- /hf_transfer:{name} -->"


def replace_section(path: Path, name: str, markdown: str) -> None:
    """Put `markdown` into the card at `path` as its section `name`: in place of the one written before, else
    appended; the rest of the card is left as it is."""
    start, end = _markers(name)
    text, block = path.read_text(), f"{start}\n{markdown.strip()}\n{end}\n"
    if start in text and end in text:
        before, rest = text.split(start, 1)
        text = before + block + rest.split(end, 1)[1].lstrip("\n")
    else:
        text = text.rstrip("\n") + "\n\n" + block
    path.write_text(text)


def remove_section(path: Path, name: str) -> None:
    """Take the section `name` out of the card at `path` (nothing when it has none); the rest is left as it is."""
    start, end = _markers(name)
    text = path.read_text()
    if start in text and end in text:
        before, rest = text.split(start, 1)
        path.write_text(before.rstrip("\n") + "\n" + rest.split(end, 1)[1].lstrip("\n"))


def added_sections(text: str) -> str:
    """The sections `replace_section` added to a card, whole, in their order."""
    import re

    return "".join(m.group(0) + "\n" for m in re.finditer(r"<!-- hf_transfer:(\S+) -->.*?<!-- /hf_transfer:\1 -->",
                                                              text, flags=re.S))


# The Trainer's own fields shown on the card when set (they cannot carry the project's "card" metadata).
TRAINER_CARD = {"label_smoothing_factor": "label smoothing"}


def hyperparameters(args, model_args, data_args, **extra) -> dict[str, object]:
    """The settings that matter, for the model card: what every run has, then each setting a run changed from its
    default, named by its field's "card" metadata (config/flags.py, trainers/transfer_config.py)."""
    world = max(1, args.world_size)
    summary = dict(extra, augmentation=data_args.augmentation, recipe=model_args.recipe)
    summary.update({
        "epochs": args.num_train_epochs if args.max_steps <= 0 else f"{args.max_steps} steps",
        "batch size (total)": args.per_device_train_batch_size * args.gradient_accumulation_steps * world,
        "optimizer": f"{getattr(args.optim, 'value', args.optim)}" + (f" ({args.optim_args})" if args.optim_args else ""),
        "gradient clipping": f"at norm {args.max_grad_norm:g}" if args.max_grad_norm else "none",
        "learning rate": args.learning_rate,
        "schedule": (f"step x{args.lr_step_gamma} every {args.lr_step_size} epochs" if args.lr_step_size
                     else str(getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)))
        + f", warmup {args.warmup_steps}",
        "weight decay": args.weight_decay,
        "freezing": "backbone frozen (linear probe)" if args.freeze_backbone else args.unfreeze_schedule or "none",
        "mixed precision": "bf16" if args.bf16 else "fp16" if args.fp16
        else os.environ.get("ACCELERATE_MIXED_PRECISION", "no"),  # set by an accelerate config
        "seed": args.seed,
    })
    for arguments in (model_args, data_args, args):
        for f in fields(arguments):
            row = f.metadata.get("card") or (TRAINER_CARD.get(f.name) if "shapes" not in f.metadata else None)
            value = getattr(arguments, f.name)
            default = f.default if f.default is not MISSING else None
            if row and value != default:
                summary[row] = value
    return summary
