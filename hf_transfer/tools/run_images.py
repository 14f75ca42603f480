"""A finished run's images found again, for the report's thumbnails.

Every image a run's files name is `{"split", "row", "file"}` (the `ROW` column of data/dataset.py). The picture
comes from `file` where the images are files, else from the run's own data, re-opened as the run recorded it
(run_args.json's `resolved` data flags and seed: the same splits, the same row numbers), the row taken by its
number. The data is opened once, on the first image that needs it; when it cannot be (a folder moved, a stream),
`problem` says why in one line and the images show without a picture.
"""

from __future__ import annotations

import base64
import io
from dataclasses import replace
from pathlib import Path

import PIL.Image

from ..errors import UserError
from ..run import record as run_args

THUMBNAIL = 128  # largest side of a thumbnail, in pixels; smaller images are kept as they are (CSS scales them)


class RunImages:
    """The pictures of one run's images, by split and row."""

    def __init__(self, run: Path):
        self.run = Path(run)
        self.problem: str | None = None  # why the run's data could not be re-opened, once tried
        self._data = None
        self._positions: dict[str, dict[int, int]] = {}

    def picture(self, split: str, row: int, file: str | None = None) -> PIL.Image.Image | None:
        """The image, RGB; None when neither its file nor the run's data has it (`problem` says why)."""
        from ..data.decoding import decode_rgb

        if file and Path(file).is_file():
            return PIL.Image.fromarray(decode_rgb({"path": file, "bytes": None}).permute(1, 2, 0).numpy())
        cell = self._cell(split, int(row))
        if cell is None:
            return None
        return PIL.Image.fromarray(decode_rgb(cell).permute(1, 2, 0).numpy())

    def _cell(self, split: str, row: int):
        data = self._open()
        if data is None:
            return None
        # A validation split carved out of train keeps train's row numbers: a row is looked for in both.
        for name in (split, *(("train", "validation") if split in ("train", "validation") else ())):
            rows = self._rows(name)
            if rows is not None and row in rows:
                stored = getattr(data, name).with_format(None)
                return stored[rows[row]][data.image_column]
        return None

    def _rows(self, split: str) -> dict[int, int] | None:
        from ..data.dataset import ROW

        if split not in self._positions:
            dataset = getattr(self._data, split, None) if split in ("train", "validation", "test") else None
            self._positions[split] = None if dataset is None else {int(r): i for i, r in enumerate(dataset[ROW])}
        return self._positions[split]

    def _open(self):
        if self._data is not None or self.problem is not None:
            return self._data
        saved = run_args.read(self.run)
        if saved is None:
            self.problem = f"{self.run} has no run_args.json to re-open its data from"
            return None
        from ..config.flags import data_arguments
        from ..run.assembly import load_data

        try:
            data_args = data_arguments(saved, instead="keep the run's data where it was to see its images")
            if data_args.streaming:
                self.problem = "the run streamed its data: its rows cannot be re-read by number"
                return None
            # Without the run's limits: row numbers are given before --max_train_samples / --max_eval_samples pick
            # their rows (and after validation is carved out of train), so every row the run named is found.
            data_args = replace(data_args, max_train_samples=None, max_eval_samples=None)
            self._data = load_data(data_args, saved["shaping"].get("training.seed", 42))
        except (UserError, OSError, ValueError) as exc:
            self.problem = f"the run's data could not be re-opened: {str(exc).splitlines()[0]}"
        return self._data


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def thumbnail_uri(image: PIL.Image.Image, size: int = THUMBNAIL) -> str:
    """A PNG data URI of `image`, shrunk to `size` on its longer side when larger (a small image is kept whole)."""
    if max(image.size) > size:
        image = image.copy()
        image.thumbnail((size, size))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return data_uri(buffer.getvalue())
