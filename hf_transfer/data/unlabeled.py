"""Images without labels, for distillation: the teacher labels them, the student learns from its answers.

Labels are scarce and images are not; the teacher's knowledge reaches the student only through the
images it is shown (a student taught by the teacher alone on 1,293 digits reached 0.981, one given
only the labels of 100 of them about 0.90). Two sources, both checked before training:
- `--unlabeled_dir DIR`: every image file under DIR, at any depth; folder names are ignored.
- `--unlabeled_dataset NAME_OR_PATH` (`--unlabeled_split`, default train): a Hub or local data set,
  as `--dataset_name` takes them; a label column, if any, is ignored.

The images join the training split as rows labelled `UNLABELED` (-1), so that everything the training
split has applies to them unchanged: shuffling together with the labelled rows (each batch holds both
in proportion), one pass over both per epoch (with several processes, each image once per epoch
across them), the augmentation, resume, the teacher-logit cache. The loss gives them the distillation
term only (`losses.py`). Checks:
- an image that is also a test image (the same decoded pixels) is refused: the student would train
  on the test set through the teacher's answers;
- images that are also validation images are left out, so that model selection stays on unseen images,
  and so are those that are also labelled training images (an image is labelled or it is not: one
  copy per epoch);
- unreadable files are skipped and counted (`train_unlabeled_skipped_images` in the results); a
  source without a single readable image is an error.
"""

from __future__ import annotations

import hashlib
import logging
import os

import numpy as np
from datasets import Dataset, Features, Image, Value, concatenate_datasets

from ..errors import UserError, wrap_load_error
from ..tasks.losses import UNLABELED
from .dataset import ROW, ImageData, pick_column
from .decoding import decode_rgb
from .sources import open_unlabeled

logger = logging.getLogger(__name__)


def add_unlabeled_images(data: ImageData, directory: str | None = None, dataset: str | None = None,
                         split: str = "train", cache_dir: str | None = None) -> None:
    """Load, check and append the unlabeled images to `data.train` (see the module docstring)."""
    if directory and dataset:
        raise UserError("pass either --unlabeled_dir or --unlabeled_dataset, not both")
    images, source = _load(directory, dataset, split, cache_dir)
    hashes = _content_hashes(images, "unlabeled")
    readable = [i for i, h in enumerate(hashes) if h is not None]
    skipped = len(images) - len(readable)
    if not readable:
        raise UserError(f"{source} has no readable image ({len(images)} file(s) could not be decoded)")
    if skipped:
        logger.warning("skipped %d of %d unlabeled images that could not be decoded", skipped, len(images))

    unlabeled = {hashes[i]: i for i in readable}  # identical images once
    if data.test is not None:
        leaked = [h for h in _content_hashes(data.test[data.image_column], "test") if h in unlabeled]
        if leaked:
            raise UserError(f"{len(leaked)} image(s) of {source} are also test images (e.g. "
                            f"{_name(images, unlabeled[leaked[0]])}); remove them: the student would train on the "
                            "test set through the teacher's answers")
    validation = set(_content_hashes(data.validation[data.image_column], "validation"))
    labelled = set(_content_hashes(data.train[data.image_column], "train"))
    kept = sorted(i for h, i in unlabeled.items() if h not in validation and h not in labelled)
    for name, hashes_of in (("validation", validation), ("labelled training", labelled)):
        dropped = sum(h in hashes_of for h in unlabeled)
        if dropped:
            logger.info("left out %d unlabeled image(s) that are also %s images", dropped, name)
    if not kept:
        raise UserError(f"every image of {source} is also a labelled training or validation image; nothing is left "
                        "to distil on")

    # Rows numbered after every labelled row: row numbers seed augmentation and key the logit cache.
    start = 1 + max(max(data.train[ROW]), max(data.validation[ROW]))
    features = Features({data.image_column: Image(decode=False), data.label_column: data.train.features[
        data.label_column], ROW: Value("int64")})
    rows = Dataset.from_dict({data.image_column: [images[i] for i in kept],
                              data.label_column: [UNLABELED] * len(kept),
                              ROW: list(range(start, start + len(kept)))}, features=features)
    train = data.train.select_columns([data.image_column, data.label_column, ROW]).cast(features)
    data.train = concatenate_datasets([train, rows])
    data.unlabeled = len(kept)
    data.skipped_images["unlabeled"] = skipped
    logger.info("%d labelled and %d unlabeled training images (%s)", len(train), len(kept), source)


def _load(directory: str | None, dataset: str | None, split: str, cache_dir: str | None) -> tuple[list, str]:
    """The source's images as stored ({"bytes", "path"} cells) and how to name the source in messages."""
    part, source = open_unlabeled(directory, dataset, split, cache_dir)
    try:
        column = pick_column(part.features, None, ("image", "img"), lambda f: isinstance(f, Image), "image")
    except UserError as exc:
        raise wrap_load_error("unlabeled data set", dataset, exc) from exc
    return part.cast_column(column, Image(decode=False))[column], source


def _content_hashes(cells, split: str) -> list[str | None]:
    """A hash of each image's decoded RGB pixels (None where it does not decode): the same picture stored in
    another file or container has the same hash. Large sets are hashed in worker processes."""
    cells = list(cells)
    if len(cells) > 20_000:
        hashed = Dataset.from_dict({"cell": cells}, features=Features({"cell": Image(decode=False)})).map(
            lambda batch: {"hash": [_hash(c) or "" for c in batch["cell"]]}, batched=True, remove_columns=["cell"],
            num_proc=min(8, os.cpu_count() or 1), desc=f"hashing the {split} images")
        return [h or None for h in hashed["hash"]]
    return [_hash(cell) for cell in cells]


def _hash(cell) -> str | None:
    try:
        pixels = decode_rgb(cell)
    except Exception:  # PIL raises many types; any of them means the file is unusable
        return None
    digest = hashlib.sha1(np.asarray(pixels.shape, dtype=np.int64).tobytes())
    digest.update(pixels.numpy().tobytes())
    return digest.hexdigest()


def _name(cells: list, index: int) -> str:
    path = cells[index].get("path") if isinstance(cells[index], dict) else None
    return path or f"row {index}"
