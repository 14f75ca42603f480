"""The data set: where it comes from, its image and label columns, and its splits.

Sources: a Hub data set id (default CIFAR-10), a local directory (a Hub-style repo of
parquet files, a `save_to_disk` folder, or an image folder), `--train_dir`-style image
folders, or `digits`: scikit-learn's bundled handwritten digits, real data with no download.

Nothing is decoded here: images stay as stored until `samples.py` decodes them, per sample,
when the DataLoader asks for them. Every check that can fail (columns, labels, splits) runs
before training.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from datasets import (
    ClassLabel,
    Dataset,
    DatasetDict,
    Features,
    Image,
    List,
    Value,
    load_dataset,
    load_from_disk,
)
from datasets.packaged_modules.imagefolder.imagefolder import IMAGE_EXTENSIONS as _EXTENSIONS

from ..errors import UserError, check_local_path, wrap_load_error
from ..integrations.hub import check_hub_reachable
from ..tasks.classification import MultiLabel, SingleLabel, is_list_feature, prepare_multilabel
from .decoding import decode_rgb

logger = logging.getLogger(__name__)

ROW = "__row__"  # original row number in its split, carried along for error messages and caches
_IMAGE_NAMES = ("image", "img", "images", "picture", "photo", "pixel_values")
_LABEL_NAMES = ("label", "labels", "fine_label", "class", "target", "category", "coarse_label")
_SPLIT_ALIASES = {"train": ("train", "training"), "validation": ("validation", "valid", "val", "dev", "eval"),
                  "test": ("test", "testing")}
DIGITS = "digits"
DIGITS_NAME = "sklearn digits"  # what the model card calls it
DIGITS_MULTI = "digits-multilabel"  # several digits per image, composited from `digits` (several labels per image)
DIGITS_MULTI_NAME = "sklearn digits, two or three per image"
METADATA_FILES = ("metadata.jsonl", "metadata.csv", "metadata.parquet")  # an image folder's labels, datasets' names
IMAGE_EXTENSIONS = tuple(_EXTENSIONS)  # the files an image folder's rows are made of (datasets' imagefolder list)


@dataclass
class ImageData:
    train: Dataset
    validation: Dataset
    test: Dataset | None
    label_names: list[str]
    image_column: str
    label_column: str
    name: str  # what the model card calls the data set
    validation_from_train: bool  # carved out of train with --validation_split
    skipped_images: dict[str, int]  # split -> images dropped by --skip_corrupt_images (and unreadable unlabeled ones)
    unlabeled: int = 0  # rows of `train` without a label (data/unlabeled.py), after the labelled ones
    # The training epoch, in shared memory so that DataLoader workers (persistent ones too) see it.
    epoch: torch.Tensor = field(default_factory=lambda: torch.zeros((), dtype=torch.int64).share_memory_())
    # Set by attach_transforms: every split is decoded in memory and no per-image CPU work is left
    # (crops and flips, if any, run on the device), so loading a batch is a gather of rows.
    in_memory: bool = False
    task: SingleLabel | None = None  # one class per image (default) or several (tasks.py), from the label column

    def __post_init__(self):
        if self.task is None:
            self.task = SingleLabel(len(self.label_names))

    @property
    def train_size(self) -> int | None:
        """Rows of the train split; None for a stream (data/streaming.py), which has no length."""
        return len(self.train) if hasattr(self.train, "__len__") else None


def load_image_data(
    dataset_name: str | None = None,
    dataset_config_name: str | None = None,
    train_dir: str | None = None,
    validation_dir: str | None = None,
    test_dir: str | None = None,
    image_column: str | None = None,
    label_column: str | None = None,
    validation_split: float = 0.1,
    max_train_samples: int | None = None,
    max_eval_samples: int | None = None,
    seed: int = 42,
    skip_corrupt_images: bool = False,
    cache_dir: str | None = None,
    multi_label: bool = False,
) -> ImageData:
    """Load, check and split a data set; images stay undecoded until a batch asks for them. Several labels per
    image when the label column holds lists, or with `multi_label` (tasks.py)."""
    if not 0 < validation_split < 1:
        raise UserError(f"--validation_split must be between 0 and 1 (exclusive), got {validation_split}")
    raw, name = _load_raw(dataset_name, dataset_config_name, train_dir, validation_dir, test_dir, cache_dir)
    splits = _canonical_splits(raw, name)

    features = splits["train"].features
    image_column = _pick_column(features, image_column, _IMAGE_NAMES, lambda f: isinstance(f, Image), "image")
    label_column = _pick_column(
        features, label_column, _LABEL_NAMES,
        lambda f: isinstance(f, ClassLabel) or isinstance(getattr(f, "feature", None), ClassLabel), "label"
    )
    if not isinstance(features[image_column], Image):
        raise UserError(f"column '{image_column}' holds {features[image_column]}, not images; pass --image_column")
    if multi_label or is_list_feature(features[label_column]):
        splits, label_names = prepare_multilabel(splits, label_column)
        task = MultiLabel(len(label_names))
        if not label_names:
            raise UserError(f"no training image has a label in column '{label_column}'")
    else:
        # Classes read from folder names or label values are those of every split together: one that only
        # validation or test has is a mistake (a misspelt folder), not a class of the data set.
        folders = bool(train_dir) or splits["train"].info.builder_name == "imagefolder"
        from_data = folders or not isinstance(features[label_column], ClassLabel)
        splits, label_names = _as_class_labels(splits, label_column)
        task = SingleLabel(len(label_names))
        if len(label_names) < 2:
            raise UserError(f"the data set has {len(label_names)} class(es) in column '{label_column}'; need at least 2")
        _check_label_range(splits, label_column, len(label_names))
        if from_data:
            _refuse_untrained_classes(splits, label_column, label_names, folders)

    splits = {key: ds.add_column(ROW, np.arange(len(ds))) for key, ds in splits.items()}
    validation_from_train = "validation" not in splits
    if validation_from_train:
        splits["train"], splits["validation"] = _split_off(splits["train"], validation_split, label_column, seed)
    if max_train_samples is not None and max_train_samples < len(splits["train"]):
        splits["train"] = _subsample(splits["train"], max_train_samples, label_column, seed)
    _warn_untrained_classes(splits, label_column, label_names, task.multi_label)
    if max_eval_samples is not None:
        for key in ("validation", "test"):
            if key in splits and max_eval_samples < len(splits[key]):
                splits[key] = _representative(splits[key], max_eval_samples, label_column, seed, task.multi_label)

    # Decode ourselves (decode=False) so a broken file raises an error that names its row.
    splits = {key: ds.cast_column(image_column, Image(decode=False)) for key, ds in splits.items()}
    skipped = {}
    if skip_corrupt_images:
        splits, skipped = _drop_corrupt_images(splits, image_column)
    if len(splits["train"]) == 0 or len(splits["validation"]) == 0:
        raise UserError("the train or validation split is empty; check --max_train_samples / --validation_split")
    return ImageData(
        train=splits["train"], validation=splits["validation"], test=splits.get("test"),
        label_names=label_names, image_column=image_column, label_column=label_column,
        name=name, validation_from_train=validation_from_train, skipped_images=skipped, task=task,
    )


# ---------------------------------------------------------------- loading


def _load_raw(dataset_name, config_name, train_dir, validation_dir, test_dir,
              cache_dir: str | None = None) -> tuple[DatasetDict, str]:
    if train_dir or validation_dir or test_dir:
        if not train_dir:
            raise UserError("--validation_dir/--test_dir need --train_dir as well")
        files = {}
        for split, folder in (("train", train_dir), ("validation", validation_dir), ("test", test_dir)):
            if folder:
                if not Path(folder).is_dir():
                    raise UserError(f"--{split}_dir '{folder}' is not a directory")
                files[split] = str(Path(folder) / "**")
        classes = sorted(p.name for p in Path(train_dir).iterdir() if p.is_dir() and any(p.iterdir()))
        metadata = any((Path(train_dir) / m).is_file() for m in METADATA_FILES)  # labels from a file, not folders
        if len(classes) < 2 and not metadata:
            raise UserError(f"--train_dir '{train_dir}' has {len(classes)} class folder(s) "
                            f"({', '.join(classes) or 'none'}); an image folder needs one subfolder per class, "
                            "at least 2")
        listed = _class_folders(files)
        if listed is not None:
            return listed, str(train_dir)
        try:  # another layout (nested folders, metadata files): datasets' imagefolder knows them all
            return load_dataset("imagefolder", data_files=files, cache_dir=cache_dir), str(train_dir)
        except (OSError, ValueError) as exc:
            if re.search(r"changed from (array to|\w+ to array)", str(exc)):  # pyarrow reading metadata.jsonl
                raise UserError(f"the metadata file of '{train_dir}' holds a list of labels in some rows and a single "
                                f"value in others ({str(exc).strip().splitlines()[0]}); write every row's labels as a "
                                "list (several labels per image) or every row's as one value") from exc
            raise wrap_load_error("image folder", train_dir, exc) from exc

    name = dataset_name or "uoft-cs/cifar10"
    if name == DIGITS:
        return digits_dataset(), DIGITS_NAME
    if name == DIGITS_MULTI:
        return digits_multilabel_dataset(), DIGITS_MULTI_NAME
    check_local_path("--dataset_name", name)
    path = Path(name)
    try:
        if path.is_dir() and ((path / "dataset_dict.json").exists() or (path / "state.json").exists()):
            loaded = load_from_disk(str(path))
        elif path.exists() or name.startswith((".", "/")):
            if not path.is_dir():
                raise UserError(f"--dataset_name '{name}' is neither a directory nor a Hub data set id")
            loaded = load_dataset(str(path), config_name, cache_dir=cache_dir)
        else:
            check_hub_reachable()
            loaded = load_dataset(name, config_name, cache_dir=cache_dir)
    except UserError:
        raise
    except (OSError, ValueError) as exc:  # ConnectionError, FileNotFoundError, DatasetNotFoundError, ...
        raise wrap_load_error("data set", name, exc) from exc
    if isinstance(loaded, Dataset):
        loaded = DatasetDict(train=loaded)
    return loaded, name


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
            if entry.name.startswith((".", "__")):
                continue
            if not entry.is_dir():
                if entry.name.lower().endswith(IMAGE_EXTENSIONS) or entry.name.startswith("metadata."):
                    return None  # images outside a class folder, or labels from a metadata file
                continue
            for file in os.scandir(entry.path):
                if file.name.startswith((".", "__")):
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


def _canonical_splits(raw: DatasetDict, name: str) -> dict[str, Dataset]:
    splits = {}
    for canonical, aliases in _SPLIT_ALIASES.items():
        for alias in aliases:
            if alias in raw:
                splits[canonical] = raw[alias]
                break
    if "train" not in splits:
        raise UserError(f"data set '{name}' has no train split; its splits are: {', '.join(raw)}")
    return splits


def _pick_column(features: Features, chosen, names, is_kind, kind: str) -> str:
    columns = [c for c in features if c != ROW]
    if chosen:
        if chosen not in features:
            raise UserError(f"--{kind}_column '{chosen}' does not exist; the columns are: {', '.join(columns)}")
        return chosen
    typed = [c for c in columns if is_kind(features[c])]
    if len(typed) == 1:
        return typed[0]
    for candidate in (*typed, *names):
        if candidate in features and (not typed or candidate in typed):
            return candidate
    hint = (" (an image folder needs one subfolder per class, at least 2)"
            if kind == "label" and all(isinstance(features[c], Image) for c in columns) else "")
    raise UserError(f"cannot find the {kind} column; the columns are: {', '.join(columns)}{hint} (pass --{kind}_column)")


def _as_class_labels(splits: dict[str, Dataset], label_column: str) -> tuple[dict[str, Dataset], list[str]]:
    """Labels as a ClassLabel on every split; its names become the model's id2label."""
    feature = splits["train"].features[label_column]
    if isinstance(feature, ClassLabel):
        for split, ds in splits.items():  # class ids mean the training split's names in every split
            other = ds.features.get(label_column)
            if isinstance(other, ClassLabel) and other.names != feature.names:
                raise UserError(f"the {split} split names its classes {_names(other.names)}, the train split "
                                f"{_names(feature.names)}: the same class id would mean another class; store every "
                                "split with the same ClassLabel")
        return splits, list(feature.names)
    values = {v for ds in splits.values() for v in ds.unique(label_column)}
    if None in values:
        raise UserError(f"column '{label_column}' has empty labels")
    if all(isinstance(v, (int, np.integer)) for v in values):
        if min(values) < 0:
            raise UserError(f"column '{label_column}' has negative labels ({min(values)})")
        names = [str(i) for i in range(max(values) + 1)]
        splits = {k: ds.cast_column(label_column, ClassLabel(names=names)) for k, ds in splits.items()}
    elif all(isinstance(v, str) for v in values):
        names = sorted(values)
        index = {n: i for i, n in enumerate(names)}
        label = ClassLabel(names=names)
        splits = {
            k: ds.map(lambda b: {label_column: [index[v] for v in b[label_column]]}, batched=True,
                      features=Features({**ds.features, label_column: label}))
            for k, ds in splits.items()
        }
    else:
        raise UserError(f"column '{label_column}' holds {feature}, which is not a class label")
    return splits, names


