#!/usr/bin/env python
"""Reference runs: the same commands give the same metrics and the same weights, bit for bit, before and after a
change that should not change what a run computes (a refactoring).

    python benchmarks/reference_runs.py record benchmarks/reference-runs-cpu.json   # before the change
    python benchmarks/reference_runs.py check benchmarks/reference-runs-cpu.json    # after it: exit 1 on a difference

Six runs, each a fresh process with one thread (the same arithmetic every time on one machine; another machine
or thread count rounds differently, so a file recorded elsewhere is compared for its keys only, `--keys-only`):
- finetune: a ResNet-18 from scratch on 300 of scikit-learn's digits at 16 px, the defaults (data-fitted batch
  and length, precise BatchNorm statistics, the best checkpoint chosen on validation), and weight EMA;
- distill: a ResNet-18 student distilled from that run on 100 labelled digits and the rest unlabeled;
- multilabel: several labels per image (`digits-multilabel`), the threshold chosen on validation;
- streamed: the digits written as Parquet shards, read with `--streaming`;
- export: the fine-tuned run exported to ONNX and checked against PyTorch on its test split;
- search: a 2-trial hyperparameter search, and its best trial trained as `best/`.
Recorded per run: every number in its results files except timings and memory, and a hash of every weight
tensor of the saved model (and of `best/` for the search).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--model", "resnet18", "--from_scratch", "--image_size", "16", "--disable_tqdm", "true",
         "--dataloader_num_workers", "0", "--report_to", "none", "--seed", "0"]
# Results that measure the machine, not the run.
TIMING = ("runtime", "per_second", "peak_memory", "seconds", "images_per_s", "data_wait", "latency")
# The ONNX file embeds the exporting code's source file path in its stack-trace metadata (49 times for a ResNet-18):
# its size follows where the code lives, not what it computes (its logits are compared: export_results.json).
NOT_COMPARED = ("export_results.json:onnx_bytes", "export_results.json:precisions.fp32.bytes")


def commands(work: Path) -> dict[str, list[list[str]]]:
    """name -> the command lines of the run (run in order, in `work`)."""
    py, out = sys.executable, work / "runs"
    return {
        "finetune": [[py, "run_finetune.py", *SMALL, "--dataset_name", "digits", "--max_train_samples", "300",
                      "--ema_decay", "0.99", "--output_dir", str(out / "finetune")]],
        "distill": [[py, "run_distill.py", *SMALL, "--dataset_name", "digits", "--max_train_samples", "100",
                     "--unlabeled_dataset", "digits", "--teacher_model_name_or_path", str(out / "finetune"),
                     "--max_steps", "60", "--output_dir", str(out / "distill")]],
        "multilabel": [[py, "run_finetune.py", *SMALL, "--dataset_name", "digits-multilabel",
                        "--max_train_samples", "300", "--max_steps", "60", "--output_dir", str(out / "multilabel")]],
        "streamed": [[py, str(Path(__file__)), "shards", str(work / "shards")],
                     [py, "run_finetune.py", *SMALL, "--dataset_name", str(work / "shards"), "--streaming",
                      "--max_steps", "40", "--shuffle_buffer", "64", "--max_eval_samples", "200", "--output_dir", str(out / "streamed")]],
        "export": [[py, "-m", "hf_transfer", "export", str(out / "finetune"), "--output", str(out / "onnx")]],
        "search": [[py, "-m", "hf_transfer", "search", *SMALL, "--dataset_name", "digits", "--max_train_samples",
                    "200", "--max_steps", "30", "--n_trials", "2", "--output_dir", str(out / "search")]],
    }


def folders(work: Path) -> dict[str, list[Path]]:
    """name -> the folders whose results and weights are recorded."""
    out = work / "runs"
    return {"finetune": [out / "finetune"], "distill": [out / "distill"], "multilabel": [out / "multilabel"],
            "streamed": [out / "streamed"], "export": [out / "onnx"],
            "search": [out / "search", out / "search" / "best"]}


def write_shards(folder: Path, shards: int = 4) -> None:
    """The digits' train and test splits as Parquet shards (a folder `--streaming` reads like a Hub repo)."""
    from hf_transfer.data.sources import digits_dataset

    digits = digits_dataset()
    (folder / "data").mkdir(parents=True, exist_ok=True)
    for split, part in digits.items():
        count = shards if split == "train" else 1
        for i in range(count):
            part.shard(count, i, contiguous=True).to_parquet(
                str(folder / "data" / f"{split}-{i:05d}-of-{count:05d}.parquet"))


