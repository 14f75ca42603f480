"""The data set in memory: its image and label columns, its labels, and its splits.

Where it comes from (a Hub id, a local folder, class folders, the built-in digits) is `sources.py`'s.

Nothing is decoded here: images stay as stored until `samples.py` decodes them, per sample,
when the DataLoader asks for them. Every check that can fail (columns, labels, splits) runs
before training.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import numpy as np
import torch
from datasets import ClassLabel, Dataset, Features, Image, Value

from ..errors import UserError
from ..tasks.classification import MultiLabel, SingleLabel, is_list_feature, prepare_multilabel
from .decoding import decode_rgb
from .sources import CLASS_FOLDERS, open_splits, resolve

logger = logging.getLogger(__name__)

ROW = "__row__"  # original row number in its split, carried along for error messages and caches
IMAGE_NAMES = ("image", "img", "images", "picture", "photo", "pixel_values")
LABEL_NAMES = ("label", "labels", "fine_label", "class", "target", "category", "coarse_label")


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
    decoded: dict = field(default_factory=dict)  # split -> its pixels decoded once (samples.py), which the check reads
    leaks: dict[str, int] = field(default_factory=dict)  # the data check's leak counts, as the results name them

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
    source = resolve(dataset_name, dataset_config_name, train_dir, validation_dir, test_dir)
    splits = open_splits(source, cache_dir)

    features = splits["train"].features
    image_column = pick_column(features, image_column, IMAGE_NAMES, lambda f: isinstance(f, Image), "image")
    label_column = pick_column(
        features, label_column, LABEL_NAMES,
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
        folders = source.kind == CLASS_FOLDERS or splits["train"].info.builder_name == "imagefolder"
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
        splits, skipped = drop_corrupt_images(splits, image_column)
    if len(splits["train"]) == 0 or len(splits["validation"]) == 0:
        raise UserError("the train or validation split is empty; check --max_train_samples / --validation_split")
    return ImageData(
        train=splits["train"], validation=splits["validation"], test=splits.get("test"),
        label_names=label_names, image_column=image_column, label_column=label_column,
        name=source.title, validation_from_train=validation_from_train, skipped_images=skipped, task=task,
    )


# ---------------------------------------------------------------- columns


def pick_column(features: Features, chosen, names, is_kind, kind: str) -> str:
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


def drop_corrupt_images(splits: dict[str, Dataset], image_column: str) -> tuple[dict[str, Dataset], dict[str, int]]:
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