def _names(names: list[str]) -> str:
    return ", ".join(names[:5]) + (f", ... ({len(names)})" if len(names) > 5 else "")


def _check_label_range(splits: dict[str, Dataset], label_column: str, num_labels: int) -> None:
    for split, ds in splits.items():
        labels = np.asarray(ds[label_column])
        bad = np.flatnonzero((labels < 0) | (labels >= num_labels))
        if bad.size:
            raise UserError(f"label {labels[bad[0]]} in split '{split}', row {bad[0]} is outside 0..{num_labels - 1} "
                            f"({bad.size} such rows); every row needs one of the {num_labels} classes")


def _class_counts(ds: Dataset, label_column: str, num_labels: int, multi_label: bool = False) -> np.ndarray:
    labels = ds[label_column]
    if multi_label:
        labels = [v for row in labels for v in row]
    return np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_labels)


def _refuse_untrained_classes(splits: dict[str, Dataset], label_column: str, names: list[str], folders: bool) -> None:
    """A class that validation or test has and train lacks, refused (before any split is carved or subsampled)."""
    trained = _class_counts(splits["train"], label_column, len(names)) > 0
    for split in ("validation", "test"):
        if split in splits:
            unseen = [names[c] for c in np.flatnonzero((_class_counts(splits[split], label_column, len(names)) > 0)
                                                       & ~trained)]
            if unseen:
                where = "class folders only that split has" if folders else "labels only that split has"
                raise UserError(f"the {split} split has classes no training image has: {', '.join(unseen[:5])}"
                                f"{', ...' if len(unseen) > 5 else ''} ({where}); every class needs training images: "
                                "add them, or rename or remove those images")


