"""Streaming (`--streaming`): a training split read as a stream, never whole, and resumed where it stopped.

The train split of a Hub data set or of a local folder of Parquet/Arrow shards is read with
datasets' streaming, a shard (file) at a time. Validation and test are bounded: validation is at
most --max_eval_samples images (default EVAL_BOUND; without a validation split, the first ones of
train, which training then skips), test is read whole unless --max_eval_samples bounds it; both
are written once into datasets' cache and from then on take the in-memory path (`samples.py`).

The order of the stream is the project's, not datasets' shuffle, because a resumed run must see
what the stopped one would have seen (datasets' shuffle buffer loses its content on resume):
- Every epoch the shards, in a seeded order, are dealt to the slots, one per process and
  DataLoader worker: each image of an epoch is read once, by one slot. With fewer shards than
  slots, every slot reads every shard and keeps every n-th row.
- A slot reads its rows in blocks of --shuffle_buffer and yields each block in a seeded order.
- Every sample carries its position (`_samples`). The trainer keeps the last one consumed per slot
  (`consumed`) and each checkpoint stores them (`save`): a resumed run re-reads at most one block
  per slot, skipping to it inside its shard, and goes on with the same samples in the same order.
  The images consumed are counted the same way (`train_streamed_images` in the results).
A shard that cannot be read is skipped and counted, and with --skip_corrupt_images so is an
image that cannot be decoded; the counts travel with the positions.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
from pathlib import Path

import numpy as np
import torch
from datasets import ClassLabel, Dataset, Image, IterableDataset, Value
from torch.utils.data import DataLoader, get_worker_info

from ..errors import CorruptImageError, UserError
from .batch import LABELS, PIXEL_VALUES, ROW_INDEX, SQUASH, STREAM
from .dataset import IMAGE_NAMES, LABEL_NAMES, ROW, ImageData, drop_corrupt_images, pick_column
from .decoding import decode_rgb
from .sources import built_in_streamed, local_signature, open_stream, resolve

logger = logging.getLogger(__name__)

EVAL_BOUND = 10_000  # validation images read from a stream unless --max_eval_samples says otherwise
STATE_FILE = "stream-{rank}.json"  # in each checkpoint, one per process
READ_BATCH = 64  # rows read from a shard at a time


def check_streaming(data_args, args, given: set[str]) -> None:
    """What --streaming cannot be combined with, refused in one line before anything is read."""
    strategies = {str(getattr(args.eval_strategy, "value", args.eval_strategy)),
                  str(getattr(args.save_strategy, "value", args.save_strategy))}
    refusals = [
        (args.max_steps <= 0, "--streaming needs --max_steps: a stream has no length to count epochs in"),
        ("epoch" in strategies, "--streaming has no epochs to evaluate or save at: pass --eval_strategy steps and "
                                "--save_strategy steps (or leave both out: every tenth of --max_steps)"),
        (data_args.train_dir is not None, "--streaming reads --dataset_name (a Hub id or a local folder of "
                                          "Parquet/Arrow shards or images), not --train_dir"),
        (bool(built_in_streamed(data_args.dataset_name)), built_in_streamed(data_args.dataset_name)),
        (args.class_weights == "auto", "--class_weights auto counts the labels of the whole train split, which a "
                                       "stream never holds: give the weights, one per class"),
        (args.lr_step_size is not None, "--lr_step_size counts epochs, which a stream does not have: use "
                                        "--lr_scheduler_type (cosine by default)"),
        (getattr(data_args, "unlabeled_dir", None) or getattr(data_args, "unlabeled_dataset", None),
         "--unlabeled_dir/--unlabeled_dataset are joined to an in-memory train split, not to a stream"),
        (getattr(args, "cache_teacher_logits", False), "--cache_teacher_logits keeps the teacher's logits of every "
                                                       "training image, which a stream never holds: leave it out"),
        ("max_train_samples" in given, "--max_train_samples picks images from the whole train split: with "
                                       "--streaming, --max_steps says how much is read"),
        ("validation_split" in given, "--validation_split holds out a fraction of the whole train split, which a "
                                      "stream never holds: with --streaming, validation is the data set's validation "
                                      "split, or else the first --max_eval_samples (default 10,000) images of train"),
        (data_args.multi_label, "--streaming reads one class label per image; several labels per image "
                                "(--multi_label) need the data set in memory"),
    ]
    for refused, message in refusals:
        if refused:
            raise UserError(message)


def load_streaming_data(dataset_name: str, config_name: str | None, image_column: str | None,
                        label_column: str | None, max_eval_samples: int | None, seed: int, shuffle_buffer: int,
                        skip_corrupt_images: bool, cache_dir: str | None = None) -> ImageData:
    """The train split as a `StreamingSplit`, validation and test read into the cache (see the module docstring)."""
    splits = open_stream(resolve(dataset_name, config_name), cache_dir)
    features = splits["train"].features
    if features is None:
        raise UserError(f"--streaming needs the data set's columns before its first image, and '{dataset_name}' "
                        "declares none; run without --streaming")
    image_column = pick_column(features, image_column, IMAGE_NAMES, lambda f: isinstance(f, Image), "image")
    label_column = pick_column(features, label_column, LABEL_NAMES, lambda f: isinstance(f, ClassLabel), "label")
    if not isinstance(features[image_column], Image):
        raise UserError(f"column '{image_column}' holds {features[image_column]}, not images; pass --image_column")
    if not isinstance(features[label_column], ClassLabel):
        raise UserError(f"--streaming needs the label names before the first image, but column '{label_column}' holds "
                        f"{features[label_column]}, not a ClassLabel; store it as a ClassLabel, or run without "
                        "--streaming (the labels are then read from the whole data set)")
    label_names = list(features[label_column].names)
    if len(label_names) < 2:
        raise UserError(f"the data set has {len(label_names)} class(es) in column '{label_column}'; need at least 2")
    splits = {key: ds.select_columns([image_column, label_column]).cast_column(image_column, Image(decode=False))
              for key, ds in splits.items()}
    key = f"{dataset_name}|{config_name}|{local_signature(dataset_name)}"
    held_out: dict[int, int] = {}
    if "validation" in splits:
        validation = _read_into_cache(splits["validation"], max_eval_samples or EVAL_BOUND, cache_dir,
                                      f"{key}|validation")
    else:  # the first images of train, in file order: training skips them (`held_out`)
        bound = max_eval_samples or EVAL_BOUND
        validation = _read_into_cache(splits["train"], bound, cache_dir, f"{key}|held-out", held_out)
        if len(validation) < bound:
            raise UserError(f"the train split has {len(validation)} images, no more than the {bound} held out for "
                            "validation: none are left to train on; pass a smaller --max_eval_samples, or leave "
                            "--streaming out for a data set this small")
    test = _read_into_cache(splits["test"], max_eval_samples, cache_dir, f"{key}|test") if "test" in splits else None
    for name, part, bound in (("validation", validation, max_eval_samples or EVAL_BOUND), ("test", test, max_eval_samples)):
        if part is not None and len(part) == bound:
            _warn_missing_classes(part, label_column, label_names, name,
                                  "train" if held_out and name == "validation" else name)
    skipped = {}
    if skip_corrupt_images:  # the bounded splits as in memory; train's images are skipped as they come
        kept, skipped = drop_corrupt_images({"validation": validation, "test": test} if test is not None else
                                            {"validation": validation}, image_column)
        validation, test = kept["validation"], kept.get("test")
    train = StreamingSplit(splits["train"], image_column, label_column, len(label_names), seed, shuffle_buffer,
                           held_out, skip_corrupt_images)
    logger.info("streaming the train split of %s: %d shard(s), shuffled in blocks of %d; validation: %d images%s",
                dataset_name, train.num_shards, shuffle_buffer, len(validation),
                " held out from the start of train" if held_out else "")
    return ImageData(train=train, validation=validation, test=test, label_names=label_names,
                     image_column=image_column, label_column=label_column, name=dataset_name,
                     validation_from_train=bool(held_out), skipped_images=skipped)


def _warn_missing_classes(part: Dataset, label_column: str, names: list[str], split: str, source: str) -> None:
    """A bounded split is the first images of `source` in file order, which in a class-sorted data set hold a few
    classes only: say so (reading all of a stream to draw a stratified subset would defeat streaming)."""
    present = set(np.unique(np.asarray(part[label_column])).tolist())
    if len(present) < len(names):
        missing = [n for i, n in enumerate(names) if i not in present]
        logger.warning("the %s images (the first %d of the %s split, in file order) hold %d of the %d classes "
                       "(none of %s%s): its metrics leave the others out; pass a larger --max_eval_samples, or "
                       "shuffle the data set's rows once before streaming it", split, len(part), source, len(present),
                       len(names), ", ".join(missing[:5]), ", ..." if len(missing) > 5 else "")


def _shard_rows(source: IterableDataset, shard: int, first_row: int = 0, skipped: list[int] | None = None):
    """(row, example) of one shard from `first_row` on, READ_BATCH rows at a time, and not through datasets' own
    split among DataLoader workers (the slots decide who reads what). A shard that cannot be read (on) is skipped,
    logged and counted in skipped[0]."""
    part = source.shard(source.num_shards, shard)
    batches = (part.skip(first_row) if first_row else part).iter(batch_size=READ_BATCH)
    row = first_row
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except Exception as exc:  # pyarrow, fsspec, the network: whatever the reader raises, the shard is unusable
            if skipped is not None:
                skipped[0] += 1
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            logger.warning("skipped shard %d of %d from row %d on: %s", shard, source.num_shards, row, reason)
            return
        for values in zip(*batch.values()):
            yield row, dict(zip(batch, values))
            row += 1


def _rows_in_file_order(source: IterableDataset):
    """(shard, row, example) of the whole split, shard after shard."""
    for shard in range(source.num_shards):
        for row, example in _shard_rows(source, shard):
            yield shard, row, example


def _with_row_numbers(features):
    features = features.copy()
    features[ROW] = Value("int64")
    return features


def _read_into_cache(source: IterableDataset, limit: int | None, cache_dir: str | None, key: str,
                     held_out: dict[int, int] | None = None) -> Dataset:
    """The first `limit` rows (all: None) as a Dataset in datasets' cache, with row numbers; `held_out` gets, per
    shard, how many of its first rows were taken."""
    taken = {}

    def rows():
        for i, (shard, row, example) in enumerate(itertools.islice(_rows_in_file_order(source), limit)):
            taken[shard] = row + 1
            yield {**example, ROW: i}

    features = _with_row_numbers(source.features)  # the columns read (--image_column, --label_column) and labels
    fingerprint = hashlib.sha256(f"{key}|{limit}|{features}".encode()).hexdigest()[:16]
    dataset = Dataset.from_generator(rows, features=features, cache_dir=cache_dir, fingerprint=fingerprint)
    if held_out is not None:
        if not taken:  # read from the cache: which rows they were (nothing is decoded)
            for shard, row, _ in itertools.islice(_rows_in_file_order(source), len(dataset)):
                taken[shard] = row + 1
        held_out.update(taken)
    return dataset


class StreamingSplit(torch.utils.data.IterableDataset):
    """The training stream (see the module docstring). The DataLoader iterates it (`loader`); the trainer tells it
    what it consumed (`consumed`) and saves and restores its position with each checkpoint (`save`, `resume`)."""

    def __init__(self, source: IterableDataset, image_column: str, label_column: str, num_labels: int, seed: int,
                 block: int, held_out: dict[int, int], skip_corrupt_images: bool):
        self.source, self.image_column, self.label_column = source, image_column, label_column
        self.num_shards, self.num_labels, self.seed, self.block = source.num_shards, num_labels, seed, block
        self.held_out, self.skip_corrupt_images = held_out, skip_corrupt_images
        self.transform = None  # the train split's SampleTransform (samples.attach_transforms)
        self.rank, self.world, self.workers = 0, 1, 1
        self.start: dict[int, list[int]] = {}  # slot -> the position to go on after (a resumed run)
        self.last: dict[int, list[int]] = {}  # slot -> the last position the trainer consumed
        self.batches = 0  # batches this process consumed: which worker's turn the next one is
        self.images: int | None = 0  # images this process consumed (None: from a checkpoint that kept batches only)

    def set_transform(self, transform, columns=None) -> None:
        self.transform = transform

    def loader(self, batch_size: int, collate_fn, args) -> DataLoader:
        """This process's DataLoader. Not accelerate's: it would read the whole stream in every process and keep a
        slice of each batch, where here each process reads only its own shards."""
        self.rank, self.world = args.process_index, args.world_size
        self.workers = max(1, args.dataloader_num_workers)
        workers = args.dataloader_num_workers
        if self.images is None:  # resumed from a checkpoint that counted batches, all whole (the stream never ends)
            self.images = self.batches * batch_size
        # One iterator for the whole run (the stream never ends): persistent workers would add nothing but a
        # slower shutdown.
        return DataLoader(self, batch_size=batch_size, collate_fn=collate_fn, num_workers=workers,
                          pin_memory=args.dataloader_pin_memory,
                          prefetch_factor=args.dataloader_prefetch_factor if workers else None)

    # ---------------------------------------------------------------- reading

    def __iter__(self):
        info = get_worker_info()
        worker = info.id if info is not None else 0
        # The DataLoader takes a batch from each worker in turn, starting with worker 0: after a resume, worker 0
        # plays the slot whose turn it was.
        slot = self.rank * self.workers + (worker + self.batches) % self.workers
        return self._samples(slot, self.world * self.workers, self.start.get(slot))

    def _samples(self, slot: int, slots: int, start: list[int] | None):
        _, epoch, shard_pos, block_row, offset, skipped_shards, skipped_images, _ = start or (slot, 0, 0, 0, -1, 0, 0, 0)
        skipped = [skipped_shards, skipped_images]
        while True:
            whole_epoch = (shard_pos, block_row, offset) == (0, 0, -1)
            shards, step, phase = self._plan(slot, slots, epoch)
            rows = self._rows(shards, step, phase, shard_pos, block_row, skipped)
            delivered = False
            while True:
                before = skipped[0]  # shards skipped before the block: a resumed run re-reads (and re-counts) it
                block = list(itertools.islice(rows, self.block))
                if not block:
                    break
                start_pos, start_row = block[0][0], block[0][1]
                order = np.random.default_rng([self.seed, epoch, slot, start_pos, start_row]).permutation(len(block))
                for place in range(offset + 1, len(block)):
                    pos, row, example = block[order[place]]
                    sample = self._sample(example, shards[pos], row, epoch, skipped)
                    if sample is not None:
                        # Its position: slot, epoch, the block's first row (index in the slot's shards, row), its
                        # place in the block; shards skipped before the block, images and shards skipped so far.
                        sample[STREAM] = [slot, epoch, start_pos, start_row, place, before, skipped[1], skipped[0]]
                        delivered = True
                        yield sample
                offset = -1
            if not delivered and whole_epoch:
                raise UserError(f"slot {slot} of the stream got no image in a whole epoch: the train split has fewer "
                                f"images than processes x DataLoader workers ({slots}), or none that can be read")
            epoch, shard_pos, block_row = epoch + 1, 0, 0

    def _plan(self, slot: int, slots: int, epoch: int) -> tuple[list[int], int, int]:
        """The slot's shards this epoch, and which of their rows it keeps (row % step == phase)."""
        order = np.random.default_rng([self.seed, epoch]).permutation(self.num_shards).tolist()
        if self.num_shards >= slots:
            return order[slot::slots], 1, 0
        return order, slots, slot  # fewer shards than slots: every slot reads them all and keeps its rows

    def _rows(self, shards: list[int], step: int, phase: int, shard_pos: int, first_row: int, skipped: list[int]):
        """(index in `shards`, row, example) of the slot's rows from (shard_pos, first_row) on."""
        for pos in range(shard_pos, len(shards)):
            first = first_row if pos == shard_pos else 0
            for row, example in _shard_rows(self.source, shards[pos], first, skipped):
                if row % step == phase and row >= self.held_out.get(shards[pos], 0):
                    yield pos, row, example

    def _sample(self, example: dict, shard: int, row: int, epoch: int, skipped: list[int]) -> dict | None:
        label = example[self.label_column]
        if label is None or not 0 <= label < self.num_labels:
            raise CorruptImageError(f"label {label} in shard {shard} of the train stream, row {row}, is outside "
                                    f"0..{self.num_labels - 1}; every row needs one of the {self.num_labels} classes")
        row_id = shard << 32 | row  # unique in the split: the augmentation's seed (augmentation.sample_seed)
        try:
            image, _ = self.transform.image(example[self.image_column], row_id, epoch)
        except CorruptImageError as exc:
            self._unreadable(exc, shard, row)
            skipped[1] += 1
            return None
        sample = {PIXEL_VALUES: image, LABELS: label, ROW_INDEX: row_id}
        if self.transform.squash:
            sample[SQUASH] = True
        return sample

    def _unreadable(self, exc: Exception, shard: int, row: int) -> None:
        """An image that cannot be decoded: the run stops naming it, unless --skip_corrupt_images."""
        if not self.skip_corrupt_images:
            raise CorruptImageError(f"cannot decode the image in shard {shard} of the train stream, row {row}: "
                                    f"{str(exc).split(': ', 1)[-1]} (--skip_corrupt_images skips such images)") from exc

    # ---------------------------------------------------------------- position

    def consumed(self, positions: torch.Tensor) -> None:
        """The trainer took a batch (`positions`: the batch's "stream", one row per sample)."""
        self.last[int(positions[-1, 0])] = positions[-1].tolist()
        self.batches += 1
        self.images += len(positions)

    def skipped(self) -> tuple[int, int]:
        """Shards and images this process's slots skipped so far (as far as the trainer consumed)."""
        return (sum(p[7] for p in self.last.values()), sum(p[6] for p in self.last.values()))

    def save(self, folder: str | Path) -> None:
        state = {"processes": self.world, "workers": self.workers, "batches": self.batches, "images": self.images,
                 "positions": {str(slot): p for slot, p in self.last.items()}}
        (Path(folder) / STATE_FILE.format(rank=self.rank)).write_text(json.dumps(state))

    def resume(self, folder: str | Path, rank: int, processes: int, workers: int) -> None:
        """Go on after the positions `folder` (a checkpoint) holds for process `rank`."""
        path = Path(folder) / STATE_FILE.format(rank=rank)
        if not path.is_file():
            raise UserError(f"checkpoint {folder} holds no stream position for process {rank} ({path.name}); resume "
                            "it with the processes it was written with, or start afresh with --overwrite_output_dir")
        state = json.loads(path.read_text())
        if (state["processes"], state["workers"]) != (processes, max(1, workers)):
            raise UserError(f"checkpoint {folder} was written by {state['processes']} process(es) with "
                            f"{state['workers']} stream reader(s) each (DataLoader workers), this run has {processes} "
                            f"with {max(1, workers)}; resume with the same --dataloader_num_workers and processes")
        self.start = {int(slot): p for slot, p in state["positions"].items()}
        self.last = dict(self.start)
        self.batches, self.images = state["batches"], state.get("images")

    def head(self, n: int) -> Dataset:
        """The first `n` training images in file order (held-out ones excluded), as a Dataset with this split's
        transform: what precise BatchNorm statistics are computed from."""
        def readable():
            for shard in range(self.num_shards):  # each from its first row not held out: those are not read again
                for row, example in _shard_rows(self.source, shard, self.held_out.get(shard, 0)):
                    try:
                        decode_rgb(example[self.image_column])
                    except Exception as exc:  # PIL raises many types; any of them means the file is unusable
                        self._unreadable(exc, shard, row)
                        continue
                    yield {**example, ROW: shard << 32 | row}

        taken = list(itertools.islice(readable(), n))
        dataset = Dataset.from_list(taken, features=_with_row_numbers(self.source.features))
        dataset.set_transform(self.transform, columns=[self.image_column, self.label_column, ROW])
        return dataset
