"""`run_distill.py`: train a smaller or faster student to mimic a fine-tuned teacher.

Fine-tuning's pipeline (same data, checks, recipes, outputs) with images without labels, a teacher loaded and
checked first and `DistillationTrainer` in place of `TransferTrainer` (run/pipeline.py, `Distill`).
`main(argv)` is what the script runs and what the tests call in-process.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from transformers import TrainerCallback

from ..run.pipeline import run


def main(argv: Sequence[str] | None = None, callbacks: Sequence[TrainerCallback] = ()) -> dict:
    return run("distill", list(sys.argv[1:] if argv is None else argv), callbacks)
