"""Label errors: `python -m hf_transfer label-errors RUN_DIR [--folds K]`, the training and validation images whose
given label a finished run's recipe most disputes, written to `RUN_DIR/label_errors.json`.

Every image is scored by a model that never trained on it (a model scoring its own training images agrees with
their labels, wrong ones included, since it learnt them):
- the training split by K-fold cross-validation: the split is cut into K stratified folds (seeded by the run's
  seed); each fold's images are scored by a run of the same recipe (tools/recipe.py) trained on the other K - 1
  folds, through the same pipeline as any run (run/pipeline.py), its checkpoint chosen on the run's validation split
  as the run's was. Each fold run lives in `RUN_DIR/label-errors/fold-N`;
- the validation split by the run's own model, which never trained on it (its checkpoint was chosen on it).
Confident learning (`cleanlab.filter.find_label_issues`, Northcutt et al. 2021) then flags the images whose given
label is unlikely under those out-of-sample probabilities: per class, the average probability the models give the
class on the images labelled with it is the threshold above which an image counts as confidently of that class; the
counts of given vs confident class estimate how many images of each class carry each wrong label, and that many of
the least likely ones are flagged (its default, `prune_by_noise_rate`). The flagged images are listed most disputed
first (lowest probability of the given label).

What each fold measured is kept in `RUN_DIR/label-errors/fold-N/probabilities.npz`: the same command again reuses
the finished folds (a killed call resumes the fold it was training from its checkpoint) and gives the same list. The
fold runs' weights and checkpoints are removed once their probabilities are saved, unless `--keep_fold_runs`. A
run retrained in place, or another K, starts the folds afresh.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..config.flags import data_arguments
from ..config.run_config import parse_command
from ..data.dataset import ROW, ImageData
from ..errors import UserError
from ..run import record as run_args
from ..run.assembly import load_data
from ..run.pipeline import Evaluate, FineTune
from .recipe import check_rebuilt, data_flags, recipe_flags

logger = logging.getLogger(__name__)

DEFAULT_FOLDS = 3  # docs/label-errors.md: precision and recall against cost for 2, 3 and 5 folds
RESULTS = "label_errors.json"
FOLDER = "label-errors"  # in the run's folder: the fold runs and what each measured
PROBABILITIES = "probabilities.npz"
STATE = "folds.json"  # which run and K the folds were made for
MULTI_LABEL = ("the run has several labels per image: confident learning here judges one given class per image "
               "(several labels would need a judgement per class and image); label-errors is for runs with one "
               "class per image")
MOST_DISPUTED_SHOWN = 3  # images named in the printed summary


@dataclass
class Scored:
    """Out-of-sample probabilities of some images of one split."""

    split: str
    rows: np.ndarray  # each image's ROW in its split (data/dataset.py)
    labels: np.ndarray  # the given class ids
    probabilities: np.ndarray  # (images, classes): softmax of a model that never trained on them

    def save(self, path: Path) -> None:
        np.savez(path, split=self.split, rows=self.rows, labels=self.labels, probabilities=self.probabilities)

    @classmethod
    def load(cls, path: Path) -> Scored:
        with np.load(path) as saved:
            return cls(str(saved["split"]), saved["rows"], saved["labels"], saved["probabilities"])


def find_label_errors(run_dir: str, folds: int | None = None, keep_fold_runs: bool = False) -> dict:
    """Score every training and validation image of the run out of sample, flag the likely label errors, write
    RUN_DIR/label_errors.json and return what it holds. `folds`: K (default `DEFAULT_FOLDS`)."""
    run = Path(run_dir).resolve()
    folds = DEFAULT_FOLDS if folds is None else folds
    if folds < 2:
        raise UserError(f"--folds must be >= 2 (each fold is scored by a model trained on the others), got {folds}")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UserError("label-errors trains its folds one at a time in one process: start it with python, not a "
                        "launcher of several processes")
    saved = _finished_run(run)
    _check_data_flags(saved)
    _check_installed()
    instead = "label errors are found on the data the run was trained on"
    flags = recipe_flags(saved, instead)  # before the data loads: a record that cannot be rebuilt is refused now
    data = _open_data(saved, instead)
    work = _work_folder(run, saved, folds)
    held_out = fold_rows(np.asarray(data.train[ROW]), np.asarray(data.train[data.label_column]), folds,
                         saved["shaping"].get("training.seed", 42))
    scored = [_fold(saved, flags, work / f"fold-{k + 1}", rows, keep_fold_runs) for k, rows in enumerate(held_out)]
    scored.append(_validation(run, saved, work / "validation"))
    result = flag_label_errors(scored, data, folds)
    (run / RESULTS).write_text(json.dumps(result, indent=2) + "\n")
    return result


# ---------------------------------------------------------------- the run, its data, the working folder


def _finished_run(run: Path) -> dict:
    """The run's record; a folder that is not a finished fine-tuning run is refused in one line."""
    if not run.is_dir():
        raise UserError(f"'{run}' is not a directory; pass a finished run's output directory")
    saved = run_args.read(run)
    if saved is None:
        raise UserError(f"'{run}' has no run_args.json: not a run of this project; pass a finished run's output "
                        "directory")
    if saved.get("command") == "evaluate":
        raise UserError(f"'{run}' is an evaluation-only run (--do_train false): nothing was trained there to take "
                        "the recipe from; pass the folder of the run that trained the model")
    if saved.get("command") == "distill":
        raise UserError(f"'{run}' is a distilled run: its teacher trained on every training image, so folds taught by "
                        "it would not be out of sample; run label-errors on the teacher's run")
    if not (run / "all_results.json").is_file() or not (run / "model.safetensors").is_file():
        raise UserError(f"'{run}' is not a finished run (no all_results.json or model.safetensors): run its command "
                        "again to finish it, then find its label errors")
    return saved


