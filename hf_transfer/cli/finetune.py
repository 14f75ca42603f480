"""`run_finetune.py`: a pretrained (or fresh) backbone, a new head for the data set's labels, the Trainer; with
`--do_train false`, a trained model scored as it is. The steps are the pipeline's (run/pipeline.py).

`main(argv)` is what the script runs and what the tests call in-process.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from transformers import TrainerCallback

from ..run.pipeline import run


def main(argv: Sequence[str] | None = None, callbacks: Sequence[TrainerCallback] = ()) -> dict:
    """`callbacks`: more Trainer callbacks for the run."""
    return run("finetune", list(sys.argv[1:] if argv is None else argv), callbacks)
