#!/usr/bin/env python
"""The distillation benchmark to the end of the chain: teacher, student alone, distilled student and its int8 file,
each exported and measured on the same test split and the same CPU.

    python benchmarks/distillation_chain.py --output benchmarks/distillation-chain-cpu-2core.json

The regime is distill-10u of benchmarks/transfer.py, where distillation pays most: labels for 100 digits, the rest
of the train split as images without labels. The teacher is EfficientNet-Lite0 with its real ImageNet weights
fine-tuned with the defaults on the whole split at 64 px (transfer.py's teacher); each student is trained from
scratch at 32 px, alone (run_finetune.py on the 100 labelled images) and distilled (run_distill.py at its
defaults). Every run is then exported as a user exports it, `python -m hf_transfer export RUN --quantize int8`,
once per thread count (OMP_NUM_THREADS), in a process of its own: the export's own check (accuracy of fp32 and
int8 on the test split, int8's agreement with fp32) and its latency table are recorded whole.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(Path(__file__).resolve().parent)]
import transfer  # noqa: E402

REGIME = "distill-10u"
STUDENTS = ("resnet18", "mobilenetv3-small")


def train(workdir: Path, student: str, how: str, seed: int, workers: int) -> Path:
    """A student of `REGIME`, alone or distilled, kept in its own folder."""
    labelled, unlabeled = transfer.DISTILL_REGIMES[REGIME]
    student_flags = ["--dataset_name", "digits", "--image_size", "32", "--from_scratch", *labelled,
                     "--seed", str(seed)]
    out = workdir / f"{student}-{how}-{seed}"
    if (out / "model.safetensors").exists():
        return out
    if how == "alone":
        transfer.run("finetune", ["--model", student, *student_flags], out, workers, keep=True)
    else:
        transfer.run("distill", ["--teacher_model_name_or_path", str(transfer.teacher_dir(workdir)), "--student",
                                 student, *student_flags, *unlabeled], out, workers, keep=True)
    return out


def export(run: Path, threads: int, repeats: int) -> dict:
    """`python -m hf_transfer export RUN --quantize int8` with `threads` threads; its export_results.json."""
    out = run / f"onnx-{threads}-threads"
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "hf_transfer", "export", str(run), "--quantize", "int8", "--output", str(out),
               "--latency_repeats", str(repeats), "--max_accuracy_drop", "1"]  # figures, never a refusal
    proc = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"export of {run} failed:\n{proc.stderr[-3000:]}")
    return json.loads((out / "export_results.json").read_text())


def row(name: str, results: dict, table_by_threads: dict[int, dict]) -> dict:
    """One model's accuracies, sizes and latencies (own rows of the latency table: PyTorch, ONNX fp32, int8)."""
    int8 = results["precisions"]["int8"]
    entry = {"model": name, "fp32_accuracy": results.get("onnx_accuracy"), "int8_accuracy": int8.get("accuracy"),
             "int8_agreement_with_fp32": int8.get("top1_agreement"), "onnx_fp32_bytes": results["onnx_bytes"],
             "onnx_int8_bytes": int8["bytes"], "latency": {}}
    for threads, table in table_by_threads.items():
        own = [r for r in table["rows"] if r["model"] == "this model"]
        entry["parameters"] = own[0]["parameters"]
        entry["latency"][f"{threads}_threads"] = {
            r["runtime"]: {k: v for k, v in r.items() if k.startswith("batch_")} for r in own}
    return entry


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "distillation-chain-cpu-2core.json"))
    parser.add_argument("--workdir", default="/tmp/hf-transfer-chain", help="runs are kept here (a rerun reuses them)")
    parser.add_argument("--students", default=",".join(STUDENTS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", default="1,2", help="thread counts of the latency tables")
    parser.add_argument("--repeats", type=int, default=20, help="timed calls per latency figure")
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--checkpoint", default=None, help="a real-weights timm folder (default: lite0 written here)")
    args = parser.parse_args()

    import logging

    import torch

    logging.basicConfig(level=logging.WARNING)
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    teacher = transfer.teacher_dir(workdir)
    if not (teacher / "model.safetensors").exists():
        checkpoint = args.checkpoint
        if checkpoint is None:
            from real_weights import write_timm_folder

            checkpoint = write_timm_folder("lite0", workdir / "efficientnet-lite0")
        transfer.run_cell(checkpoint, *transfer.TEACHER[:3], [], transfer.TEACHER[3], workdir, args.workers)

    threads = [int(t) for t in args.threads.split(",")]
    runs = {"teacher (EfficientNet-Lite0, real weights, 64 px)": teacher}
    for student in args.students.split(","):
        for how in ("alone", "distilled"):
            runs[f"{student} {how} (scratch, 32 px)"] = train(workdir, student, how, args.seed, args.workers)
    rows = []
    for name, run in runs.items():
        exported = {t: export(run, t, args.repeats) for t in threads}
        rows.append(row(name, exported[threads[0]], {t: r["latency"] for t, r in exported.items()}))
        test = json.loads((run / "all_results.json").read_text())
        rows[-1].update(test_accuracy=test.get("test_accuracy"), test_agreement_with_teacher=test.get("test_agreement"))
        print(json.dumps(rows[-1]), flush=True)
        Path(args.output).write_text(json.dumps({
            "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                        "torch": torch.__version__},
            "setup": {"regime": REGIME, "seed": args.seed, "threads": threads, "repeats": args.repeats,
                      "teacher": "/".join(map(str, transfer.TEACHER)), "students": args.students.split(","),
                      "export": "python -m hf_transfer export RUN --quantize int8 (OMP_NUM_THREADS per table)"},
            "rows": rows}, indent=1) + "\n")
    print(markdown(rows, threads))


def markdown(rows: list[dict], threads: list[int]) -> str:
    """One line per model: accuracy (PyTorch run, int8 file), size, batch-1 latency per thread count."""
    head = ["model", "parameters (M)", "test accuracy", "int8 accuracy", "agreement with teacher", "fp32 / int8 MB",
            *(f"batch 1 ms, {t} thr. (ONNX fp32 / int8)" for t in threads)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["model"], f"{r['parameters'] / 1e6:.2f}", f"{r['test_accuracy']:.4f}",
                 f"{r['int8_accuracy']:.4f}", "-" if r["test_agreement_with_teacher"] is None
                 else f"{r['test_agreement_with_teacher']:.4f}",
                 f"{r['onnx_fp32_bytes'] / 1e6:.1f} / {r['onnx_int8_bytes'] / 1e6:.1f}"]
        for t in threads:
            latency = r["latency"][f"{t}_threads"]
            cells.append(f"{latency['ONNX fp32']['batch_1']['median_ms']:.2f} / "
                         f"{latency['ONNX int8']['batch_1']['median_ms']:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
