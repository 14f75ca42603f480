#!/usr/bin/env python
"""int8 and fp16 against fp32 on a real-weights run: accuracy on its test split and CPU latency, as export measures.

    python benchmarks/quantize.py --output benchmarks/quantize-cpu-2core.json [--run DIR]
    python benchmarks/quantize.py --multi_label --output benchmarks/quantize-multilabel-cpu-2core.json

Without `--run`, EfficientNet-Lite0 with its real ImageNet weights (benchmarks/real_weights.py) is fine-tuned on
100 digits at 64 px with the project's defaults (the regime of tests/test_transfer_defaults.py); with
`--multi_label`, on 500 images of digits-multilabel (two or three digits per image) at 64 px, the regime of
docs/multilabel.md, where int8 is judged by each class's decision at the run's threshold and micro-F1. The run is then
exported as `python -m hf_transfer export RUN --quantize int8 --precision fp16` exports it (its results and latency
table are recorded whole), and int8 is made once more without onnxruntime's pre-processing (`quant_pre_process`:
shape inference, Conv+BatchNorm fusion) to measure what that step changes.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]
from real_weights import write_timm_folder  # noqa: E402

import run_finetune  # noqa: E402
from hf_transfer.tasks.classification import task_of  # noqa: E402
from hf_transfer.tools import checks, export, quantize  # noqa: E402
from hf_transfer.tools.latency import default_threads, measure, onnx_call, onnx_session  # noqa: E402


def fine_tuned(work: Path, multi_label: bool) -> Path:
    checkpoint = write_timm_folder("lite0", work / "lite0")
    out = work / "run"
    data = ["digits-multilabel", "--max_train_samples", "500"] if multi_label else ["digits", "--max_train_samples", "100"]
    run_finetune.main(["--model_name_or_path", checkpoint, "--dataset_name", *data,
                       "--image_size", "64", "--output_dir", str(out), "--report_to", "none", "--disable_tqdm", "true"])
    return out


def without_preprocessing(run: Path, results: dict, repeats: int) -> dict:
    """int8 made straight from the fp32 file: the same calibration, the same check, batch-1 latency."""
    pictures, labels, _, data = export._verification_images(run, None, None)
    calibration, _ = export._calibration_images(run, data, export.CALIBRATION_IMAGES)
    model, processor = export._load(run)
    batches = export._prepared(processor, pictures)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "plain.int8.onnx"
        quantize.quantize_int8(Path(results["model"]), path, export._prepared(processor, calibration),
                               preprocess=False)
        session = onnx_session(path, default_threads())
        reference = checks.logits_of(onnx_session(results["model"], default_threads()), batches)
        task = task_of(model.config).of_model(model.config)
        figures = checks.against_fp32(checks.logits_of(session, batches), reference, labels, task)
        figures["bytes"] = path.stat().st_size
        figures.update(measure(lambda x: onnx_call(session, x), batches[0], [1], repeats, default_threads()))
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default=None, help="an existing run to export (default: fine-tune Lite0 here)")
    parser.add_argument("--multi_label", action="store_true", help="digits-multilabel instead of digits")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(args.run) if args.run else fine_tuned(Path(tmp), args.multi_label)
        results = export.export_onnx(str(run), str(Path(tmp) / "onnx"), precision=export.Precision(
            quantize="int8", precision="fp16", latency_repeats=args.repeats, max_accuracy_drop=1.0))
        plain = without_preprocessing(run, results, args.repeats)
        test = json.loads((run / "test_results.json").read_text())  # before the temporary run folder goes
    summary = {"what": "int8 / fp16 ONNX against fp32 on a run's test split; CPU latency as export measures it",
               "run_test_accuracy": test["test_accuracy"], **{f"run_{k}": test[k] for k in ("test_f1", "test_map",
               "test_threshold") if k in test}, "export": results, "int8_without_quant_pre_process": plain}
    print(json.dumps({k: v for k, v in summary["export"]["precisions"].items()}, indent=2))
    print(json.dumps(plain, indent=2))
    if args.output:
        Path(args.output).write_text(json.dumps(summary, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