def weight_hashes(folder: Path) -> dict[str, str]:
    import torch
    from safetensors import safe_open

    hashes = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            for name in sorted(f.keys()):
                tensor = f.get_tensor(name).contiguous()
                raw = tensor.reshape(-1).view(torch.uint8).numpy().tobytes()
                hashes[f"{path.name}:{name}"] = hashlib.sha256(raw).hexdigest()[:16]
    return hashes


def numbers(value, prefix: str = "") -> dict[str, object]:
    """The numbers and strings of a results file, flattened, without timings."""
    if isinstance(value, dict):
        flat = {}
        for key, inner in value.items():
            flat.update(numbers(inner, f"{prefix}{key}."))
        return flat
    if isinstance(value, list):
        flat = {}
        for i, inner in enumerate(value):
            flat.update(numbers(inner, f"{prefix}{i}."))
        return flat
    key = prefix.rstrip(".")
    return {} if any(t in key for t in TIMING) else {key: value}


def record_folder(folder: Path) -> dict:
    results = {}
    for name in ("all_results.json", "export_results.json", "search_results.json"):
        path = folder / name
        if path.is_file():
            results.update(numbers(json.loads(path.read_text()), f"{name}:"))
    for key in ("export_results.json:model", "export_results.json:precisions.fp32.model", "export_results.json:card"):
        results.pop(key, None)  # a path in the work folder
    for key in NOT_COMPARED:
        results.pop(key, None)
    for key in [k for k in results if k.endswith((".folder", ":folder")) or "best.folder" in k]:
        results[key] = Path(str(results[key])).name
    return {"results": results, "weights": weight_hashes(folder)}


def run_all(work: Path, only: list[str] | None) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(work / "hf-home"), "WANDB_MODE": "disabled",
           "PYTHONHASHSEED": "0", "PYTHONPATH": str(ROOT)}
    recorded = {}
    for name, lines in commands(work).items():
        if only and name not in only:
            continue
        for line in lines:
            print("$", " ".join(line[1:]), flush=True)
            proc = subprocess.run(line, cwd=ROOT, env=env, capture_output=True, text=True)
            if proc.returncode:
                sys.exit(f"{name} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        recorded[name] = {str(f.relative_to(work / "runs")): record_folder(f) for f in folders(work)[name]}
    return recorded


def compare(saved: dict, now: dict, keys_only: bool) -> list[str]:
    differences = []
    for name, runs in saved.items():
        for folder, facts in runs.items():
            current = now.get(name, {}).get(folder)
            if current is None:
                differences.append(f"{name}/{folder}: not run")
                continue
            for kind in ("results", "weights"):
                before, after = facts[kind], current[kind]
                before = {k: v for k, v in before.items() if k not in NOT_COMPARED}  # (a file recorded before)
                for key in sorted(set(before) | set(after)):
                    if key not in before or key not in after:
                        differences.append(f"{name}/{folder} {kind} {key}: {before.get(key)} -> {after.get(key)}")
                    elif not keys_only and before[key] != after[key]:
                        differences.append(f"{name}/{folder} {kind} {key}: {before[key]} -> {after[key]}")
    return differences


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=["record", "check", "shards"])
    parser.add_argument("path", help="the JSON file (record, check) or the shard folder (shards)")
    parser.add_argument("--only", default=None, help="comma-separated run names (default: all)")
    parser.add_argument("--keys-only", action="store_true", help="check: compare which results exist, not values")
    parser.add_argument("--workdir", default=None, help="where the runs go (default: a new temporary folder)")
    args = parser.parse_args()
    if args.action == "shards":
        sys.path.insert(0, str(ROOT))
        write_shards(Path(args.path))
        return
    work = Path(args.workdir or tempfile.mkdtemp(prefix="reference-runs-"))
    shutil.rmtree(work / "runs", ignore_errors=True)
    shutil.rmtree(work / "shards", ignore_errors=True)
    only = args.only.split(",") if args.only else None
    now = run_all(work, only)
    if args.action == "record":
        Path(args.path).write_text(json.dumps(now, indent=1, sort_keys=True) + "\n")
        print(f"recorded {len(now)} runs in {args.path}")
        return
    saved = json.loads(Path(args.path).read_text())
    if only:
        saved = {k: v for k, v in saved.items() if k in only}
    differences = compare(saved, now, args.keys_only)
    for line in differences:
        print(line)
    print(f"{len(differences)} difference(s) in {len(saved)} runs")
    sys.exit(1 if differences else 0)


if __name__ == "__main__":
    main()
