"""An image folder with known faults, built from scikit-learn's digits: test images copied into train (leaks) and
training images filed under the wrong class (label errors), with the ground truth of both.

    data = faulty_digits(tmp_path)          # about 1 s on one core
    data.train, data.validation, data.test  # class folders: <split>/<digit>/<file>.png
    data.leaks                              # 30 (train file, test file, "exact" | "near") pairs
    data.flipped                            # training file -> its true label, for the 5% filed under another class

Every image is an 8x8 digit upscaled to `size` px RGB PNG. Of the 30 leaked test images, 20 are byte-identical
copies and 10 are resized to `near_size` px and re-encoded as JPEG (a near-duplicate no file hash finds). The
flipped images are drawn among the original training images (not the leaked copies), each moved to another class
chosen at random. Everything follows from `seed`.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import PIL.Image


@dataclass
class Leak:
    train_file: str
    test_file: str
    kind: str  # "exact": a byte-identical copy; "near": resized and re-encoded as JPEG


@dataclass
class FaultyData:
    root: Path
    leaks: list[Leak]
    flipped: dict[str, str]  # training file (after the move) -> its true label
    labels: dict[str, str] = field(default_factory=dict)  # every file -> the label of the folder it is in

    @property
    def train(self) -> str:
        return str(self.root / "train")

    @property
    def validation(self) -> str:
        return str(self.root / "validation")

    @property
    def test(self) -> str:
        return str(self.root / "test")


def faulty_digits(root: Path, seed: int = 0, size: int = 32, near_size: int = 40, exact: int = 20, near: int = 10,
                  flip_fraction: float = 0.05, test_fraction: float = 0.2, validation_fraction: float = 0.1,
                  jpeg_quality: int = 90) -> FaultyData:
    """The digits as train/ validation/ test/ class folders with `exact` + `near` test images leaked into train
    and `flip_fraction` of the original training images moved to another class (see the module docstring)."""
    from sklearn.datasets import load_digits

    rng = np.random.default_rng(seed)
    digits = load_digits()
    pixels = np.round(digits.images * (255 / 16)).astype(np.uint8)  # stored as 0..16
    names = [str(c) for c in range(10)]
    order = rng.permutation(len(pixels))
    n_test, n_validation = round(len(order) * test_fraction), round(len(order) * validation_fraction)
    parts = {"test": order[:n_test], "validation": order[n_test:n_test + n_validation],
             "train": order[n_test + n_validation:]}
    root = Path(root)
    files: dict[str, list[Path]] = {}
    labels: dict[str, str] = {}
    for split, indices in parts.items():
        files[split] = []
        for index in indices:
            label = names[digits.target[index]]
            path = root / split / label / f"digit-{index:04d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            image = PIL.Image.fromarray(pixels[index]).resize((size, size), PIL.Image.BILINEAR).convert("RGB")
            image.save(path)
            files[split].append(path)
            labels[str(path)] = label

    flipped: dict[str, str] = {}
    train_files = list(files["train"])
    for i in rng.choice(len(train_files), size=round(len(train_files) * flip_fraction), replace=False):
        path = train_files[i]
        true = path.parent.name
        wrong = names[(names.index(true) + int(rng.integers(1, len(names)))) % len(names)]
        moved = root / "train" / wrong / path.name
        path.rename(moved)
        del labels[str(path)]
        labels[str(moved)] = wrong
        flipped[str(moved)] = true

    leaks = []
    for n, i in enumerate(rng.choice(len(files["test"]), size=exact + near, replace=False)):
        source = files["test"][i]
        label = source.parent.name  # leaked under its true label: a leak, not a label error
        if n < exact:
            copy = root / "train" / label / f"copy-{source.name}"
            shutil.copyfile(source, copy)
            kind = "exact"
        else:
            copy = root / "train" / label / f"copy-{source.stem}.jpg"
            with PIL.Image.open(source) as image:
                image.resize((near_size, near_size), PIL.Image.BICUBIC).save(copy, quality=jpeg_quality)
            kind = "near"
        labels[str(copy)] = label
        leaks.append(Leak(str(copy), str(source), kind))
    return FaultyData(root=root, leaks=leaks, flipped=flipped, labels=labels)