def _warn_untrained_classes(splits: dict[str, Dataset], label_column: str, names: list[str], multi_label: bool) -> None:
    """Classes that no training image has, named: those a ClassLabel declares, or those --max_train_samples left
    out (fewer images than classes); the model cannot learn them."""
    untrained = _class_counts(splits["train"], label_column, len(names), multi_label) == 0
    if not untrained.any():
        return
    held = {split: int(_class_counts(splits[split], label_column, len(names), multi_label)[untrained].sum())
            for split in ("validation", "test") if split in splits}
    shown = [names[c] for c in np.flatnonzero(untrained)]
    logger.warning("%d class(es) have no training image: %s%s; the model cannot learn them (%s)", len(shown),
                   ", ".join(shown[:5]), ", ..." if len(shown) > 5 else "",
                   ", ".join(f"{n} {split} image(s) of them" for split, n in held.items()))


def _decodes(value) -> bool:
    try:
        decode_rgb(value)
    except Exception:  # PIL raises many types; any of them means the file is unusable
        return False
    return True


def _drop_corrupt_images(splits: dict[str, Dataset], image_column: str) -> tuple[dict[str, Dataset], dict[str, int]]:
    """Decode every image once (in parallel for large splits) and keep the rows that decode."""
    kept, skipped = {}, {}
    for split, ds in splits.items():
        workers = min(8, os.cpu_count() or 1) if len(ds) > 20_000 else None
        kept[split] = ds.filter(lambda batch: [_decodes(v) for v in batch[image_column]], batched=True,
                                num_proc=workers, desc=f"checking {split} images")
        skipped[split] = len(ds) - len(kept[split])
        if skipped[split]:
            logger.warning("skipped %d of %d images in split '%s' that could not be decoded", skipped[split], len(ds),
                           split)
    return kept, skipped


