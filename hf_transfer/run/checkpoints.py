"""Checkpoints: which one a run resumes from, and a clean stop when the job is told to end.

A run killed in the middle of writing a checkpoint leaves a directory that looks like the
newest one. `last_complete_checkpoint` checks every file the Trainer writes (the trainer
state, which it writes last, parses; safetensors files are as long as their header says;
torch files have their zip directory) and moves an incomplete checkpoint aside.

SIGTERM (what Slurm and Kubernetes send before pre-empting a job) makes the run save a
checkpoint at the end of the current step and stop; the same command then resumes it.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import signal
import struct
import threading
import zipfile
from pathlib import Path

import torch
from transformers import TrainerCallback

logger = logging.getLogger(__name__)
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def _safetensors_whole(path: Path) -> bool:
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return False
        (header_size,) = struct.unpack("<Q", head)
        if header_size > size:
            return False
        try:
            header = json.loads(f.read(header_size))
        except ValueError:
            return False
    ends = [entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"]
    return size == 8 + header_size + max(ends, default=0)


def is_complete(checkpoint: Path) -> bool:
    """Whether every file of a Trainer checkpoint was written to its end: its weights (safetensors, or the sharded
    folders of FSDP's SHARDED_STATE_DICT and DeepSpeed), the torch files in it and in those folders."""
    try:
        json.loads((checkpoint / "trainer_state.json").read_text())
        files = [p for p in checkpoint.rglob("*") if p.is_file()]  # one walk of the checkpoint's tree
        weights = [p for p in files if p.parent == checkpoint and p.suffix == ".safetensors"]
        sharded = [p for p in checkpoint.iterdir() if p.is_dir() and p.name.startswith(("pytorch_model_fsdp", "global_step"))]
        if not (weights or sharded) or not all(_safetensors_whole(p) for p in weights):
            return False
        for folder in {p.parent for p in files if p.suffix == ".distcp"}:
            if not (folder / ".metadata").is_file():  # torch.distributed.checkpoint writes it once every shard is
                return False
        for path in (p for p in files if p.suffix in (".pt", ".pth", ".bin")):
            with zipfile.ZipFile(path):  # torch.save's format; a cut file has no central directory
                pass
    except (OSError, ValueError, zipfile.BadZipFile, KeyError, struct.error):
        return False
    return True


def last_complete_checkpoint(output_dir: str | Path) -> str | None:
    """The newest complete checkpoint; newer incomplete ones are renamed `incomplete-checkpoint-N`."""
    found = [(int(m.group(1)), p) for p in Path(output_dir).iterdir() if (m := _CHECKPOINT.match(p.name)) and p.is_dir()]
    for _, path in sorted(found, reverse=True):
        if is_complete(path):
            return str(path)
        aside = move_aside(path, "incomplete")
        logger.warning("checkpoint %s is incomplete (interrupted while saving); moved to %s", path, aside)
    return None


def step_of(checkpoint: Path) -> int | None:
    """N of a `checkpoint-N` folder; None for any other name."""
    match = _CHECKPOINT.match(checkpoint.name)
    return int(match.group(1)) if match else None


def move_aside(checkpoint: Path, why: str) -> Path:
    """`checkpoint` renamed `<why>-checkpoint-N`, in place of an earlier one of that name (a run cut short twice
    while saving the same step leaves two)."""
    aside = checkpoint.with_name(f"{why}-{checkpoint.name}")
    if aside.exists():
        shutil.rmtree(aside)
    checkpoint.rename(aside)
    return aside


class StopOnSignal(TrainerCallback):
    """On SIGTERM: save a checkpoint at the end of the current step and stop training.

    With several processes the decision is shared (an all-reduce every `sync_every` steps),
    so that every rank stops at the same step; the stop then comes within that many steps.
    """

    def __init__(self, signals=(signal.SIGTERM,), sync_every: int = 10):
        self.signals, self.sync_every = signals, sync_every
        self.requested = False
        self.stopped_at: int | None = None
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        self.requested = True
        logger.warning("received signal %d: saving a checkpoint at the end of this step, then stopping", signum)

    def on_train_begin(self, args, state, control, **kwargs):
        # Installed before the DataLoader workers fork, so they inherit it and live until the checkpoint is saved.
        # Python installs handlers from the main thread only: a run in another thread (a Ray Tune trial, whose
        # process Ray itself stops) keeps the process's own.
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)

    def on_train_end(self, args, state, control, **kwargs):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def on_step_end(self, args, state, control, **kwargs):
        requested = self.requested
        if args.world_size > 1:
            if state.global_step % self.sync_every:
                return
            flag = torch.tensor(float(requested), device=args.device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            requested = bool(flag.item())
        if requested:
            self.requested = True
            self.stopped_at = state.global_step
            control.should_save = True
            control.should_training_stop = True
