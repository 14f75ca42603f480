"""Where a data set comes from: what a name or a folder is, and how each way of reading it opens it.

`resolve` says what a data set is, with the checks that read no data; the kinds:
- built-in: `digits` (scikit-learn's 1,797 real handwritten digits) and `digits-multilabel` (two or three of
  them per image, several labels each), made in memory, with no download;
- class folders: `--train_dir` (and `--validation_dir`, `--test_dir`): one subfolder of images per class,
  listed directly, or another layout datasets' imagefolder reads (nested folders, a metadata file);
- saved: a local folder written by `save_to_disk` (it holds dataset_dict.json or state.json);
- files: any other local folder: data files (Parquet, Arrow, CSV, images) or a Hub-like repo, read by datasets;
- hub: anything else is a Hub data set id (default: CIFAR-10).
`--unlabeled_dir` is one more: every image file under a folder, at any depth, folder names ignored.

Each way of reading opens a source and returns its splits under their canonical names (train, validation,
test; `canonical_splits`): `open_splits` every split whole (the in-memory path, dataset.py), `open_stream`
the splits as streams (--streaming, streaming.py; a built-in or saved data set is refused) and
`open_unlabeled` one split, or the image files (data/unlabeled.py).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from datasets import (
    ClassLabel,
    Dataset,
    DatasetDict,
    Features,
    Image,
    List,
    load_dataset,
    load_from_disk,
)
from datasets.packaged_modules.imagefolder.imagefolder import IMAGE_EXTENSIONS as _EXTENSIONS

from ..errors import UserError, check_local_path, wrap_load_error
from ..integrations.hub import check_hub_reachable

BUILT_IN, CLASS_FOLDERS, SAVED, FILES, HUB = "built-in", "class folders", "saved", "files", "hub"
DEFAULT = "uoft-cs/cifar10"
DIGITS = "digits"
DIGITS_NAME = "sklearn digits"  # what the model card calls it
DIGITS_MULTI = "digits-multilabel"  # several digits per image, composited from `digits` (several labels per image)
DIGITS_MULTI_NAME = "sklearn digits, two or three per image"
METADATA_FILES = ("metadata.jsonl", "metadata.csv", "metadata.parquet")  # an image folder's labels, datasets' names
IMAGE_EXTENSIONS = tuple(_EXTENSIONS)  # the files an image folder's rows are made of (datasets' imagefolder list)
_SPLIT_ALIASES = {"train": ("train", "training"), "validation": ("validation", "valid", "val", "dev", "eval"),
                  "test": ("test", "testing")}
_SAVED_FILES = ("dataset_dict.json", "state.json")
SKIPPED = (".", "__")  # names the folder listing skips, as datasets' imagefolder does (.ipynb_checkpoints, __MACOSX)


@dataclass(frozen=True)
class Source:
    """A data set resolved (see the module docstring)."""

    kind: str
    name: str  # as given: the built-in name, the Hub id, the folder (--train_dir for class folders)
    title: str  # what messages and the model card call it
    config: str | None = None  # --dataset_config_name
    folders: tuple[tuple[str, str], ...] = ()  # class folders: (split, glob of its files)


def resolve(dataset_name: str | None = None, config_name: str | None = None, train_dir: str | None = None,
            validation_dir: str | None = None, test_dir: str | None = None, flag: str = "--dataset_name") -> Source:
    """What a data set name or its folders are; refused in one line where they can be nothing (`flag`: the flag
    that named it)."""
    if train_dir or validation_dir or test_dir:
        return _class_folders_source(train_dir, validation_dir, test_dir)
    name = dataset_name or DEFAULT
    if name in BUILT_IN_SETS:
        return Source(BUILT_IN, name, BUILT_IN_SETS[name][0])
    check_local_path(flag, name)
    path = Path(name)
    try:
        if path.is_dir() and any((path / saved).exists() for saved in _SAVED_FILES):
            return Source(SAVED, name, name, config_name)
        if path.exists() or name.startswith((".", "/")):
            if not path.is_dir():
                raise UserError(f"{flag} '{name}' is neither a directory nor a Hub data set id")
            return Source(FILES, name, name, config_name)
    except OSError as exc:  # a name the file system cannot hold (too long, ...)
        raise wrap_load_error("data set", name, exc) from exc
    return Source(HUB, name, name, config_name)


def _class_folders_source(train_dir, validation_dir, test_dir) -> Source:
    if not train_dir:
        raise UserError("--validation_dir/--test_dir need --train_dir as well")
    files = []
    for split, folder in (("train", train_dir), ("validation", validation_dir), ("test", test_dir)):
        if folder:
            if not Path(folder).is_dir():
                raise UserError(f"--{split}_dir '{folder}' is not a directory")
            files.append((split, str(Path(folder) / "**")))
    classes = sorted(p.name for p in Path(train_dir).iterdir()
                     if p.is_dir() and not p.name.startswith(SKIPPED) and any(p.iterdir()))
    metadata = any((Path(train_dir) / m).is_file() for m in METADATA_FILES)  # labels from a file, not folders
    if len(classes) < 2 and not metadata:
        raise UserError(f"--train_dir '{train_dir}' has {len(classes)} class folder(s) "
                        f"({', '.join(classes) or 'none'}); an image folder needs one subfolder per class, at least 2")
    return Source(CLASS_FOLDERS, train_dir, str(train_dir), folders=tuple(files))


# ---------------------------------------------------------------- the ways of reading


def open_splits(source: Source, cache_dir: str | None = None) -> dict[str, Dataset]:
    """Every split of `source`, whole (the in-memory path)."""
    return canonical_splits(_open_whole(source, cache_dir), source.title)


def open_stream(source: Source, cache_dir: str | None = None) -> dict:
    """The splits of `source` as datasets' streams (`IterableDataset`), read a shard (file) at a time."""
    if source.kind == BUILT_IN:
        raise UserError(built_in_streamed(source.name))
    if source.kind == SAVED:
        raise UserError(f"'{source.name}' is a save_to_disk folder, which datasets cannot stream; run without "
                        "--streaming, or save it as Parquet shards (Dataset.to_parquet)")
    return canonical_splits(_load(source, cache_dir, streaming=True), source.title)


