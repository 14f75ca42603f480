"""The output directory: what it holds for a new command (nothing, a partial run to resume, a finished run), and
the run's arguments written into it.

Nothing is created or overwritten by accident: a finished run of the same settings is reported and
left as it is, a partial one resumes from its newest complete checkpoint, other settings are refused
with what differs (run/record.py compares them), and a directory holding anything else needs
--overwrite_output_dir. A checkpoint named with --resume_from_checkpoint is compared in the same way,
with the record every checkpoint carries (`RecordInCheckpoints`).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from transformers import TrainerCallback

from ..errors import UserError
from . import record as run_args
from .card import CardInfo
from .checkpoints import is_complete, last_complete_checkpoint, move_aside, step_of

logger = logging.getLogger(__name__)


@dataclass
class OutputDir:
    """What the output directory holds for this run: nothing yet, a partial run to resume, or a finished one."""

    resume_from: str | None = None
    finished: dict | None = None  # the finished run's results, left untouched


def prepare_output_dir(args, record: dict, fitted: set[str] = frozenset()) -> OutputDir:
    """Check the output directory before any download (creating nothing); say what it holds for this run.

    - A finished run of the same settings (`record`, whose `fitted` keys the data will set;
      run/record.py) is left as it is: the command reports it and returns its results. A partial one
      resumes from its newest complete checkpoint (checkpoints.py). Either, with other settings, is
      refused with what differs.
    - `--resume_from_checkpoint PATH` resumes from PATH, a complete checkpoint written with the same
      settings (`explicit_checkpoint`), into an empty directory, the partial run it belongs to, or
      a partial run of the same settings; a finished run's results are not replaced without
      `--overwrite_output_dir`.
    - A directory holding anything else is refused unless `--overwrite_output_dir`, so no
      earlier result is lost by accident.
    """
    out = Path(args.output_dir)
    _check_not_a_source(out, record)
    checkpoint = explicit_checkpoint(args.resume_from_checkpoint, record, fitted) if args.resume_from_checkpoint else None
    if out.exists() and not out.is_dir():
        raise UserError(f"--output_dir '{out}' exists and is not a directory")
    _check_writable(out)
    state = OutputDir(resume_from=str(checkpoint) if checkpoint else None)
    # The main process looks first (and moves incomplete checkpoints aside); the others then agree with it.
    with args.main_process_first(local=False, desc="checking the output directory"):
        # Files a run writes before its first checkpoint (the teacher-logit cache, its arguments, the data check)
        # are its own.
        if out.is_dir() and any(not p.name.startswith(("_teacher_logits-", run_args.FILE, "data_check.")) for p in out.iterdir()):
            if args.overwrite_output_dir:
                if args.process_index == 0:
                    _clear_earlier_run(out, keep=checkpoint)
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
            if checkpoint is not None:
                _check_resumable_into(out, checkpoint, finished, args.process_index == 0)
                return state
            if finished:
                return OutputDir(finished=json.loads((out / "all_results.json").read_text()))
            state.resume_from = last_complete_checkpoint(out)
            if state.resume_from is None:
                raise UserError(f"--output_dir '{out}' already holds files but no checkpoint to resume from; "
                                "pass --overwrite_output_dir or choose another --output_dir")
    if state.resume_from is not None:
        logger.warning("resuming from checkpoint %s", state.resume_from)
    return state


def _check_not_a_source(out: Path, record: dict) -> None:
    """The output folder must not be, or hold, the model or the teacher the run loads: a new run there would be
    compared with (or, with --overwrite_output_dir, delete) the very weights it starts from."""
    if not out.exists():
        return
    for key, flag in (("model.model_name_or_path", "--model_name_or_path"),
                      ("training.teacher_model_name_or_path", "--teacher_model_name_or_path")):
        source = record.get(key)
        if isinstance(source, str) and source and Path(source).exists():
            here, there = out.resolve(), Path(source).resolve()
            if there == here or here in there.parents:
                raise UserError(f"--output_dir '{out}' holds the model the run loads ({flag} {source}): writing "
                                "there would replace it; choose another --output_dir (the default names one)")


def explicit_checkpoint(path: str, record: dict, fitted: set[str] = frozenset()) -> Path:
    """`--resume_from_checkpoint PATH`: a complete checkpoint, written by a run of the same settings as this command,
    compared as an automatic resume compares them: with the checkpoint's own record (`RecordInCheckpoints`), else
    its run folder's (a checkpoint saved before checkpoints held one)."""
    checkpoint = Path(path)
    if not checkpoint.is_dir():
        raise UserError(f"--resume_from_checkpoint '{checkpoint}' is not a directory")
    if not is_complete(checkpoint):
        raise UserError(f"--resume_from_checkpoint '{checkpoint}' is not a complete checkpoint (cut short while it "
                        "was written, or not a checkpoint); pass an earlier one, or leave the flag out to resume "
                        "from the newest complete checkpoint of --output_dir")
    saved = run_args.read(checkpoint) or run_args.read(checkpoint.parent)
    if saved is None:
        logger.warning("--resume_from_checkpoint %s: no %s in it or beside it (not written by this project, or "
                       "taken from the Hub, where the record does not go): its settings cannot be compared with this "
                       "command's", checkpoint, run_args.FILE)
        return checkpoint
    changed = run_args.differences(saved, record, fitted)
    if changed:
        raise UserError(f"--resume_from_checkpoint '{checkpoint}' was written by a run with other settings "
                        f"({'; '.join(changed)}): resume it with that run's settings, or train a new run from its "
                        f"weights with --model_name_or_path {checkpoint}")
    return checkpoint


