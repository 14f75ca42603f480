#!/usr/bin/env python
"""The cost of giving a distillation teacher its own picture of mixed-size images, on the CPU.

    python benchmarks/mixed_sizes.py                 # writes benchmarks/mixed-sizes-cpu-2core.json

A batch of images of different sizes cannot be stacked, so `UInt8Collator` resizes each image on
the CPU. Distillation used to resize once, to the student's size, and let the teacher upsample
that on the device (it then graded a blurred picture, docs/distillation.md); now each image is
resized once per model, straight from the stored image. This measures both per batch: the
collation (in the DataLoader, on the CPU) and the device side (here also the CPU: the teacher's
and the student's float input), for photo-sized images (160-480 px on a side, any aspect ratio)
with a 224 px teacher and a 112 or 224 px student (a student of the teacher's size and
interpolation shares its resize), and for the small textures of the tests (56-120 px) with a
64 px teacher and a 16 px student. Medians of interleaved rounds.
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

from hf_transfer.data.samples import UInt8Collator  # noqa: E402
from hf_transfer.on_device.preprocessing import ImageSpec, ToModelInput  # noqa: E402

CASES = {  # name: (smallest and largest side, student size and interpolation, teacher size and interpolation)
    "photos, student 224 bicubic, teacher 224 bicubic": ((160, 480), (224, "bicubic"), (224, "bicubic")),
    "photos, student 224 bilinear, teacher 224 bicubic": ((160, 480), (224, "bilinear"), (224, "bicubic")),
    "photos, student 112, teacher 224": ((160, 480), (112, "bicubic"), (224, "bicubic")),
    "textures, student 16, teacher 64": ((56, 120), (16, "bicubic"), (64, "bicubic")),
}


def samples(sides: tuple[int, int], n: int, seed: int = 0) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        height, width = (int(v) for v in torch.randint(sides[0], sides[1] + 1, (2,), generator=generator))
        image = torch.randint(0, 256, (3, height, width), dtype=torch.uint8, generator=generator)
        out.append({"pixel_values": image, "labels": i % 10, "row_index": i})
    return out


def one_batch(mode: str, batch: list[dict], student: ImageSpec, teacher: ImageSpec) -> float:
    """Seconds for one batch: collation, then each model's float input."""
    start = time.perf_counter()
    if mode == "own view":  # now: a resize per model on the CPU
        collated = UInt8Collator(student).with_view("teacher", teacher)(batch)
        teacher_images = collated["view_teacher"]
    else:  # before: the teacher upsampled the student's resize
        collated = UInt8Collator(student)(batch)
        teacher_images = collated["pixel_values"]
    ToModelInput(student)(collated["pixel_values"], fitted=True)
    ToModelInput(teacher)(teacher_images, fitted=mode == "own view")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "mixed-sizes-cpu-2core.json"))
    args = parser.parse_args()

    results = {}
    for case, (sides, (student_size, student_resample), (teacher_size, teacher_resample)) in CASES.items():
        student = ImageSpec((student_size,) * 2, (0.5,) * 3, (0.5,) * 3, student_resample)
        teacher = ImageSpec((teacher_size,) * 2, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), teacher_resample)
        batch = samples(sides, args.batch_size)
        times = {"student's resize upsampled": [], "own view": []}
        for mode in times:
            one_batch(mode, batch, student, teacher)  # warm-up
        for round_ in range(args.rounds):
            for mode in (list(times) if round_ % 2 == 0 else list(times)[::-1]):
                times[mode].append(one_batch(mode, batch, student, teacher))
        medians = {mode: round(statistics.median(v) * 1000, 2) for mode, v in times.items()}
        results[case] = {"ms_per_batch": medians, "rounds_ms": {m: [round(t * 1000, 2) for t in v]
                                                               for m, v in times.items()},
                         "own_view_over_before": round(medians["own view"] / medians["student's resize upsampled"], 3),
                         "ms_per_image_own_view": round(medians["own view"] / args.batch_size, 3)}
        print(case, json.dumps(results[case]["ms_per_batch"]), results[case]["own_view_over_before"], flush=True)
    report = {"machine": {"cpu": platform.machine(), "threads": torch.get_num_threads(), "torch": torch.__version__},
              "batch_size": args.batch_size, "rounds": args.rounds, "results": results}
    Path(args.output).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
