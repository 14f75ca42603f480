"""The output directory: what it holds for a new command (nothing, a partial run to resume, a finished run), and
the run's arguments written into it.

Nothing is created or overwritten by accident: a finished run of the same settings is reported and
left as it is, a partial one resumes from its newest complete checkpoint, other settings are refused
with what differs (run_args.py compares them), and a directory holding anything else needs
--overwrite_output_dir.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from . import run_args
from .checkpoints import is_complete, last_complete_checkpoint
from .errors import UserError
from .model_card import CardInfo

logger = logging.getLogger(__name__)


@dataclass
class OutputDir:
    """What the output directory holds for this run: nothing yet, a partial run to resume, or a finished one."""

    resume_from: str | None = None
    finished: dict | None = None  # the finished run's results, left untouched


def prepare_output_dir(args, record: dict, fitted: set[str] = frozenset()) -> OutputDir:
    """Check the output directory before any download (creating nothing); say what it holds for this run.

    - `--resume_from_checkpoint PATH` resumes from PATH, if it is a complete checkpoint.
    - A finished run of the same settings (`record`, whose `fitted` keys the data will set;
      run_args.py) is left as it is: the command reports it and returns its results. A partial one
      resumes from its newest complete checkpoint (checkpoints.py). Either, with other settings, is
      refused with what differs.
    - A directory holding anything else is refused unless `--overwrite_output_dir`, so no
      earlier result is lost by accident.
    """
    out = Path(args.output_dir)
    if args.resume_from_checkpoint:
        checkpoint = Path(args.resume_from_checkpoint)
        if not checkpoint.is_dir():
            raise UserError(f"--resume_from_checkpoint '{checkpoint}' is not a directory")
        if not is_complete(checkpoint):
            raise UserError(f"--resume_from_checkpoint '{checkpoint}' is not a complete checkpoint (cut short while it "
                            "was written, or not a checkpoint); pass an earlier one, or leave the flag out to resume "
                            "from the newest complete checkpoint of --output_dir")
        return OutputDir(resume_from=str(checkpoint))
    if out.exists() and not out.is_dir():
        raise UserError(f"--output_dir '{out}' exists and is not a directory")
    _check_writable(out)
    state = OutputDir()
    # The main process looks first (and moves incomplete checkpoints aside); the others then agree with it.
    with args.main_process_first(local=False, desc="checking the output directory"):
        # Files a run writes before its first checkpoint (the teacher-logit cache, its arguments) are its own.
        if out.is_dir() and any(not p.name.startswith(("_teacher_logits-", run_args.FILE)) for p in out.iterdir()):
            if args.overwrite_output_dir:
                if args.process_index == 0:
                    for old in out.glob("*checkpoint-*"):
                        shutil.rmtree(old, ignore_errors=True)
                    if not getattr(args, "cache_teacher_logits", False):  # a cached run keeps only its own (distill)
                        for old in out.glob("_teacher_logits-*"):
                            old.unlink()
                return state
            finished = (out / "all_results.json").is_file() and (not args.do_train or (out / "model.safetensors").is_file())
            saved = run_args.read(out)
            changed = run_args.differences(saved, record, fitted) if saved is not None else []
            if changed:
                raise UserError(f"--output_dir '{out}' holds a {'finished' if finished else 'partial'} run with "
                                f"other settings ({'; '.join(changed)}); pass --overwrite_output_dir to start "
                                "afresh, or choose another --output_dir")
            if finished:
                return OutputDir(finished=json.loads((out / "all_results.json").read_text()))
            state.resume_from = last_complete_checkpoint(out)
            if state.resume_from is None:
                raise UserError(f"--output_dir '{out}' already holds files but no checkpoint to resume from; "
                                "pass --overwrite_output_dir or choose another --output_dir")
    if state.resume_from is not None:
        logger.warning("resuming from checkpoint %s", state.resume_from)
    return state


def report_finished(out: str, results: dict) -> dict:
    """The rerun of a finished run: nothing is trained or written; say so and hand back its results."""
    accuracy = results.get("test_accuracy", results.get("eval_accuracy"))
    logger.warning("the run in %s is complete (%s %.4f); nothing was changed. To train again pass "
                   "--overwrite_output_dir or choose another --output_dir", out,
                   "test accuracy" if "test_accuracy" in results else "validation accuracy", accuracy or float("nan"))
    return results


def _check_writable(out: Path) -> None:
    """Whether the directory could be written, without creating it (a refused start leaves nothing behind)."""
    existing = out
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"--output_dir '{out}' cannot be written (no write permission in '{existing}')")


def save_run_args(args, command: str, record: dict, fitted: set[str], argv: Sequence[str],
                  card: CardInfo | None = None) -> None:
    """run_args.json in the output directory (the main process): what the run uses (`record`, taken after the
    data-fitted defaults, whose keys are `fitted`), which the next command in the directory is compared with,
    and the model card's facts (a later `python -m hf_transfer push` renders the card for its repo)."""
    if args.process_index == 0:
        shown = list(argv)
        for i, value in enumerate(shown[:-1]):
            if value == "--hub_token":
                shown[i + 1] = "<hub_token>"
        run_args.write(args.output_dir, command, record, fitted, shown, asdict(card) if card else None)