def _check_data_flags(saved: dict) -> None:
    """What the run's data flags say the check cannot do, refused before the recipe is rebuilt or the data loads."""
    data = (saved.get("resolved") or {}).get("data", {})
    if data.get("streaming"):
        raise UserError("the run streamed its training split (--streaming): label-errors scores every training image "
                        "in K folds, which needs the split whole; not for streamed runs")
    if data.get("multi_label"):  # (else found from the label column once the data loads)
        raise UserError(MULTI_LABEL)


def _check_installed() -> None:
    import importlib.util

    if importlib.util.find_spec("cleanlab") is None:
        raise UserError("label-errors needs cleanlab: pip install 'hf-vision-transfer[label-errors]'")


def _open_data(saved: dict, instead: str) -> ImageData:
    """The run's data as it loaded it (the same flags, seed and splits), refused where the check cannot run."""
    data_args = data_arguments(saved, instead)
    data = load_data(data_args, saved["shaping"].get("training.seed", 42))
    if data.task.multi_label:
        raise UserError(MULTI_LABEL)
    return data


def _work_folder(run: Path, saved: dict, folds: int) -> Path:
    """RUN_DIR/label-errors, emptied when its folds were made for another K or before the run was trained again."""
    work = run / FOLDER
    state = {"folds": folds, "run": _fingerprint(run, saved)}
    path = work / STATE
    if work.is_dir() and (not path.is_file() or json.loads(path.read_text()) != state):
        logger.warning("%s was made for another K or an earlier training of the run: starting its folds afresh", work)
        shutil.rmtree(work)
    work.mkdir(exist_ok=True)
    path.write_text(json.dumps(state) + "\n")
    return work


def _fingerprint(run: Path, saved: dict) -> str:
    """What the run trained and what it measured: another training in the same folder changes it."""
    text = json.dumps(saved["shaping"], sort_keys=True) + (run / "all_results.json").read_text()
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def fold_rows(rows: np.ndarray, labels: np.ndarray, folds: int, seed: int) -> list[np.ndarray]:
    """The training rows of each fold: stratified by class (each fold holds about 1/K of every class), seeded."""
    from sklearn.model_selection import StratifiedKFold

    counts = np.bincount(labels)
    if counts[counts > 0].min() < folds:  # (sklearn would warn and leave some folds without the class)
        logger.warning("a class has fewer training images (%d) than folds (%d): some folds hold none of it",
                       counts[counts > 0].min(), folds)
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    return [np.sort(rows[held]) for _, held in splitter.split(rows, labels)]


# ---------------------------------------------------------------- scoring out of sample


class FoldRun(FineTune):
    """A run of the recipe on the training split without `held_out` rows, which it scores after training."""

    def __init__(self, config, held_out: np.ndarray, path: Path):
        super().__init__(config)
        self.held_out, self.path = held_out, path

    def load_data(self) -> ImageData:
        data = super().load_data()
        held = np.isin(np.asarray(data.train[ROW]), self.held_out)
        data.test = data.train.select(np.flatnonzero(held))  # scored after training (the run's test is not used)
        data.train = data.train.select(np.flatnonzero(~held))
        return data

    def check_data(self, data: ImageData, model) -> None:
        """Not repeated: the run's own check covered its data, and the held-out rows re-cut here as a test split
        would only be reported as leaks of that cut."""

    def train_and_evaluate(self, trainer, data: ImageData, card, resume_from) -> dict:
        results = super().train_and_evaluate(trainer, data, card, resume_from)
        score(trainer, data.test, "train").save(self.path)
        return results


class ValidationScores(Evaluate):
    """The run's own model on its validation split, as an evaluation run scores a split."""

    def __init__(self, config, path: Path):
        super().__init__(config)
        self.path = path

    def load_data(self) -> ImageData:
        data = super().load_data()
        data.test = data.validation
        return data

    def check_data(self, data: ImageData, model) -> None:
        """Not repeated (the run's own check covered its data; validation scored as the test split here would be
        reported as leaking into itself)."""

    def train_and_evaluate(self, trainer, data: ImageData, card, resume_from) -> dict:
        score(trainer, data.test, "validation").save(self.path)
        return {}


