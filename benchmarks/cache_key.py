#!/usr/bin/env python
"""What keying the teacher-logit cache by the image files' contents costs, against their sizes and times.

    python benchmarks/cache_key.py          # writes benchmarks/cache-key-cpu-2core.json

`--cache_teacher_logits` keys its file by the bytes of every image file the training rows name
(`distillation_trainer.image_files_digest`: an image folder's rows hold paths, not bytes). The
cheaper key would be each file's path, size and modification time (`os.stat`), which a copy that
keeps the times (`cp -p`, `rsync -a`, an unpacked archive) leaves unchanged over other pixels.
Measured on two class folders: 200,000 small JPEGs (32-96 px crops of scikit-image's photos, as
benchmarks/large_data.py makes them) and 20,000 ImageNet-sized ones (500 x 375, about 100 KB); the
training split is 90% of each. Reported: seconds to hash the contents, seconds to stat every file,
and, for scale, what decoding every training image once (one epoch's reading, no model) takes,
estimated from 2,000 of them. The files were just written, so they are read from the page cache.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def make_images(root: Path, n: int, large: bool) -> None:
    """`root/c<k>/<i>.jpg`, 10 class folders, n files copied from 500 distinct JPEGs."""
    import numpy as np
    import PIL.Image
    import skimage.data

    if (root / "done").exists():
        return
    rng = np.random.default_rng(0)
    photo = np.asarray(PIL.Image.fromarray(skimage.data.astronaut()).convert("RGB"))
    blobs = []
    for _ in range(500):
        if large:  # a photo crop with noise (JPEG keeps it), resized to 500 x 375
            top, left = (int(v) for v in rng.integers(0, 100, size=2))
            noisy = photo[top:top + 375, left:left + 400].astype(int) + rng.integers(-40, 40, (375, 400, 3))
            image = PIL.Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).resize((500, 375))
        else:
            height, width = (int(v) for v in rng.integers(32, 97, size=2))
            top, left = (int(v) for v in rng.integers(0, 400, size=2))
            image = PIL.Image.fromarray(photo[top:top + height, left:left + width])
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=90)
        blobs.append(buffer.getvalue())
    for i in range(n):
        path = root / f"c{i % 10}" / f"{i}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(blobs[i % len(blobs)])
    (root / "done").write_text("")


def measure(root: Path) -> dict:
    from hf_transfer.data.dataset import load_image_data
    from hf_transfer.data.decoding import decode_rgb
    from hf_transfer.trainers.distillation_trainer import image_files_digest

    data = load_image_data(train_dir=str(root), seed=0)
    train = data.train.with_format(None)
    paths = [cell["path"] for cell in train[data.image_column]]
    started = time.perf_counter()
    image_files_digest(data.train, data.image_column)
    contents = time.perf_counter() - started
    started = time.perf_counter()
    digest = hashlib.sha256()
    for path in paths:
        stat = os.stat(path)
        digest.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    stats = time.perf_counter() - started
    sample = train.select(range(2000))[data.image_column]
    started = time.perf_counter()
    for cell in sample:
        decode_rgb(cell)
    decode = (time.perf_counter() - started) / len(sample) * len(paths)
    return {"training_files": len(paths), "megabytes": round(sum(os.path.getsize(p) for p in paths) / 1e6),
            "contents_sha256_seconds": round(contents, 1), "path_size_mtime_seconds": round(stats, 1),
            "decode_every_image_once_seconds": round(decode, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "hf-transfer-cache-key"))
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "cache-key-cpu-2core.json"))
    args = parser.parse_args()

    results = {}
    for name, n, large in (("200,000 small JPEGs", 200_000, False), ("20,000 ImageNet-sized JPEGs", 20_000, True)):
        root = Path(args.workdir) / ("large" if large else "small")
        make_images(root, n, large)
        results[name] = measure(root)
        print(name, json.dumps(results[name]), flush=True)
    report = {"machine": {"cpu": platform.machine(), "cpu_count": os.cpu_count(), "python": platform.python_version()},
              "results": results}
    Path(args.output).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