def open_unlabeled(directory: str | None, dataset: str | None, split: str,
                   cache_dir: str | None = None) -> tuple[Dataset, str]:
    """The images without labels: every image file under `directory` (one column, "image"), or the split `split`
    of `dataset` (any kind `resolve` knows); and how messages name the source."""
    if directory:
        if not Path(directory).is_dir():
            raise UserError(f"--unlabeled_dir '{directory}' is not a directory")
        try:
            found = load_dataset("imagefolder", data_files={"train": str(Path(directory) / "**")}, drop_labels=True,
                                 split="train", cache_dir=cache_dir)
        except (OSError, ValueError) as exc:  # "corresponds to no data": no file with an image extension
            raise UserError(f"--unlabeled_dir '{directory}' holds no image file at any depth") from exc
        return found, f"--unlabeled_dir '{directory}'"
    raw = _open_whole(resolve(dataset, flag="--unlabeled_dataset"), cache_dir)
    if split in raw:
        return raw[split], f"--unlabeled_dataset '{dataset}'"
    splits = canonical_splits(raw, dataset)
    if split not in splits:
        raise UserError(f"--unlabeled_dataset '{dataset}' has no split '{split}'; its splits are: {', '.join(raw)} "
                        "(pass --unlabeled_split)")
    return splits[split], f"--unlabeled_dataset '{dataset}'"


def canonical_splits(raw, name: str) -> dict:
    """The splits under the names train, validation and test (the first of each one's aliases `raw` has)."""
    splits = {}
    for canonical, aliases in _SPLIT_ALIASES.items():
        for alias in aliases:
            if alias in raw:
                splits[canonical] = raw[alias]
                break
    if "train" not in splits:
        raise UserError(f"data set '{name}' has no train split; its splits are: {', '.join(raw)}")
    return splits