def score(trainer, split, name: str) -> Scored:
    """Softmax probabilities of `trainer`'s model on `split` (its transforms attached), with its rows and labels."""
    output = trainer.predict(split, metric_key_prefix="out_of_sample")
    logits = np.asarray(output.predictions, dtype=np.float64)
    probabilities = np.exp(logits - logits.max(axis=1, keepdims=True))
    probabilities /= probabilities.sum(axis=1, keepdims=True)
    rows = np.asarray(split.with_format(None)[ROW])
    return Scored(name, rows, np.asarray(output.label_ids), probabilities)


def _fold(saved: dict, flags: list[str], folder: Path, held_out: np.ndarray, keep_run: bool) -> Scored:
    """Fold `folder`'s probabilities: those it saved (a finished fold is reused), else from a run trained now."""
    path = folder / PROBABILITIES
    if path.is_file():
        logger.info("%s: reused", folder)
        return Scored.load(path)
    if (folder / "all_results.json").is_file():  # finished, but stopped before it saved its probabilities
        shutil.rmtree(folder)
    config = parse_command("finetune", [*flags, "--output_dir", str(folder / "run"), "--do_predict", "false",
                                        "--push_to_hub", "false"])
    check_rebuilt(config, saved, f"fold {folder.name}")
    logger.info("%s: training on the other folds, %d images held out", folder, len(held_out))
    folder.mkdir(exist_ok=True)
    FoldRun(config, held_out, path).run()
    if not keep_run:
        shutil.rmtree(folder / "run")
    return Scored.load(path)


def _validation(run: Path, saved: dict, folder: Path) -> Scored:
    path = folder / PROBABILITIES
    if not path.is_file():
        shutil.rmtree(folder, ignore_errors=True)  # (a call stopped while it scored: nothing there to keep)
        model = saved["resolved"]["model"]
        sized = [part for key in ("image_size", "crop_pct") if model.get(key) is not None
                 for part in (f"--{key}", str(model[key]))]
        config = parse_command("finetune", ["--model_name_or_path", str(run), *sized, *data_flags(saved, ""),
                                            "--do_train", "false", "--output_dir", str(folder / "run")])
        folder.mkdir(parents=True)
        ValidationScores(config, path).run()
        shutil.rmtree(folder / "run")
    return Scored.load(path)


# ---------------------------------------------------------------- confident learning


def flag_label_errors(scored: list[Scored], data: ImageData, folds: int) -> dict:
    """Confident learning on the out-of-sample probabilities of every scored image: label_errors.json's content."""
    from cleanlab.filter import find_label_issues

    labels = np.concatenate([s.labels for s in scored])
    probabilities = np.concatenate([s.probabilities for s in scored])
    where = [(s.split, int(row)) for s in scored for row in s.rows]
    flagged = find_label_issues(labels, probabilities, return_indices_ranked_by="self_confidence", n_jobs=1)
    files = {split: _files(getattr(data, split), data.image_column) for split in ("train", "validation")}
    names = data.label_names
    images = []
    for i in flagged:
        split, row = where[i]
        suggested = int(probabilities[i].argmax())
        images.append({"split": split, "row": row, "file": files[split].get(row), "given": names[labels[i]],
                       "suggested": names[suggested], "given_probability": round(float(probabilities[i, labels[i]]), 4),
                       "suggested_probability": round(float(probabilities[i, suggested]), 4)})
    checked = {s.split: 0 for s in scored}
    for s in scored:
        checked[s.split] += len(s.rows)
    return {"method": f"confident learning (cleanlab find_label_issues) on out-of-sample probabilities: {folds}-fold "
                      "cross-validation on the training split, the run's model on the validation split",
            "folds": folds, "flagged": len(images), "checked": len(labels), "images": images,
            "splits": {split: {"checked": n, "flagged": sum(image["split"] == split for image in images)}
                       for split, n in checked.items()},
            "out_of_sample_accuracy": {split: _accuracy([s for s in scored if s.split == split]) for split in checked}}


def _accuracy(scored: list[Scored]) -> float:
    right = sum(int((s.probabilities.argmax(1) == s.labels).sum()) for s in scored)
    return round(right / sum(len(s.labels) for s in scored), 4)


def _files(split, image_column: str) -> dict[int, str | None]:
    """row -> image file path (None where the images are not files), read a chunk at a time."""
    stored, by_row = split.with_format(None), {}
    for start in range(0, len(stored), 4096):
        chunk = stored[start:start + 4096]
        by_row.update(zip(chunk[ROW], (c.get("path") if isinstance(c, dict) else None for c in chunk[image_column])))
    return by_row


def summary_line(result: dict, run_dir: str) -> str:
    """The command's last line: how many were flagged, the most disputed, where the list is."""
    shown = [f"{image['split']} {Path(image['file']).name if image['file'] else 'row ' + str(image['row'])} "
             f"(given {image['given']}, the model says {image['suggested']} {image['suggested_probability']:.2f})"
             for image in result["images"][:MOST_DISPUTED_SHOWN]]
    line = f"{result['flagged']} of {result['checked']} images flagged"
    line += f"; the most disputed: {', '.join(shown)}" if shown else ""
    return f"{line}; written to {Path(run_dir) / RESULTS}"
