"""`python -m hf_transfer check-data <the run's data flags> --output_dir DIR`: the data check a run makes at its
start (data/check.py), on its own: the data loaded as the run loads it (the same flags, parsed by the run's parser,
the same rows), every split scanned, data_check.json and data_check.html written to DIR."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from ..config.flags import ArgumentParser, DataArguments
from ..data.check import check_image_data, local_folders, summary, write_report
from ..errors import UserError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DataCheckArguments:
    output_dir: str = field(metadata={"help": "Folder for data_check.json and data_check.html."})
    image_size: int | None = field(
        default=None,
        metadata={"help": "The model's input size in pixels: smaller images are reported (default: not checked)."},
    )
    seed: int = field(
        default=42,
        metadata={"help": "The run's --seed: it draws the validation images out of train where the data set has no "
                          "validation split, so the rows named are the run's."},
    )

    def __post_init__(self):
        if self.image_size is not None and self.image_size <= 0:
            raise ValueError(f"--image_size must be a positive number of pixels, got {self.image_size}")


def parse(argv: Sequence[str]) -> tuple[DataArguments, DataCheckArguments]:
    """The data flags as a run parses them, and the check's own."""
    parser = ArgumentParser((DataArguments, DataCheckArguments))
    parser.prog = "python -m hf_transfer check-data"
    try:
        data, own, unknown = parser.parse_args_into_dataclasses(args=list(argv), return_remaining_strings=True)
    except ValueError as exc:  # the __post_init__ checks
        raise UserError(str(exc).strip().splitlines()[0]) from exc
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if os.path.exists(own.output_dir) and not os.path.isdir(own.output_dir):  # before the data is read
        raise UserError(f"--output_dir '{own.output_dir}' exists and is not a directory")
    if data.streaming:
        raise UserError("check-data reads the data set whole: leave --streaming out (a streamed run is not checked at its start; "
                        "this command is how such a data set is checked)")
    if data.train_dir and not any(a.split("=")[0] in ("--dataset_name", "--dataset-name") for a in argv):
        data = replace(data, dataset_name=None)  # as a run: the image folders are the data
    return data, own


def check_data(argv: Sequence[str]) -> dict:
    """Load the data as a run does, check it, write the report; the report."""
    from ..run.assembly import load_data

    flags, own = parse(argv)
    data = load_data(flags, own.seed)
    report = check_image_data(data, own.image_size, local_folders(flags))
    json_path, page = write_report(report, own.output_dir, data)
    for _, line in summary(report):
        print(line)
    print(f"written to {json_path} and {page}")
    return report
