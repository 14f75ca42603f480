"""Hyperparameter search: `python -m hf_transfer search <run_finetune.py flags> --n_trials N`.

optuna proposes the values (TPE sampler, seeded by --seed); each trial is an ordinary fine-tuning
run of those flags, through the same pipeline as `run_finetune.py` (run/pipeline.py), in
`OUT/trial-NNN` (OUT: --output_dir, default `runs/<model>-<data set>-search`). So a trial is
exactly the run its flags describe: the data-fitted defaults, the EMA, the BatchNorm statistics,
the checkpoints and their resume all behave as in any run. (The Trainer's own
`hyperparameter_search` runs every trial through one Trainer whose `model_init` swaps the model:
what `TransferTrainer` builds around its model would stay the first trial's, and a killed trial
could not resume.)

- The test split is never used to choose: trials run with `--do_predict false`, and the objective
  is the validation score of the trial's best checkpoint (the metric that chose it,
  --metric_for_best_model: accuracy, or mAP for several labels per image, unless given), in the
  direction the Trainer chose it (`greater_is_better`: a loss is minimised). The first trial of a
  new study is the recipe itself. Each evaluation from a quarter of a trial's steps on is reported
  to optuna, whose percentile pruner stops a trial in the worst quarter of the finished ones at the
  same step.
- Trials whose scores differ by less than one validation image's share cannot be told apart by
  validation: among them the one with the lowest validation loss above its floor is the best
  (`choose`), and the search says how many tied, on how many images.
- The study is stored in `OUT/study.db` (SQLite), with the metric it chooses by. The same command
  again continues it: finished trials are kept and counted, a trial that was killed runs again with
  the same values and resumes from its newest checkpoint; --n_trials is the total the study should
  reach. Another metric or direction is refused (the trials' scores would not compare).
- Then the best trial's flags train `OUT/best`, an ordinary run folder (arguments file, model card,
  validation and test results); `OUT/search_results.json` lists every trial and says which trial
  `best/` holds. When a continued study has a new best, the previous `best/` is kept as
  `best-<its trial folder>` and `best/` trains the new one (`_set_aside_previous_best`).

The search space (`space`) surrounds the family's recipe; a searched flag that the command sets
itself is not searched, the command's value holds for every trial.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

from transformers import TrainerCallback

from ..errors import UserError
from ..tasks.classification import check_metric, metric_key, metric_name, task_of

logger = logging.getLogger(__name__)

STUDY = "search"  # the study's name in study.db
PRUNE_FROM = 0.25  # share of a trial's steps before which its evaluations are not reported (too early to judge)
PRUNE_BELOW = 25.0  # a trial is stopped when its validation score is in this worst percentile of the earlier ones
RESULTS = "search_results.json"


@dataclass(frozen=True)
class Objective:
    """What the search chooses by: the run's --metric_for_best_model (its name without `eval_`, however spelled) in
    the direction the Trainer chooses checkpoints by it (`greater_is_better`, which TrainingArguments derives from
    the name unless given: a loss is minimised)."""

    metric: str
    maximize: bool

    @classmethod
    def of(cls, training) -> Objective:
        return cls(metric_name(training.metric_for_best_model), bool(training.greater_is_better))

    @property
    def direction(self) -> str:
        return "maximize" if self.maximize else "minimize"

    @property
    def is_loss(self) -> bool:
        return self.metric.endswith("loss")  # (the Trainer's own rule for the direction)

    def __str__(self) -> str:
        return f"the {'highest' if self.maximize else 'lowest'} {self.metric}"


@dataclass
class Finished:
    """A trial that finished (not pruned or failed): what choosing the best reads."""

    trial: int | str  # optuna's number, Ray's trial id
    value: float  # its validation score (`metric`)
    flags: list[str]
    folder: str  # its run folder in OUT
    metric: str | None = None  # the key the score was read from (eval_accuracy, eval_map, eval_loss, ...)
    images: int | None = None  # validation images it was scored on
    loss_above_floor: float | None = None  # its validation loss above the loss floor of its label smoothing


def choose(finished: Sequence[Finished], objective: Objective) -> tuple[Finished, list[Finished]]:
    """The best trial, and the trials validation cannot tell from it (itself included): those whose score is within
    less than one validation image's share (1/N) of the best score (for accuracy: the same score; a loss is a mean
    of unbounded terms, so only an equal one). Among those, the lowest validation loss above its floor wins
    (tasks.loss_floor: label smoothing, searched, raises the loss by design), then the earliest trial."""
    sizes = sorted({f.images for f in finished if f.images})
    if len(sizes) > 1:  # a study continued after the validation data changed: its scores do not compare
        raise UserError(f"the study's trials were scored on validation splits of {' and '.join(map(str, sizes))} "
                        "images: their scores do not compare; continue it with the validation data it started with, "
                        "or start a new study in another --output_dir")
    scores = [f.value for f in finished]
    top = max(scores) if objective.maximize else min(scores)
    tied = [f for f in finished if _indistinguishable(f.value, top, f.images, objective)]
    order = {id(f): i for i, f in enumerate(finished)}
    best = min(tied, key=lambda f: (math.inf if f.loss_above_floor is None else f.loss_above_floor, order[id(f)]))
    return best, tied


def _indistinguishable(value: float, top: float, images: int | None, objective: Objective) -> bool:
    if objective.is_loss or not images:
        return math.isclose(value, top, rel_tol=1e-9, abs_tol=1e-12)
    return abs(value - top) * images < 1 - 1e-6


def space(trial, training, augmentation: str, given: set[str]) -> None:
    """One trial's values, drawn by an optuna trial (define-by-run): around the recipe's learning rate and weight
    decay (a decade each way, log-uniform: the transfer benchmark's largest effects came from the learning rate),
    label smoothing, augmentation on or off ('on' is the data set's default augmentation, or crops where that is
    none). `flags_of(trial.params)` are the trial's flags."""
    if "learning_rate" not in given:
        lr = training.learning_rate
        trial.suggest_float("learning_rate", lr / 10, lr * 10, log=True)
    if "weight_decay" not in given:
        wd = training.weight_decay or 1e-4
        trial.suggest_float("weight_decay", wd / 10, wd * 10, log=True)
    if "label_smoothing_factor" not in given:
        trial.suggest_float("label_smoothing_factor", 0.0, 0.2)
    if "augmentation" not in given:
        trial.suggest_categorical("augmentation", ["none", augmentation if augmentation != "none" else "crop"])


def ran(params: dict) -> dict:
    """A trial's values as its run used them (`flags_of` rounds numbers to 4 significant digits)."""
    return {key: float(_number(value)) if isinstance(value, float) else value for key, value in params.items()}


def flags_of(params: dict) -> list[str]:
    """A trial's values as run_finetune.py flags (numbers to 4 significant digits)."""
    return [part for key, value in params.items()
            for part in (f"--{key}", value if isinstance(value, str) else _number(value))]


def recipe_values(training, augmentation: str, given: set[str]) -> dict:
    """The point of `space` that is the run's own defaults (as `_number` writes them)."""
    values = {"learning_rate": training.learning_rate, "weight_decay": training.weight_decay or 1e-4,
              "label_smoothing_factor": training.label_smoothing_factor, "augmentation": augmentation}
    return {k: (float(_number(v)) if k != "augmentation" else v) for k, v in values.items() if k not in given}


def _number(value: float) -> str:
    return f"{value:.4g}"


class _Reporter(TrainerCallback):
    """Hands each evaluation during training, from a quarter of the trial's steps on, to `report`. The value is
    the metric that chooses the run's checkpoint (--metric_for_best_model, as the data fitted it: accuracy, mAP for
    several labels per image). The final evaluation gives the loss floor of the run's task and label smoothing."""

    def __init__(self):
        self.training = True
        self.metric = "eval_accuracy"
        self.floor: float | None = None

    def on_evaluate(self, args, state, control, metrics=None, model=None, **kwargs):
        self.metric = metric_key(args.metric_for_best_model)
        value = (metrics or {}).get(self.metric)
        if self.training and value is not None and state.global_step >= PRUNE_FROM * state.max_steps:
            self.report(value, state, control)
        if not self.training and getattr(model, "config", None) is not None:
            self.floor = task_of(model.config).loss_floor(args.label_smoothing_factor)

    def on_train_end(self, args, state, control, **kwargs):
        self.training = False  # the final evaluation of the best checkpoint is the objective, not a report

    def outcome(self, results: dict) -> dict:
        """A finished trial's facts beside its score: the key it was read from, the validation images, the loss
        above its floor (what a tie is broken by)."""
        loss = results.get("eval_loss")
        return {"metric": self.metric, "images": results.get("eval_samples"),
                "loss_above_floor": None if loss is None or self.floor is None else float(loss - self.floor)}

    def report(self, value: float, state, control) -> None:
        raise NotImplementedError


class ReportToTrial(_Reporter):
    """To the optuna trial; the run stops when optuna prunes it."""

    def __init__(self, trial):
        super().__init__()
        self.trial = trial
        self.pruned = False

    def report(self, value, state, control):
        self.trial.report(value, state.global_step)
        if self.trial.should_prune():
            logger.info("trial %d pruned at step %d (%s %.4f)", self.trial.number, state.global_step, self.metric,
                        value)
            self.pruned = control.should_training_stop = True


class ReportToRay(_Reporter):
    """To Ray Tune, whose scheduler may stop the trial there."""

    def report(self, value, state, control):
        from ray import tune

        tune.report({"objective": value, "step": state.global_step})

@dataclass
class Search:
    """What every trial shares: the command, the output folder, the values around which to search."""

    argv: list[str]
    out: Path
    training: object  # the parsed training arguments (the recipe's values for this model family)
    augmentation: str  # the data set's default augmentation
    given: set[str]  # the flags the command sets itself: not searched
    objective: Objective

    def run_trial(self, params: dict, folder: str, callbacks=()) -> dict:
        """One trial: an ordinary run of the command with the trial's flags, validated, never tested."""
        from ..run.pipeline import run

        return run("finetune", [*self.argv, *flags_of(params), "--output_dir", str(self.out / folder),
                                "--do_predict", "false", "--push_to_hub", "false"], callbacks)


def run_search(argv: Sequence[str], n_trials: int, backend: str = "optuna") -> dict:
    from ..config.run_config import parse_command
    from ..run.pipeline import run

    argv = list(argv)
    if n_trials < 1:
        raise UserError(f"--n_trials must be >= 1, got {n_trials}")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UserError("search runs its trials one at a time in one process: start it with python, not a launcher "
                        "of several processes (--backend ray spreads trials over machines)")
    engine = {"optuna": _with_optuna, "ray": _with_ray}[backend]
    _check_installed(backend)
    parsed = parse_command("finetune", argv)  # every flag checked before the first trial
    if not parsed.training.do_train:
        raise UserError("search trains: not with --do_train false")
    if not parsed.training.do_eval:
        raise UserError("search chooses its trials on the validation split: not with --do_eval false")
    objective = Objective.of(parsed.training)
    # Against every task's metrics: the data (loaded by each trial) decides the task, and the first trial checks the
    # name against it before it trains.
    check_metric(parsed.training.metric_for_best_model, None, parsed.training.ema_decay)
    given = set(parsed.passed)
    if objective.is_loss and "label_smoothing_factor" not in given:
        given.add("label_smoothing_factor")
        logger.info("choosing by %s: --label_smoothing_factor is not searched (it raises the validation loss by "
                    "design, so trials with more would look worse whatever their predictions)", objective.metric)
    out = Path(parsed.training.output_dir if "output_dir" in given else parsed.training.output_dir + "-search")
    if "overwrite_output_dir" in given:  # it would go to every trial, and a study is continued, never overwritten
        raise UserError(f"search continues the study in '{out}' (more --n_trials run more trials): leave "
                        "--overwrite_output_dir out; to start afresh, choose another --output_dir or delete that one")
    out.mkdir(parents=True, exist_ok=True)
    search = Search(argv, out.resolve(), parsed.training, parsed.data.augmentation, given, objective)

    started = time.perf_counter()
    finished, trials = engine(search, n_trials)
    best, tied = choose(finished, objective)
    if len(tied) > 1:
        logger.warning("%d trials score within one validation image of the best (%s %.4f on %s images): validation "
                       "cannot tell them apart; trial %s has the lowest validation loss above its floor. A larger "
                       "validation split (--validation_split, --validation_dir) would tell them apart", len(tied),
                       metric_name(best.metric or metric_key(objective.metric)), best.value, best.images, best.trial)
    _set_aside_previous_best(search.out, best)
    summary = {"backend": backend, "n_trials": n_trials, "objective": str(objective),
               "best": _best_entry(search.out, best, tied), "trials": trials}
    _write_results(search.out, summary)  # before best/ trains: it says which trial best/ holds
    logger.info("best trial %s: validation %.4f with %s", best.trial, best.value, " ".join(best.flags))
    results = run("finetune", [*argv, *best.flags, "--output_dir", str(search.out / "best")])
    summary["best"].update(test_accuracy=results.get("test_accuracy"),
                           **({"test_map": results["test_map"]} if "test_map" in results else {}))
    summary["seconds_this_call"] = round(time.perf_counter() - started, 1)
    _write_results(search.out, summary)
    return summary


def _best_entry(out: Path, best: Finished, tied: list[Finished]) -> dict:
    entry = {"trial": best.trial, "validation": best.value, "metric": best.metric, "validation_images": best.images,
             "flags": best.flags, "trial_folder": best.folder, "folder": str(out / "best"), "test_accuracy": None}
    if len(tied) > 1:
        entry.update(tied_with=[f.trial for f in tied if f is not best],
                     chosen_by="the lowest validation loss above its floor, among the trials within one validation "
                               "image of the best score")
    return entry


def closing_line(summary: dict) -> str:
    """The command's last line: the best trial, the metric and images that chose it, a tie, where it was trained."""
    best = summary["best"]
    line = f"best trial {best['trial']}: validation {metric_name(best.get('metric') or 'accuracy')} {best['validation']:.4f}"
    if best.get("validation_images"):
        line += f" on {best['validation_images']} images"
    if best.get("tied_with"):
        line += (f", tied with trial{'s' if len(best['tied_with']) > 1 else ''} "
                 f"{', '.join(map(str, best['tied_with']))} (chosen by the lowest validation loss above its floor)")
    line += f", with {' '.join(best['flags'])}; trained as {best['folder']}"
    if best.get("test_accuracy") is not None:
        line += f" (test accuracy {best['test_accuracy']:.4f})"
    return line


def _write_results(out: Path, summary: dict) -> None:
    (out / RESULTS).write_text(json.dumps(summary, indent=2) + "\n")


def _set_aside_previous_best(out: Path, best: Finished) -> None:
    """`best/` holds the trial that search_results.json names (written before best/ trains). When a continued study
    has another best trial, that run moves to `best-<its trial folder>` (its test results are kept) and best/ is
    free for the new best. A kill while the new one trains leaves best/ a partial run of the new best, which
    search_results.json names already: the same command resumes it there."""
    path = out / RESULTS
    if not (out / "best").exists() or not path.is_file():
        return
    previous = json.loads(path.read_text())
    before = previous["best"]
    if before["trial"] == best.trial:
        return
    folder = before.get("trial_folder") or next(  # (a file of an earlier version: from its list of trials)
        (t["folder"] for t in previous.get("trials", []) if t.get("number") == before["trial"] and t.get("folder")),
        f"trial-{before['trial']}")
    aside, n = out / f"best-{folder}", 1
    while aside.exists():  # (never over an earlier one)
        n += 1
        aside = out / f"best-{folder}-{n}"
    (out / "best").rename(aside)
    logger.warning("trial %s is now the best (before: trial %s): best/ trains it, the previous best/ is kept as %s",
                   best.trial, before["trial"], aside)


def _check_installed(backend: str) -> None:
    import importlib.util

    module, extra = ("optuna", "search") if backend == "optuna" else ("ray.tune", "search-ray")
    if importlib.util.find_spec(module.split(".")[0]) is None:
        raise UserError(f"--backend {backend} needs {module.split('.')[0]}: pip install 'hf-vision-transfer[{extra}]'")


def open_study(out: Path, objective: Objective, seed: int):
    """OUT/study.db, created choosing by `objective`, or as stored. A stored study that chose by another metric or
    direction is refused (its scores would not compare with the new ones), unless none of its trials trained (all
    refused before training, e.g. a metric this data set does not report): that one starts afresh."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = f"sqlite:///{out / 'study.db'}"
    options = dict(study_name=STUDY, storage=storage, sampler=optuna.samplers.TPESampler(seed=seed),
                   pruner=optuna.pruners.PercentilePruner(PRUNE_BELOW, n_startup_trials=3))
    study = optuna.create_study(direction=objective.direction, load_if_exists=True, **options)
    if study.trials and all("refused" in t.user_attrs for t in study.trials):
        logger.info("no trial of %s trained (refused: %s): the study starts afresh", out / "study.db",
                    study.trials[-1].user_attrs["refused"])
        optuna.delete_study(study_name=STUDY, storage=storage)
        study = optuna.create_study(direction=objective.direction, **options)
    # (a study of an earlier version recorded no metric: its direction is what can be compared)
    stored = Objective(study.user_attrs.get("metric", objective.metric), study.direction.name == "MAXIMIZE")
    if stored != objective:
        same_metric = stored.metric == objective.metric  # then the direction differs: --greater_is_better
        fix = (f"--greater_is_better {str(stored.maximize).lower()}" if same_metric else
               f"--metric_for_best_model {stored.metric}")
        raise UserError(f"{out / 'study.db'} chose its trials by {stored}, this command by {objective}: their scores "
                        f"do not compare; pass {fix}, or another --output_dir")
    study.set_user_attr("metric", objective.metric)
    return study


def _with_optuna(search: Search, n_trials: int) -> tuple[list[Finished], list[dict]]:
    """Trials one after another in this process, the study in OUT/study.db."""
    import optuna
    from optuna.trial import TrialState

    from ..trainers.nonfinite import NonFiniteLossError

    study = open_study(search.out, search.objective, search.training.seed)
    if not study.trials:  # the first trial is the recipe itself: the search can only find better on validation
        study.enqueue_trial(recipe_values(search.training, search.augmentation, search.given))
    _requeue_interrupted(study)
    resumed = {t.user_attrs["resumes"] for t in study.get_trials(deepcopy=False) if "resumes" in t.user_attrs}
    done = [t for t in study.get_trials(deepcopy=False) if _counts(t, resumed)]
    remaining = max(0, n_trials - len(done))
    logger.info("study %s: %d trial(s) done, %d to run", search.out / "study.db", len(done), remaining)

    def objective(trial) -> float:
        folder = trial.user_attrs.get("folder") or f"trial-{trial.number:03d}"
        trial.set_user_attr("folder", folder)
        space(trial, search.training, search.augmentation, search.given)
        trial.set_user_attr("flags", flags_of(trial.params))
        report = ReportToTrial(trial)
        started = time.perf_counter()
        try:
            results = search.run_trial(trial.params, folder, callbacks=[report])
        except UserError as exc:  # refused before it trained: it does not count, and the search stops with it
            trial.set_user_attr("refused", str(exc))
            refusals.append(exc)
            study.stop()
            raise optuna.TrialPruned() from exc  # (a failure would have optuna print the error's traceback)
        trial.set_user_attr("seconds", round(time.perf_counter() - started, 1))
        if report.pruned:
            raise optuna.TrialPruned()
        for key, value in report.outcome(results).items():
            trial.set_user_attr(key, value)
        return results[report.metric]

    refusals: list[UserError] = []
    if remaining:
        study.optimize(objective, n_trials=remaining, catch=(NonFiniteLossError,))
    if refusals:
        raise refusals[0]
    finished = [Finished(t.number, t.value, t.user_attrs["flags"], t.user_attrs.get("folder"),
                         t.user_attrs.get("metric"), t.user_attrs.get("images"), t.user_attrs.get("loss_above_floor"))
                for t in study.trials if t.state == TrialState.COMPLETE]
    if not finished:
        raise UserError(f"no trial of {search.out / 'study.db'} finished (all pruned or failed); see the trial folders")
    trials = [{"number": t.number, "state": "REFUSED" if "refused" in t.user_attrs else t.state.name,
               "validation": t.value, "params": ran(t.params),
               "folder": t.user_attrs.get("folder"), "seconds": t.user_attrs.get("seconds"),
               "resumes": t.user_attrs.get("resumes"), "loss_above_floor": t.user_attrs.get("loss_above_floor"),
               **({"refused": t.user_attrs["refused"]} if "refused" in t.user_attrs else {})} for t in study.trials]
    return finished, trials


def _with_ray(search: Search, n_trials: int) -> tuple[list[Finished], list[dict]]:
    """Trials in parallel on a Ray cluster (RAY_ADDRESS; a local one when unset), each an ordinary run with one GPU
    (all of a machine's CPUs on a cluster without GPUs); OptunaSearch proposes (the same space, the recipe first),
    the ASHA scheduler stops trials that lag. The experiment lives in OUT/ray (shared storage on a cluster): the
    same command restores it and resumes the unfinished trials, each from its run folder's newest checkpoint."""
    import ray

    started_here = not ray.is_initialized()
    ray.init(address=os.environ.get("RAY_ADDRESS"), include_dashboard=False, log_to_driver=False,
             ignore_reinit_error=True, configure_logging=False)
    try:
        return _tune(search, n_trials)
    finally:
        if started_here:
            ray.shutdown()  # (the local cluster's processes, or this driver's connection to a remote one)


def _tune(search: Search, n_trials: int) -> tuple[list[Finished], list[dict]]:
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    def trainable(config: dict) -> None:
        folder = f"trial-{tune.get_context().get_trial_id()}"
        report = ReportToRay()
        results = search.run_trial(config, folder, callbacks=[report])
        tune.report({"objective": results[report.metric], "folder": folder, "finished": True,  # "done": Ray's key
                     **report.outcome(results)})

    gpus = 1 if ray.cluster_resources().get("GPU") else 0
    resources = {"cpu": 1, "gpu": 1} if gpus else {"cpu": max(1, int(ray.cluster_resources().get("CPU", 1)))}
    path, recorded = search.out / "ray", search.out / "ray_objective.json"
    runnable = tune.with_resources(trainable, resources)
    mode = search.objective.direction[:3]  # max, min
    if tune.Tuner.can_restore(str(path)):
        # (an experiment of an earlier version recorded nothing: it maximised)
        stored = Objective(**json.loads(recorded.read_text())) if recorded.is_file() else None
        if stored is not None and stored != search.objective or stored is None and not search.objective.maximize:
            raise UserError(f"{path} chose its trials by {stored or 'the highest score'}, this command by "
                            f"{search.objective}: their scores do not compare; choose another --output_dir")
        tuner = tune.Tuner.restore(str(path), runnable, resume_unfinished=True, resume_errored=True)
    else:
        recorded.write_text(json.dumps(asdict(search.objective)) + "\n")
        algorithm = OptunaSearch(space=partial(space, training=search.training, augmentation=search.augmentation,
                                               given=search.given),  # (saved with the experiment: no lambda)
                                 metric="objective", mode=mode, seed=search.training.seed,
                                 points_to_evaluate=[recipe_values(search.training, search.augmentation, search.given)])
        tuner = tune.Tuner(runnable, tune_config=tune.TuneConfig(
            metric="objective", mode=mode, num_samples=n_trials, search_alg=algorithm,
            # rungs at 1, 4, 16, ... steps (of those reported); no step limit of its own (the run has --max_steps)
            scheduler=ASHAScheduler(time_attr="step", grace_period=1, reduction_factor=4, max_t=2**40,
                                    stop_last_trials=False)),
            run_config=tune.RunConfig(name="ray", storage_path=str(search.out), verbose=0))
    grid = tuner.fit()
    finished = [Finished(r.metrics.get("trial_id"), r.metrics["objective"], flags_of(r.config), r.metrics["folder"],
                         r.metrics.get("metric"), r.metrics.get("images"), r.metrics.get("loss_above_floor"))
                for r in grid if r.metrics and r.metrics.get("finished")]
    if not finished:
        raise UserError(f"no trial of {path} finished (all stopped or failed); see the trial folders")
    trials = [{"number": (r.metrics or {}).get("trial_id"), "validation": (r.metrics or {}).get("objective"),
               "state": "ERROR" if r.error else "COMPLETE" if (r.metrics or {}).get("finished") else "STOPPED",
               "params": ran(r.config), "folder": f"trial-{(r.metrics or {}).get('trial_id')}",
               "loss_above_floor": (r.metrics or {}).get("loss_above_floor")} for r in grid]
    return finished, trials


def _counts(trial, resumed: set[int]) -> bool:
    """Whether a stored trial counts towards --n_trials: finished, and not one that a kill interrupted (`resumed`:
    the trials another one runs again) or that was refused before it trained."""
    from optuna.trial import TrialState

    if "refused" in trial.user_attrs:
        return False
    if trial.state in (TrialState.COMPLETE, TrialState.PRUNED):
        return True
    return trial.state == TrialState.FAIL and trial.number not in resumed


def _requeue_interrupted(study) -> None:
    """A trial still marked running was killed with the previous search process (one search per folder): it is
    marked failed, and its values queued again for a trial in the same folder, which resumes from its checkpoint."""
    from optuna.trial import TrialState

    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        logger.info("trial %d was interrupted: it runs again with the same values", trial.number)
        study.tell(trial.number, state=TrialState.FAIL)
        study.enqueue_trial(trial.params, user_attrs={"folder": trial.user_attrs.get("folder"), "resumes": trial.number})
