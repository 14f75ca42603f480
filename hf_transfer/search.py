"""Hyperparameter search: `python -m hf_transfer search <run_finetune.py flags> --n_trials N`.

optuna proposes the values (TPE sampler, seeded by --seed); each trial is an ordinary fine-tuning
run of those flags, through the same `commands/finetune.py` main as `run_finetune.py`, in
`OUT/trial-NNN` (OUT: --output_dir, default `runs/<model>-<data set>-search`). So a trial is
exactly the run its flags describe: the data-fitted defaults, the EMA, the BatchNorm statistics,
the checkpoints and their resume all behave as in any run. (The Trainer's own
`hyperparameter_search` runs every trial through one Trainer whose `model_init` swaps the model:
what `TransferTrainer` builds around its model would stay the first trial's, and a killed trial
could not resume.)

- The test split is never used to choose: trials run with `--do_predict false`, and the objective
  is the validation score of the trial's best checkpoint (the metric that chose it: accuracy, or
  mAP for several labels per image). The first trial of a new study is the recipe itself. Each
  evaluation from a quarter of a trial's steps on is reported to optuna, whose percentile pruner
  stops a trial in the bottom quarter of the finished ones at the same step.
- The study is stored in `OUT/study.db` (SQLite). The same command again continues it: finished
  trials are kept and counted, a trial that was killed runs again with the same values and resumes
  from its newest checkpoint; --n_trials is the total the study should reach.
- Then the best trial's flags train `OUT/best`, an ordinary run folder (arguments file, model card,
  validation and test results); `OUT/search_results.json` lists every trial.

The search space (`space`) surrounds the family's recipe; a searched flag that the command sets
itself is not searched, the command's value holds for every trial.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from transformers import TrainerCallback

from .errors import UserError

logger = logging.getLogger(__name__)

STUDY = "search"  # the study's name in study.db
PRUNE_FROM = 0.25  # share of a trial's steps before which its evaluations are not reported (too early to judge)
PRUNE_BELOW = 25.0  # a trial is stopped when its validation accuracy is below this percentile of the earlier ones


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
    the metric that chooses the run's checkpoint (accuracy; mAP for several labels per image)."""

    def __init__(self):
        self.training = True
        self.metric = "eval_accuracy"

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        self.metric = f"eval_{args.metric_for_best_model}"
        value = (metrics or {}).get(self.metric)
        if self.training and value is not None and state.global_step >= PRUNE_FROM * state.max_steps:
            self.report(value, state, control)

    def on_train_end(self, args, state, control, **kwargs):
        self.training = False  # the final evaluation of the best checkpoint is the objective, not a report

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

    def run_trial(self, params: dict, folder: str, callbacks=()) -> dict:
        """One trial: an ordinary run of the command with the trial's flags, validated, never tested."""
        from .commands import finetune

        return finetune.main([*self.argv, *flags_of(params), "--output_dir", str(self.out / folder),
                              "--do_predict", "false", "--push_to_hub", "false"], callbacks=callbacks)


