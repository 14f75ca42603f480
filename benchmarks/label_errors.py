#!/usr/bin/env python
"""Label errors found against labels flipped on purpose: precision and recall, for several flip rates and K.

    python benchmarks/label_errors.py --output benchmarks/label-errors-cpu-2core.json

Digits as class folders (tests/noisy_digits.py: 600 train, 200 validation, 200 test images, 16 px RGB PNGs), with a
share of the training images saved under another class. For each flip rate: one run of run_finetune.py (ResNet-18
from scratch at 16 px, the recipe's defaults), then `python -m hf_transfer label-errors` on it with each K. Reported
for each: the flagged set's precision and recall against the flipped files (the validation split has no flipped
image: every validation image flagged counts against precision), the out-of-sample accuracy of the folds, and the
seconds the call took. The same out-of-sample probabilities are also cut with cleanlab's other filters
(`filter_by`), to show what the default cut trades.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

RECIPE = ["--model", "resnet18", "--from_scratch", "--image_size", "16", "--disable_tqdm", "true",
          "--dataloader_num_workers", "0", "--report_to", "none", "--save_total_limit", "1"]
FILTERS = ("prune_by_noise_rate", "prune_by_class", "both", "confident_learning", "predicted_neq_given")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--flip", type=float, nargs="+", default=[0.05, 0.15])
    parser.add_argument("--folds", type=int, nargs="+", default=[2, 3, 5])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=None)
    parser.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "hf-transfer-label-errors-bench"))
    args = parser.parse_args()

    from noisy_digits import noisy_digits

    import run_finetune
    from hf_transfer.tools.label_errors import DEFAULT_FOLDS, find_label_errors

    work = Path(args.workdir)  # a second call reuses its finished runs and folds (the same seed, the same data)
    rows = []
    for flip in args.flip:
        data = noisy_digits(work / f"data-{flip}", flip=flip, seed=args.seed)
        run = work / f"run-{flip}"
        started = time.perf_counter()
        results = run_finetune.main([*RECIPE, "--train_dir", data.train_dir, "--validation_dir", data.validation_dir,
                                     "--test_dir", data.test_dir, "--seed", str(args.seed), "--output_dir", str(run)])
        run_seconds = time.perf_counter() - started
        for folds in args.folds:
            copy = work / f"run-{flip}-{folds}-folds"  # each K in its own copy: a second call reuses each one's folds
            if not copy.is_dir():
                shutil.copytree(run, copy, ignore=shutil.ignore_patterns("checkpoint-*", "label-errors"))
            started = time.perf_counter()
            found = find_label_errors(str(copy), folds)
            row = {"flip": flip, "flipped": len(data.flipped), "folds": folds,
                   "run_test_accuracy": round(results["test_accuracy"], 4), "run_seconds": round(run_seconds, 1),
                   "seconds": round(time.perf_counter() - started, 1),  # (reused folds: only the cut)
                   "out_of_sample_accuracy": found["out_of_sample_accuracy"],
                   "default": measure([i["file"] for i in found["images"]], data.flipped),
                   "filters": by_filter(copy, data.flipped)}
            print(json.dumps(row), flush=True)
            rows.append(row)
            write(args.output, rows, DEFAULT_FOLDS)


def write(output: str | None, rows: list[dict], default_folds: int) -> None:
    """The results so far (after each row: a long sweep stopped half-way keeps what it measured)."""
    import cleanlab
    import torch

    summary = {"setup": {"data": "sklearn digits as 16 px RGB PNG class folders: 600 train (a share flipped to "
                                 "another class), 200 validation, 200 test", "recipe": " ".join(RECIPE),
                         "default_folds": default_folds, "cleanlab": cleanlab.__version__, "torch": torch.__version__,
                         "threads": os.environ.get("OMP_NUM_THREADS"), "cpus": os.cpu_count(),
                         "machine": platform.processor() or platform.machine()},
               "runs": rows}
    if output:
        Path(output).write_text(json.dumps(summary, indent=2) + "\n")


def measure(flagged_files: list, flipped: set[str]) -> dict:
    """Precision and recall of the flagged files against the flipped ones (every flagged image counts)."""
    hits = sum(f in flipped for f in flagged_files)
    return {"flagged": len(flagged_files), "true": hits,
            "precision": round(hits / len(flagged_files), 4) if flagged_files else None,
            "recall": round(hits / len(flipped), 4)}


def by_filter(run: Path, flipped: set[str]) -> dict:
    """The same out-of-sample probabilities (the folds' and the validation split's) cut by each cleanlab filter."""
    import numpy as np
    from cleanlab.filter import find_label_issues

    from hf_transfer.data.dataset import ROW
    from hf_transfer.tools.label_errors import FOLDER, PROBABILITIES, Scored

    scored = [Scored.load(p) for p in sorted((run / FOLDER).glob(f"*/{PROBABILITIES}"))]
    labels = np.concatenate([s.labels for s in scored])
    probabilities = np.concatenate([s.probabilities for s in scored])
    files = _files(run, ROW)
    where = [files.get((s.split, int(r))) for s in scored for r in s.rows]
    return {name: measure([where[i] for i in np.flatnonzero(find_label_issues(labels, probabilities, filter_by=name,
                                                                              n_jobs=1))], flipped)
            for name in FILTERS}


def _files(run: Path, row_column: str) -> dict:
    """(split, row) -> file, from the run's data as it loaded it."""
    from hf_transfer.config.flags import data_arguments
    from hf_transfer.run import record
    from hf_transfer.run.assembly import load_data

    saved = record.read(run)
    data = load_data(data_arguments(saved, ""), saved["shaping"]["training.seed"])
    out = {}
    for split in ("train", "validation"):
        stored = getattr(data, split).with_format(None)
        out.update({(split, r): c["path"] for r, c in zip(stored[row_column], stored[data.image_column])})
    return out


if __name__ == "__main__":
    main()