def _check_resumable_into(out: Path, checkpoint: Path, finished: bool, main: bool) -> None:
    """An explicit checkpoint goes on in `out`, which holds a run of the same settings: not over a finished run's
    results, and not into a directory that holds files but no run. Going on from one of the run's own checkpoints,
    its newer ones are moved aside (`superseded-checkpoint-N`): they are not this continuation's, and a resume
    after a kill must not take them for it."""
    if finished:
        raise UserError(f"--output_dir '{out}' holds a finished run: going on from --resume_from_checkpoint "
                        f"'{checkpoint}' there would replace its results; choose another --output_dir for the "
                        "continued run, or pass --overwrite_output_dir to replace them")
    own = _checkpoints(out)
    if not own and run_args.read(out) is None:
        raise UserError(f"--output_dir '{out}' already holds files but no run; pass --overwrite_output_dir or "
                        "choose another --output_dir")
    if main and checkpoint.resolve().parent == out.resolve():
        for step, path in own:
            if step > _global_step(checkpoint):
                aside = move_aside(path, "superseded")
                logger.warning("going on from %s: the newer %s is moved to %s", checkpoint.name, path.name, aside.name)


# What a run (and an export of it) leaves besides its checkpoints and weights: its results, test report, card and
# state, its calibration and data check, and the label errors found for its model (`label-errors`). An earlier run's
# would be read as this run's (by `report`, a push) until this run writes its own, which it may never do
# (--data_check false, a streamed split, label-errors not run again).
EARLIER_RESULTS = ("*_results.json", "test_*", "trainer_state.json", "README.md", "onnx", "calibration.json",
                   "data_check.*", "label_errors.json", "label-errors")


def _clear_earlier_run(out: Path, keep: Path | None) -> None:
    """--overwrite_output_dir: the earlier run's checkpoints (but the one this run resumes from, and those before
    it in the same folder, which its state names as the best so far), what marks it finished (all_results.json,
    the model's weights) and its results (`EARLIER_RESULTS`), so that this run, cut short anywhere before its end,
    is never taken for it, and none of its figures for this run's. Other files are left alone."""
    last = _global_step(keep) if keep is not None and keep.resolve().parent == out.resolve() else None
    for old in out.glob("*checkpoint-*"):
        step = step_of(old)
        kept = last is not None and (old.resolve() == keep.resolve() or (step is not None and step <= last))
        if not kept:
            shutil.rmtree(old, ignore_errors=True)
    for done in ["all_results.json", "model.safetensors", "model.safetensors.index.json", *out.glob("model-*.safetensors")]:
        (out / done).unlink(missing_ok=True)
    for old in (path for pattern in EARLIER_RESULTS for path in out.glob(pattern)):
        shutil.rmtree(old) if old.is_dir() else old.unlink(missing_ok=True)


def _global_step(checkpoint: Path) -> int:
    return json.loads((checkpoint / "trainer_state.json").read_text())["global_step"]


def _checkpoints(out: Path) -> list[tuple[int, Path]]:
    return sorted((step_of(p), p) for p in out.glob("checkpoint-*") if p.is_dir() and step_of(p) is not None)


class RecordInCheckpoints(TrainerCallback):
    """Every checkpoint holds a copy of the run's record (run_args.json), so that one taken to another folder still
    says which settings wrote it (`explicit_checkpoint`). Copied whole or not at all: a kill mid-copy leaves no
    half record."""

    def on_save(self, args, state, control, **kwargs):
        record = Path(args.output_dir) / run_args.FILE
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if args.should_save and record.is_file() and folder.is_dir():
            partial = folder / f"{run_args.FILE}.partial"
            shutil.copyfile(record, partial)
            os.replace(partial, folder / run_args.FILE)


class FindBestCheckpoint(TrainerCallback):
    """A resumed state names its best checkpoint by the path the run had then; where that is no longer valid (a
    relative --output_dir resumed from another working folder, or spelt otherwise), the Trainer forgets it and the
    run would end with its last weights. The best checkpoint is found again by its step: in the output directory,
    else beside the checkpoint named with --resume_from_checkpoint (a run continued in another folder)."""

    def on_train_begin(self, args, state, control, **kwargs):
        if state.best_model_checkpoint is not None or not state.best_global_step:
            return
        folders = [Path(args.output_dir)]
        if args.resume_from_checkpoint:
            folders.append(Path(args.resume_from_checkpoint).parent)
        for folder in folders:
            best = folder / f"checkpoint-{state.best_global_step}"
            if best.is_dir() and is_complete(best):
                state.best_model_checkpoint = str(best)
                return


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


def save_run_args(config, card: CardInfo | None = None) -> None:
    """run_args.json in the output directory (the main process): what the run uses (`config`, a RunConfig with the
    data-fitted values), which the next command in the directory is compared with, what its flags named (read back by
    the tools), and the model card's facts (a later `python -m hf_transfer push` renders the card for its repo)."""
    training = config.training
    if training.process_index == 0:
        shown = list(config.argv)
        for i, value in enumerate(shown[:-1]):
            if value == "--hub_token":
                shown[i + 1] = "<hub_token>"
        run_args.write(training.output_dir, config.command, run_args.shaping(config.model, config.data, training),
                       config.fitted_keys(), shown, asdict(card) if card else None, resolved=run_args.whole_paths(config.resolved()))
