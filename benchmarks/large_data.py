#!/usr/bin/env python
"""Start-up, memory and speed on a large data set against a small one: an image folder and Parquet shards.

    python benchmarks/large_data.py                  # writes benchmarks/large-data-cpu-2core.json
    python benchmarks/large_data.py --sizes 2000     # the small case only

Generates 10 classes of JPEG photos cut from scikit-image's pictures (32-96 px a side, any aspect
ratio), N images in all, as an image folder (one subfolder per class) and as Parquet shards (the
encoded bytes inside, as Hub data sets store them; 20,000 a shard), and the shards streamed
(`--streaming`, 200 validation images held out). Each case is one `run_finetune.py` process,
a ResNet-18 from scratch at 64 px for 30 optimizer steps at batch 64, without evaluation:
- seconds to the first optimizer step, from the process's start (imports, loading the data set,
  deciding what to decode, the model, the first batch), once with `datasets`' cache cold (it
  indexes the folder or the shards) and once warm;
- peak resident memory of the process and its DataLoader workers;
- training images per second after the first steps (`train_steady_images_per_second`).
Goals (issue: real data at scale) for 200,000 images on 2 cores: first step within 30 s, RSS under
3 GiB, and at least 0.9 of the images per second of 2,000.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PICTURES = ("astronaut", "camera", "coffee", "chelsea", "rocket", "coins", "moon", "page", "text", "horse")

DRIVER = """
import time
start = time.time()
import json, resource, sys
sys.path.insert(0, {root!r})
from hf_transfer.trainers.transfer_trainer import TransferTrainer
first = {{}}
step = TransferTrainer.training_step
def timed(self, *args, **kwargs):
    loss = step(self, *args, **kwargs)
    first.setdefault("seconds", time.time() - start)
    return loss
TransferTrainer.training_step = timed
import run_finetune
results = run_finetune.main({argv!r})
peak = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
print("RESULT", json.dumps({{"first_step_seconds": round(first["seconds"], 1), "peak_rss_mb": round(peak / 1024),
                            "images_per_second": results.get("train_steady_images_per_second"),
                            "train_samples": results.get("train_samples", results.get("train_streamed_images"))}}))
"""


def make_images(root: Path, n: int, seed: int = 0) -> tuple[Path, Path]:
    """`root/folder/<class>/<i>.jpg` and `root/parquet/train-*.parquet` with the same N JPEGs."""
    import numpy as np
    import PIL.Image
    import skimage.data
    from datasets import ClassLabel, Dataset, Features, Image

    folder, shards = root / "folder", root / "parquet"
    if (root / "done").exists():
        return folder, shards
    rng = np.random.default_rng(seed)
    photos = [np.asarray(PIL.Image.fromarray(getattr(skimage.data, name)()).convert("RGB")) for name in PICTURES]
    rows, shard = [], 0
    features = Features({"image": Image(), "label": ClassLabel(names=list(PICTURES))})
    for i in range(n):
        label = i % len(PICTURES)
        photo = photos[label]
        height, width = (int(v) for v in rng.integers(32, 97, size=2))
        top, left = int(rng.integers(0, photo.shape[0] - height)), int(rng.integers(0, photo.shape[1] - width))
        buffer = io.BytesIO()
        PIL.Image.fromarray(photo[top:top + height, left:left + width]).save(buffer, format="JPEG", quality=90)
        path = folder / PICTURES[label] / f"{i}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(buffer.getvalue())
        rows.append((buffer.getvalue(), label))
        if len(rows) == 20_000 or i == n - 1:  # shards as the Hub stores them: the features in the schema
            shards.mkdir(parents=True, exist_ok=True)
            Dataset.from_dict({"image": [{"bytes": b, "path": None} for b, _ in rows], "label": [y for _, y in rows]},
                              features=features).to_parquet(str(shards / f"train-{shard:05d}.parquet"))
            rows, shard = [], shard + 1
    (root / "done").write_text("")
    return folder, shards


def run_case(data_flags: list[str], out: Path, cache: Path) -> dict:
    argv = [*data_flags, "--model", "resnet18", "--from_scratch", "--image_size", "64", "--max_steps", "30",
            "--per_device_train_batch_size", "64", "--do_eval", "false", "--do_predict", "false",
            "--eval_strategy", "no", "--save_strategy", "no", "--load_best_model_at_end", "false",
            "--output_dir", str(out), "--overwrite_output_dir", "--disable_tqdm", "true", "--report_to", "none"]
    env = {**os.environ, "HF_DATASETS_CACHE": str(cache)}
    proc = subprocess.run([sys.executable, "-c", DRIVER.format(root=str(ROOT), argv=argv)], capture_output=True,
                          text=True, env=env, cwd=str(ROOT))
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        raise RuntimeError(f"run failed: {proc.stderr[-3000:]}")
    return json.loads(line.removeprefix("RESULT "))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="2000,200000")
    parser.add_argument("--forms", default="image folder,parquet,parquet streamed")
    parser.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "hf-transfer-large"))
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "large-data-cpu-2core.json"))
    args = parser.parse_args()

    import torch

    output = Path(args.output)
    report = json.loads(output.read_text()) if output.exists() else {"results": {}}
    for n in (int(s) for s in args.sizes.split(",")):
        root = Path(args.workdir) / str(n)
        start = time.time()
        folder, shards = make_images(root, n)
        print(f"{n} images ready ({time.time() - start:.0f} s)", flush=True)
        forms = {"image folder": ["--train_dir", str(folder)], "parquet": ["--dataset_name", str(shards)],
                 "parquet streamed": ["--dataset_name", str(shards), "--streaming", "--max_eval_samples", "200"]}
        for form in args.forms.split(","):
            flags = forms[form]
            cache = root / "datasets-cache"
            shutil.rmtree(cache, ignore_errors=True)
            cold = run_case(flags, root / "run", cache)
            warm = run_case(flags, root / "run", cache)
            report["results"][f"{form}, {n} images"] = {"cold_cache": cold, "warm_cache": warm}
            print(form, n, json.dumps(report["results"][f"{form}, {n} images"]), flush=True)
            report["machine"] = {"cpu": platform.machine(), "threads": torch.get_num_threads(),
                                 "torch": torch.__version__}
            output.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
