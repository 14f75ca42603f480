#!/usr/bin/env python
"""The cost of the checkpoint's own geometry (resize the shorter edge, crop the centre) against a squash.

    python benchmarks/geometry.py                    # writes benchmarks/geometry-cpu-2core.json

A ViT processor squashes every image to 224 x 224; microsoft/resnet-50's and timm's resize the
shorter edge to 256 (224 / crop_pct 0.875), keeping the aspect ratio, and cut out the centre
224 x 224. The crop resizes to more pixels than it keeps. Measured per batch, where the project
does it: a batch of one size (CIFAR's 32 px, 128 images) made into the model's input by
`ToModelInput` (on the training device; here the CPU), and a batch of photo-sized images of mixed
sizes (160-480 px a side, any aspect ratio, 64 images) stacked by `UInt8Collator` (in the
DataLoader) and then made into the input. Medians of interleaved rounds.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mixed_sizes import samples  # noqa: E402  (random uint8 images, sides drawn in a range)

from hf_transfer.data.samples import UInt8Collator  # noqa: E402
from hf_transfer.on_device.preprocessing import ImageSpec, ToModelInput  # noqa: E402

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
SPECS = {"squash to 224": ImageSpec((224, 224), *IMAGENET, "bicubic"),
         "shorter edge 256, centre 224": ImageSpec((224, 224), *IMAGENET, "bicubic", resize=256)}


def seconds(spec: ImageSpec, examples: list[dict]) -> float:
    start = time.perf_counter()
    collated = UInt8Collator(spec)(examples)
    ToModelInput(spec)(collated["pixel_values"], fitted="fitted" in collated)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "geometry-cpu-2core.json"))
    args = parser.parse_args()

    cases = {"one size (32 px), 128 images": samples((32, 32), 128), "mixed photos (160-480 px), 64 images":
             samples((160, 480), 64)}
    results = {}
    for case, examples in cases.items():
        times = {name: [] for name in SPECS}
        for spec in SPECS.values():
            seconds(spec, examples)  # warm-up
        for round_ in range(args.rounds):
            for name in (list(SPECS) if round_ % 2 == 0 else list(SPECS)[::-1]):
                times[name].append(seconds(SPECS[name], examples))
        medians = {name: round(statistics.median(v) * 1000, 2) for name, v in times.items()}
        results[case] = {"ms_per_batch": medians, "crop_over_squash": round(
            medians["shorter edge 256, centre 224"] / medians["squash to 224"], 3)}
        print(case, json.dumps(results[case]), flush=True)
    report = {"machine": {"cpu": platform.machine(), "threads": torch.get_num_threads(), "torch": torch.__version__},
              "rounds": args.rounds, "results": results}
    Path(args.output).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
