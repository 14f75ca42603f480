"""Digits as class folders of PNG files with a known share of training labels flipped on purpose: the ground truth
the label-error check is measured against (tests/test_label_errors.py, benchmarks/label_errors.py)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass
class NoisyDigits:
    train_dir: str
    validation_dir: str
    test_dir: str
    flipped: set[str]  # the training files stored under another class than the digit they show (absolute paths)


def noisy_digits(root: Path, flip: float = 0.05, train: int = 600, validation: int = 200, test: int = 200,
                 size: int = 16, seed: int = 0) -> NoisyDigits:
    """scikit-learn's real 8x8 digits upscaled to `size` px RGB PNGs, one folder per class and split (drawn at
    random, without overlap); `flip` of the training images are saved in a folder of another class, drawn at
    random."""
    import PIL.Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = np.round(digits.images * (255 / 16)).astype(np.uint8)  # stored as 0..16
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(pixels))
    counts = {"train": train, "validation": validation, "test": test}
    if sum(counts.values()) > len(order):
        raise ValueError(f"digits has {len(order)} images, asked for {sum(counts.values())}")
    root, flipped, start = Path(root), set(), 0
    for split, n in counts.items():
        chosen = order[start:start + n]
        start += n
        wrong = set(rng.choice(n, round(flip * n), replace=False).tolist()) if split == "train" else set()
        for i, index in enumerate(chosen):
            label = int(digits.target[index])
            if i in wrong:  # another class, uniformly
                label = int(rng.choice([c for c in range(10) if c != label]))
            folder = root / split / str(label)
            folder.mkdir(parents=True, exist_ok=True)
            path = (folder / f"{index}.png").resolve()
            picture = PIL.Image.fromarray(pixels[index]).convert("RGB")
            picture.resize((size, size), PIL.Image.Resampling.BILINEAR).save(path)
            if i in wrong:
                flipped.add(str(path))
    return NoisyDigits(str(root / "train"), str(root / "validation"), str(root / "test"), flipped)