def _split_off(train: Dataset, fraction: float, label_column: str, seed: int) -> tuple[Dataset, Dataset]:
    try:
        parts = train.train_test_split(test_size=fraction, seed=seed, stratify_by_column=label_column)
    except ValueError:  # a class too small to stratify
        parts = train.train_test_split(test_size=fraction, seed=seed)
    return parts["train"], parts["test"]


def _subsample(train: Dataset, n: int, label_column: str, seed: int) -> Dataset:
    """`n` rows drawn with every class in proportion (10 per class for 100 digits), seeded."""
    try:
        return train.train_test_split(train_size=n, seed=seed, stratify_by_column=label_column)["train"]
    except ValueError:  # fewer rows than classes
        return train.shuffle(seed=seed).select(range(n))


def _representative(ds: Dataset, n: int, label_column: str, seed: int, multi_label: bool) -> Dataset:
    """`n` rows of an evaluation split, seeded, stratified and in the split's own order: a class-sorted folder's
    first rows would all be of one class. Strata: the class, or for several labels per image each image's rarest
    label in the split; the classes too small to stratify (one image) share one. A seeded shuffle where there
    are fewer rows than strata, either side."""
    labels = ds[label_column]
    if multi_label:
        counts = np.bincount([v for row in labels for v in row], minlength=1)
        strata = np.array([min(row, key=counts.__getitem__) if row else counts.size for row in labels])
    else:
        strata = np.asarray(labels)
    sizes = np.bincount(strata)
    rare = sizes[strata] < 2
    strata[rare] = sizes.size if rare.sum() > 1 else np.argmax(sizes)  # one image alone joins the largest stratum
    features = Features({"row": Value("int64"), "stratum": ClassLabel(num_classes=int(strata.max()) + 1)})
    index = Dataset.from_dict({"row": np.arange(len(ds)), "stratum": strata}, features=features)
    try:
        rows = index.train_test_split(train_size=n, seed=seed, stratify_by_column="stratum")["train"]["row"]
    except ValueError:  # fewer rows than strata in the part kept or the part left
        rows = index.shuffle(seed=seed)["row"][:n]
    return ds.select(np.sort(rows))


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
