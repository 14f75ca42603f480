#!/usr/bin/env python
"""GPU check: training throughput of ResNet-50, ViT-B/16 and their distillation through run_finetune.py
and run_distill.py, on synthetic CIFAR-shaped data, with no network. Under 5 minutes on one H100.

    python benchmarks/gpu_check.py                 # bf16, channels-last for the CNN
    python benchmarks/gpu_check.py --compile       # plus torch.compile
    python benchmarks/gpu_check.py --output benchmarks/gpu-h100.json   # also write the JSON (after each run)
    python benchmarks/gpu_check.py --smoke         # tiny models on the CPU: checks the script itself

The models are the presets (--model resnet50, --model vit-base) with --from_scratch: their
architectures and preprocessing, random weights, and no download (models/loading.py knows the
presets' configs). Speed does not depend on the weights.

For each run it prints train images/s (steady state, after warm-up), the share of step time spent
waiting for data, peak memory and the achieved TFLOP/s (training = 3 x forward FLOPs: ResNet-50
24.7 GFLOP and ViT-B/16 105.5 GFLOP per 224 px image; distillation = teacher forward 35.2 + student
training 24.7), as one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

GFLOP_PER_IMAGE = {"resnet50": 24.7, "vit-base": 105.5, "distill": 35.2 + 24.7}  # training, 224 px
GOALS = {"resnet50": 5000, "vit-base": 3000, "distill": 2000}  # train images/s on one H100


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300, help="training steps per model")
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--images", type=int, default=20_480,
                        help="size of the synthetic training set; a multiple of the batch size keeps every batch "
                             "full (with --compile, a smaller last batch would compile the model again)")
    parser.add_argument("--workers", type=int, default=min(12, (os.cpu_count() or 2) - 1))
    parser.add_argument("--compile", action="store_true", help="torch.compile the models")
    parser.add_argument("--smoke", action="store_true", help="tiny models, a few steps, CPU: test the script")
    parser.add_argument("--output", default=None, help="also write the JSON here, rewritten after every run")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import torch
    from benchmark import make_checkpoints, make_dataset

    from hf_transfer.commands.distill import main as distill
    from hf_transfer.commands.finetune import main as finetune

    if args.smoke:
        args.steps, args.batch_size, args.images, args.workers = 8, 8, 128, 0
    elif not torch.cuda.is_available():
        sys.exit("no CUDA GPU: run with --smoke to check the script on the CPU")

    with tempfile.TemporaryDirectory(prefix="hf-transfer-gpu-check-") as tmp:
        tmp = Path(tmp)
        make_dataset(tmp / "data", n_train=args.images, n_eval=min(2048, args.images))
        common = ["--dataset_name", str(tmp / "data"), "--max_steps", str(args.steps),
                  "--per_device_train_batch_size", str(args.batch_size),
                  "--per_device_eval_batch_size", str(2 * args.batch_size), "--dataloader_num_workers", str(args.workers),
                  "--eval_strategy", "no", "--save_strategy", "no", "--load_best_model_at_end", "false",
                  "--max_eval_samples", str(min(2048, args.images)), "--logging_steps", "50", "--disable_tqdm", "true",
                  "--report_to", "none", "--overwrite_output_dir"]
        if args.compile:
            common.append("--torch_compile")
        if args.smoke:  # tiny stand-ins built from configs, on the CPU
            cnn, vit = tiny_resnet(tmp / "tiny-resnet"), make_checkpoints(tmp, image_size=32)["teacher"]
            common.append("--use_cpu")
        else:
            cnn, vit = "resnet50", "vit-base"
            common.append("--bf16")
        model_flag, student_flag = ("--model_name_or_path", "--student_model_name_or_path") if args.smoke else \
            ("--model", "--student")
        sources = {"resnet50": [model_flag, cnn], "vit-base": [model_flag, vit]}
        cnn_flags = ["--from_scratch", "--channels_last", "true"]

        report = {
            "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() and not args.smoke else "cpu (smoke)",
            "versions": {"torch": torch.__version__, "cuda": torch.version.cuda},
            "setup": {"steps": args.steps, "batch_size": args.batch_size, "workers": args.workers,
                      "bf16": not args.smoke, "channels_last_cnn": True, "compile": args.compile},
            "runs": {},
            "goals_met": None,
        }

        def save():
            if args.output:
                Path(args.output).write_text(json.dumps(report, indent=2) + "\n")

        def record(name, run):  # one run's figures, or its error, so a failure keeps the others' figures
            started = time.time()
            try:
                metrics = run()
            except Exception as error:  # noqa: BLE001 -- reported in the JSON, and the exit status below
                report["runs"][name] = {"error": f"{type(error).__name__}: {error}"}
            else:
                gflop = None if args.smoke else GFLOP_PER_IMAGE[name]
                report["runs"][name] = summary(metrics, gflop, time.time() - started)
            save()

        for name in ("resnet50", "vit-base"):
            flags = [*sources[name], *(cnn_flags if name == "resnet50" else ["--from_scratch"])]
            record(name, lambda flags=flags, name=name: finetune([*flags, *common, "--output_dir", str(tmp / f"run-{name}")]))
        record("distill", lambda: distill(["--teacher_model_name_or_path", str(tmp / "run-vit-base"), student_flag, cnn,
                                           *cnn_flags, *common, "--output_dir", str(tmp / "run-distill")]))
        if not args.smoke:
            report["goals_met"] = {name: report["runs"][name].get("train_images_per_second", 0) >= goal
                                   for name, goal in GOALS.items()}
        save()
    print(json.dumps(report, indent=2))
    if any("error" in run for run in report["runs"].values()):
        sys.exit(1)


def tiny_resnet(path: Path) -> str:
    """A small timm ResNet (through TimmWrapper, as the resnet50 preset) saved from a config."""
    import timm
    from transformers import AutoModelForImageClassification, TimmWrapperConfig

    pretrained_cfg = timm.get_pretrained_cfg("test_resnet").to_dict()
    pretrained_cfg["input_size"] = [3, 32, 32]
    config = TimmWrapperConfig(architecture="test_resnet", pretrained_cfg=pretrained_cfg, num_labels=10,
                               id2label={i: f"c{i}" for i in range(10)}, label2id={f"c{i}": i for i in range(10)})
    AutoModelForImageClassification.from_config(config).save_pretrained(path)
    return str(path)


def summary(metrics: dict, gflop_per_image: float | None, wall_s: float) -> dict:
    images_per_second = metrics.get("train_steady_images_per_second") or metrics["train_samples_per_second"]
    return {
        "train_images_per_second": round(images_per_second, 1),
        "data_wait_share": metrics.get("train_data_wait_share"),
        "peak_memory_mb": metrics.get("train_peak_memory_mb"),
        "peak_memory_of": metrics.get("train_peak_memory_of"),
        "achieved_tflops": round(images_per_second * gflop_per_image / 1000, 1) if gflop_per_image else None,
        "eval_images_per_second": metrics.get("test_samples_per_second"),
        "wall_s": round(wall_s, 1),
    }


if __name__ == "__main__":
    main()