def local_signature(name: str) -> str:
    """For a local folder, its files' names, sizes and times (caches of what was read from it follow their
    changes); for anything else, nothing."""
    path = Path(name)
    if not path.is_dir():
        return ""
    files = sorted(p for p in path.rglob("*") if p.is_file())
    return ";".join(f"{p.relative_to(path)}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files)


def built_in_streamed(name: str | None) -> str:
    """The refusal of a built-in data set with --streaming ("" for any other name)."""
    if name not in BUILT_IN_SETS:
        return ""
    return (f"--streaming is for data sets larger than memory; '{name}' is {BUILT_IN_SETS[name][2]} images: leave "
            "--streaming out")


def _open_whole(source: Source, cache_dir: str | None) -> DatasetDict:
    if source.kind == BUILT_IN:
        return BUILT_IN_SETS[source.name][1]()
    if source.kind == CLASS_FOLDERS:
        return _open_class_folders(source, cache_dir)
    loaded = _load(source, cache_dir)
    return DatasetDict(train=loaded) if isinstance(loaded, Dataset) else loaded


def _load(source: Source, cache_dir: str | None, streaming: bool = False):
    """A saved, files or Hub source through datasets, its errors in one line."""
    try:
        if source.kind == SAVED:
            return load_from_disk(str(Path(source.name)))
        if source.kind == HUB:
            check_hub_reachable()
        name = source.name if source.kind == HUB else str(Path(source.name))
        return load_dataset(name, source.config, cache_dir=cache_dir, streaming=streaming)
    except (OSError, ValueError) as exc:  # ConnectionError, FileNotFoundError, DatasetNotFoundError, ...
        raise wrap_load_error("data set", source.name, exc) from exc


def _open_class_folders(source: Source, cache_dir: str | None) -> DatasetDict:
    files = dict(source.folders)
    listed = _class_folders(files)
    if listed is not None:
        return listed
    try:  # another layout (nested folders, metadata files): datasets' imagefolder knows them all
        return load_dataset("imagefolder", data_files=files, cache_dir=cache_dir)
    except (OSError, ValueError) as exc:
        if re.search(r"changed from (array to|\w+ to array)", str(exc)):  # pyarrow reading metadata.jsonl
            raise UserError(f"the metadata file of '{source.name}' holds a list of labels in some rows and a single "
                            f"value in others ({str(exc).strip().splitlines()[0]}); write every row's labels as a "
                            "list (several labels per image) or every row's as one value") from exc
        raise wrap_load_error("image folder", source.name, exc) from exc


def _class_folders(files: dict[str, str]) -> DatasetDict | None:
    """Image folders laid out as one subfolder of images per class, listed directly; None for any other layout.

    The same rows as datasets' imagefolder (labels from the folder names, sorted; files in path
    order), which for 200,000 JPEGs spends 54 s on 2 cores resolving a glob over every file and
    indexing them before the first step (benchmarks/large_data.py); listing them takes about a second.
    """
    paths, labels = {}, set()
    for split, pattern in files.items():
        root, found = Path(pattern).parent.absolute(), []  # as imagefolder: paths that hold from any folder
        for entry in os.scandir(root):
            if entry.name.startswith(SKIPPED):
                continue
            if not entry.is_dir():
                if entry.name.lower().endswith(IMAGE_EXTENSIONS) or entry.name.startswith("metadata."):
                    return None  # images outside a class folder, or labels from a metadata file
                continue
            for file in os.scandir(entry.path):
                if file.name.startswith(SKIPPED):
                    continue
                if file.is_dir() or file.name.startswith("metadata."):
                    return None  # nested folders: datasets' rules decide the labels
                if file.name.lower().endswith(IMAGE_EXTENSIONS):
                    found.append((file.path, entry.name))
        paths[split] = sorted(found)
        labels.update(label for _, label in found)
    features = Features({"image": Image(), "label": ClassLabel(names=sorted(labels))})
    return DatasetDict({split: Dataset.from_dict({"image": [{"path": p, "bytes": None} for p, _ in found],
                                                  "label": [label for _, label in found]}, features=features)
                        for split, found in paths.items()})


# ---------------------------------------------------------------- the built-in data sets


def digits_dataset(test_fraction: float = 0.2) -> DatasetDict:
    """scikit-learn's 1,797 real 8x8 handwritten digits as an image data set with train/test splits.

    The train/test split is fixed (seed 0), so every run is scored on the same 360 images.
    """
    import PIL.Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = np.round(digits.images * (255 / 16)).astype(np.uint8)  # stored as 0..16
    features = Features({"image": Image(), "label": ClassLabel(names=[str(i) for i in range(10)])})
    ds = Dataset.from_dict(
        {"image": [PIL.Image.fromarray(p) for p in pixels], "label": digits.target.tolist()},
        features=features,
    )
    parts = ds.train_test_split(test_size=test_fraction, seed=0, stratify_by_column="label")
    return DatasetDict(train=parts["train"], test=parts["test"])


def digits_multilabel_dataset(train: int = 2000, test: int = 500) -> DatasetDict:
    """Real data with several labels per image, offline: two or three different digits of `digits_dataset` in the
    cells of a 2 x 2 grid (16 x 16 px, the other cells blank); the labels are the set of digits shown. Train
    images are made from the digits of its train split, test images from its test split (seed 0, fixed)."""
    import PIL.Image

    rng = np.random.default_rng(0)
    names = [str(i) for i in range(10)]
    features = Features({"image": Image(), "labels": List(ClassLabel(names=names))})
    splits, digits = {}, digits_dataset()
    for split, count in (("train", train), ("test", test)):
        source = digits[split]
        pixels = np.stack([np.asarray(image) for image in source["image"]])
        by_class = [np.flatnonzero(np.asarray(source["label"]) == c) for c in range(10)]
        images, labels = [], []
        for _ in range(count):
            shown = rng.choice(10, size=rng.integers(2, 4), replace=False)
            canvas = np.zeros((16, 16), np.uint8)
            for digit, cell in zip(shown, rng.permutation(4)):
                row, col = divmod(int(cell), 2)
                canvas[8 * row:8 * row + 8, 8 * col:8 * col + 8] = pixels[rng.choice(by_class[digit])]
            images.append(PIL.Image.fromarray(canvas))
            labels.append(sorted(int(d) for d in shown))
        splits[split] = Dataset.from_dict({"image": images, "labels": labels}, features=features)
    return DatasetDict(splits)


# name -> (title, builder, its images: what a --streaming refusal says)
BUILT_IN_SETS = {DIGITS: (DIGITS_NAME, digits_dataset, "1,797"),
                 DIGITS_MULTI: (DIGITS_MULTI_NAME, digits_multilabel_dataset, "2,500")}