def run_search(argv: Sequence[str], n_trials: int, backend: str = "optuna") -> dict:
    from .arguments import parse_arguments
    from .commands import finetune
    from .data.augmentation import resolve_augmentation

    argv = list(argv)
    if n_trials < 1:
        raise UserError(f"--n_trials must be >= 1, got {n_trials}")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UserError("search runs its trials one at a time in one process: start it with python, not a launcher "
                        "of several processes (--backend ray spreads trials over machines)")
    engine = {"optuna": _with_optuna, "ray": _with_ray}[backend]
    _check_installed(backend)
    parsed = parse_arguments(argv)  # every flag checked before the first trial
    if not parsed.training.do_train:
        raise UserError("search trains: not with --do_train false")
    given = parsed.passed
    out = Path(parsed.training.output_dir if "output_dir" in given else parsed.training.output_dir + "-search")
    augmentation = resolve_augmentation(parsed.data.augmentation, parsed.data.train_dir or parsed.data.dataset_name)
    out.mkdir(parents=True, exist_ok=True)
    search = Search(argv, out.resolve(), parsed.training, augmentation, given)

    started = time.perf_counter()
    best, trials = engine(search, n_trials)
    logger.info("best trial %s: validation %.4f with %s", best["trial"], best["validation"], " ".join(best["flags"]))
    results = finetune.main([*argv, *best["flags"], "--output_dir", str(out / "best")])
    summary = {
        "backend": backend, "n_trials": n_trials, "seconds_this_call": round(time.perf_counter() - started, 1),
        "best": {**best, "folder": str(out / "best"), "test_accuracy": results.get("test_accuracy"),
                 **({"test_map": results["test_map"]} if "test_map" in results else {})},
        "trials": trials,
    }
    (out / "search_results.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _check_installed(backend: str) -> None:
    import importlib.util

    module, extra = ("optuna", "search") if backend == "optuna" else ("ray.tune", "search-ray")
    if importlib.util.find_spec(module.split(".")[0]) is None:
        raise UserError(f"--backend {backend} needs {module.split('.')[0]}: pip install 'hf-vision-transfer[{extra}]'")


def _with_optuna(search: Search, n_trials: int) -> tuple[dict, list[dict]]:
    """Trials one after another in this process, the study in OUT/study.db."""
    import optuna
    from optuna.trial import TrialState

    from .trainers.nonfinite import NonFiniteLossError

    study = optuna.create_study(study_name=STUDY, storage=f"sqlite:///{search.out / 'study.db'}", direction="maximize",
                                load_if_exists=True, sampler=optuna.samplers.TPESampler(seed=search.training.seed),
                                pruner=optuna.pruners.PercentilePruner(PRUNE_BELOW, n_startup_trials=3))
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
        results = search.run_trial(trial.params, folder, callbacks=[report])
        trial.set_user_attr("seconds", round(time.perf_counter() - started, 1))
        if report.pruned:
            raise optuna.TrialPruned()
        return results[report.metric]

    if remaining:
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        study.optimize(objective, n_trials=remaining, catch=(NonFiniteLossError,))
    if not any(t.state == TrialState.COMPLETE for t in study.trials):
        raise UserError(f"no trial of {search.out / 'study.db'} finished (all pruned or failed); see the trial folders")
    best = study.best_trial
    trials = [{"number": t.number, "state": t.state.name, "validation": t.value, "params": t.params,
               "folder": t.user_attrs.get("folder"), "seconds": t.user_attrs.get("seconds"),
               "resumes": t.user_attrs.get("resumes")} for t in study.trials]
    return {"trial": best.number, "validation": best.value, "flags": best.user_attrs["flags"]}, trials


def _with_ray(search: Search, n_trials: int) -> tuple[dict, list[dict]]:
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


def _tune(search: Search, n_trials: int) -> tuple[dict, list[dict]]:
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    def trainable(config: dict) -> None:
        folder = f"trial-{tune.get_context().get_trial_id()}"
        report = ReportToRay()
        results = search.run_trial(config, folder, callbacks=[report])
        tune.report({"objective": results[report.metric], "folder": folder, "finished": True})  # "done": Ray's key

    gpus = 1 if ray.cluster_resources().get("GPU") else 0
    resources = {"cpu": 1, "gpu": 1} if gpus else {"cpu": max(1, int(ray.cluster_resources().get("CPU", 1)))}
    path = search.out / "ray"
    runnable = tune.with_resources(trainable, resources)
    if tune.Tuner.can_restore(str(path)):
        tuner = tune.Tuner.restore(str(path), runnable, resume_unfinished=True, resume_errored=True)
    else:
        algorithm = OptunaSearch(space=partial(space, training=search.training, augmentation=search.augmentation,
                                               given=search.given),  # (saved with the experiment: no lambda)
                                 metric="objective", mode="max", seed=search.training.seed,
                                 points_to_evaluate=[recipe_values(search.training, search.augmentation, search.given)])
        tuner = tune.Tuner(runnable, tune_config=tune.TuneConfig(
            metric="objective", mode="max", num_samples=n_trials, search_alg=algorithm,
            # rungs at 1, 4, 16, ... steps (of those reported); no step limit of its own (the run has --max_steps)
            scheduler=ASHAScheduler(time_attr="step", grace_period=1, reduction_factor=4, max_t=2**40,
                                    stop_last_trials=False)),
            run_config=tune.RunConfig(name="ray", storage_path=str(search.out), verbose=0))
    grid = tuner.fit()
    finished = [r for r in grid if r.metrics and r.metrics.get("finished")]
    if not finished:
        raise UserError(f"no trial of {path} finished (all stopped or failed); see the trial folders")
    best = max(finished, key=lambda r: r.metrics["objective"])
    trials = [{"number": (r.metrics or {}).get("trial_id"), "validation": (r.metrics or {}).get("objective"),
               "state": "ERROR" if r.error else "COMPLETE" if (r.metrics or {}).get("finished") else "STOPPED",
               "params": r.config, "folder": f"trial-{(r.metrics or {}).get('trial_id')}"} for r in grid]
    return {"trial": best.metrics.get("trial_id"), "validation": best.metrics["objective"],
            "flags": flags_of(best.config)}, trials


def _counts(trial, resumed: set[int]) -> bool:
    """Whether a stored trial counts towards --n_trials: finished, and not one that a kill interrupted (`resumed`:
    the trials another one runs again)."""
    from optuna.trial import TrialState

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
