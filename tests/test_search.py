"""`python -m hf_transfer search`: trials are ordinary runs chosen on validation only, the study continues after a
kill without repeating finished trials, and the best trial becomes an ordinary run folder."""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import optuna
import pytest
import torch
from helpers import make_checkpoint, random_images
from transformers import pipeline

from hf_transfer.cli import distill, finetune
from hf_transfer.cli.tools import main as tools
from hf_transfer.errors import UserError, run_cli
from hf_transfer.tasks.classification import MultiLabel, SingleLabel, check_metric, reported_metrics
from hf_transfer.tools.search import Finished, Objective, choose, flags_of, open_study, ran

ROOT = Path(__file__).resolve().parents[1]


def search_flags(architecture, out, *extra):
    """A ResNet from scratch on the real digits at 16 px, 24 steps a trial, a checkpoint every 4."""
    return ["--model_name_or_path", architecture, "--from_scratch", "--dataset_name", "digits", "--image_size", "16",
            "--max_steps", "24", "--save_strategy", "steps", "--save_steps", "4", "--eval_strategy", "steps",
            "--eval_steps", "4", "--per_device_train_batch_size", "32", "--dataloader_num_workers", "0",
            "--disable_tqdm", "true", "--seed", "3", "--output_dir", str(out), *extra, "--n_trials", "3"]


def trials(out: Path) -> list:
    return optuna.load_study(study_name="search", storage=f"sqlite:///{out / 'study.db'}").trials


@pytest.fixture(scope="module")
def architecture(tmp_path_factory):
    return make_checkpoint("resnet", tmp_path_factory.mktemp("arch"), image_size=16)


@pytest.mark.slow
def test_three_trials_choose_on_validation_in_the_metrics_direction_and_the_best_becomes_a_run(architecture, tmp_path,
                                                                                               capsys):
    out = tmp_path / "search"
    base = search_flags(architecture, out)[:-2]
    # mAP is a metric of several labels per image: the first trial refuses it once the data is loaded, before it
    # trains, and a study none of whose trials trained starts afresh with the next command
    assert run_cli(tools, ["search", *base, "--metric_for_best_model", "map", "--n_trials", "3"]) == 2
    assert "(one class per image, 10 classes): choose one of accuracy" in capsys.readouterr().err.strip().splitlines()[-1]
    assert not list(out.glob("trial-*/checkpoint-*")) and not (out / "best").exists()

    tools(["search", *base, "--metric_for_best_model", "loss", "--n_trials", "3"])
    stored = trials(out)
    assert [t.state.name for t in stored] == ["COMPLETE"] * 3 and stored[0].params["learning_rate"] == 0.01  # recipe
    assert len({t.params["learning_rate"] for t in stored}) == 3  # three different proposals
    assert "label_smoothing_factor" not in stored[1].params  # (it raises the validation loss by design)
    for t in stored:  # each trial an ordinary run folder, scored on validation, never tested
        run = out / t.user_attrs["folder"]
        evaluated = json.loads((run / "eval_results.json").read_text())
        assert evaluated["eval_loss"] == t.value and not (run / "test_results.json").exists()
        assert t.user_attrs["loss_above_floor"] == pytest.approx(t.value)  # no label smoothing: the floor is 0
        # what the metric check accepts is what an evaluation reports
        assert {f"eval_{m}" for m in reported_metrics(SingleLabel(10))} <= set(evaluated)
    assert len({t.value for t in stored}) == 3
    best = min(stored, key=lambda t: t.value)  # a loss: the lowest is the best
    assert best.value < math.log(10) / 2  # ten classes: chance is ln 10, and the best of three trained ResNets is far below
    summary = json.loads((out / "search_results.json").read_text())
    assert summary["best"]["trial"] == best.number and summary["best"]["flags"] == best.user_attrs["flags"]
    assert summary["objective"] == "the lowest loss" and summary["best"]["validation_images"] == evaluated["eval_samples"]
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith(
        f"best trial {best.number}: validation loss {best.value:.4f} on {evaluated['eval_samples']} images, with")
    # The best trial's flags trained again as an ordinary run: the same model (validation loss), tested once.
    run = out / "best"
    assert json.loads((run / "eval_results.json").read_text())["eval_loss"] == best.value
    test = json.loads((run / "test_results.json").read_text())["test_accuracy"]
    assert summary["best"]["test_accuracy"] == test >= 0.5
    assert (run / "README.md").is_file() and "--learning_rate" in json.loads((run / "run_args.json").read_text())["argv"]
    scores = pipeline("image-classification", model=str(run), top_k=10)(random_images(1)[0])
    assert sorted(s["label"] for s in scores) == [str(d) for d in range(10)]

    # `eval_loss` is the same metric: the same study, finished, and best/ as it is
    before = {p: p.stat().st_mtime_ns for p in out.glob("*/all_results.json")}
    tools(["search", *base, "--metric_for_best_model", "eval_loss", "--n_trials", "3"])
    assert len(trials(out)) == 3 and {p: p.stat().st_mtime_ns for p in out.glob("*/all_results.json")} == before


@pytest.mark.slow
def test_a_continued_study_with_a_new_best_trains_it_as_best_and_says_when_trials_tie(architecture, tmp_path,
                                                                                       capsys, caplog):
    out = tmp_path / "search"
    base = search_flags(architecture, out)[:-2]
    tools(["search", *base, "--n_trials", "1"])  # the recipe, trained again as best/
    first = trials(out)[0]
    first_test = json.loads((out / "best" / "test_results.json").read_text())["test_accuracy"]
    images = first.user_attrs["images"]
    assert first.value < 1 and images == json.loads((out / "best" / "eval_results.json").read_text())["eval_samples"]
    # Two better trials, stored as finished ones are: the same validation score, the second with the lower loss above
    # its floor (their run folders are not needed: best/ trains the best one's flags).
    study = optuna.load_study(study_name="search", storage=f"sqlite:///{out / 'study.db'}")
    for number, (lr, loss) in enumerate(((0.02, 0.5), (0.03, 0.1)), start=1):
        params = {**first.params, "learning_rate": lr}
        study.add_trial(optuna.trial.create_trial(
            params=params, distributions=first.distributions, value=1.0,
            user_attrs={"folder": f"trial-{number:03d}", "flags": flags_of(params), "metric": "eval_accuracy",
                        "images": images, "loss_above_floor": loss}))
    capsys.readouterr()

    tools(["search", *base, "--n_trials", "3"])  # nothing to run: best/ becomes trial 2's run
    summary = json.loads((out / "search_results.json").read_text())
    assert summary["best"]["trial"] == 2 and summary["best"]["tied_with"] == [1]
    assert summary["best"]["validation_images"] == images and len(summary["trials"]) == 3
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert (f"validation accuracy 1.0000 on {images} images, tied with trial 1 (chosen by the lowest validation loss "
            "above its floor)") in line
    argv = json.loads((out / "best" / "run_args.json").read_text())["argv"]
    assert argv[argv.index("--learning_rate") + 1] == "0.03"
    assert summary["best"]["test_accuracy"] == json.loads((out / "best" / "test_results.json").read_text())["test_accuracy"]
    # the previous best/ kept as it was, named after its trial's folder
    kept = out / "best-trial-000"
    assert json.loads((kept / "eval_results.json").read_text())["eval_accuracy"] == first.value
    assert json.loads((kept / "test_results.json").read_text())["test_accuracy"] == first_test

    before = {p: p.stat().st_mtime_ns for p in out.glob("*/all_results.json")}
    with caplog.at_level(logging.INFO):  # the same command again: the search is complete, nothing is trained
        tools(["search", *base, "--n_trials", "3"])
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/all_results.json")} == before
    assert "3 trial(s) done, 0 to run" in caplog.text and f"the run in {out / 'best'} is complete" in caplog.text
    assert json.loads((out / "search_results.json").read_text())["best"]["trial"] == 2


def test_a_trial_s_recorded_values_are_those_its_run_used():
    proposed = {"learning_rate": 0.005611516415334507, "weight_decay": 0.0007969454818643932, "augmentation": "none"}
    assert ran(proposed) == {"learning_rate": 0.005612, "weight_decay": 0.0007969, "augmentation": "none"}
    assert flags_of(ran(proposed)) == flags_of(proposed)


def test_trials_validation_cannot_tell_apart_are_chosen_by_their_loss_above_its_floor():
    def trial(number, score, loss, images=24):
        return Finished(number, score, [], f"trial-{number:03d}", "eval_accuracy", images, loss)

    by_accuracy = Objective("accuracy", maximize=True)
    best, tied = choose([trial(0, 1.0, 0.30), trial(1, 1.0, 0.10), trial(2, 23 / 24, 0.01)], by_accuracy)
    assert (best.trial, [t.trial for t in tied]) == (1, [0, 1])
    # 0.02 of mAP on 24 images is less than one image's share (1/24): a tie; on 240 images it is not
    by_map = Objective("map", maximize=True)
    assert choose([trial(0, 0.95, 0.3), trial(1, 0.93, 0.1)], by_map)[0].trial == 1
    assert choose([trial(0, 0.95, 0.3, 240), trial(1, 0.93, 0.1, 240)], by_map)[0].trial == 0
    # a loss: the lowest; only an equal one ties, and then the earlier trial
    by_loss = Objective("loss", maximize=False)
    assert choose([trial(0, 0.70, None), trial(1, 0.69, None)], by_loss)[0].trial == 1
    assert choose([trial(0, 0.70, None), trial(1, 0.70, None)], by_loss)[0].trial == 0
    # a study continued on other validation data: refused, not compared
    with pytest.raises(UserError, match="scored on validation splits of 12 and 72 images: their scores do not compare"):
        choose([trial(0, 0.70, None, 12), trial(1, 0.60, None, 72)], by_loss)
    # the floor: a prediction equal to the label-smoothed target scores exactly it (0 without smoothing)
    single, multi = SingleLabel(5), MultiLabel(4)
    target = torch.full((3, 5), 0.2 / 5) + torch.eye(5)[[0, 2, 4]] * 0.8
    assert single.loss(target.log(), torch.tensor([0, 2, 4]), label_smoothing=0.2).item() == pytest.approx(
        single.loss_floor(0.2)) and single.loss_floor(0.0) == 0.0
    labels = torch.tensor([[1.0, 0, 1, 0], [0, 0, 0, 1]])
    assert multi.loss(torch.logit(labels * 0.9 + 0.05), labels, label_smoothing=0.1).item() == pytest.approx(
        multi.loss_floor(0.1))


def test_the_study_prunes_and_continues_in_the_direction_of_its_metric(tmp_path):
    study = open_study(tmp_path, Objective("loss", maximize=False), seed=0)
    for loss in (1.0, 1.1, 1.2, 1.3):
        finished = study.ask()
        finished.report(loss, 8)
        study.tell(finished, loss)
    worse, better = study.ask(), study.ask()
    worse.report(2.0, 8)
    better.report(0.9, 8)
    assert worse.should_prune() and not better.should_prune()  # a high loss is the worst quarter, a low one is not
    # `eval_loss` is the same objective; another metric or direction would mix scores that do not compare
    spelled = Objective.of(SimpleNamespace(metric_for_best_model="eval_loss", greater_is_better=False))
    assert open_study(tmp_path, spelled, seed=0).direction.name == "MINIMIZE"
    with pytest.raises(UserError, match="chose its trials by the lowest loss, this command by the highest accuracy.*"
                                        "pass --metric_for_best_model loss,"):
        open_study(tmp_path, Objective("accuracy", maximize=True), seed=0)
    with pytest.raises(UserError, match="by the lowest loss, this command by the highest loss.*pass --greater_is_better "
                                        "false,"):  # the direction alone differs: the flag that says it
        open_study(tmp_path, Objective("loss", maximize=True), seed=0)


@pytest.mark.slow
def test_every_command_refuses_a_metric_its_evaluations_do_not_report_before_training(architecture, tmp_path, capsys):
    run = tmp_path / "run"
    flags = search_flags(architecture, run)[:-2]
    multi_label = [("digits-multilabel" if f == "digits" else f) for f in flags]
    cases = [  # the Trainer would raise a KeyError at the first evaluation, after training time was spent
        (finetune.main, [*flags, "--metric_for_best_model", "acc"],
         "(one class per image, 10 classes): choose one of accuracy, f1, f1_macro, loss, precision, precision_macro, "
         "recall, recall_macro, top5_accuracy; did you mean accuracy?"),
        (distill.main, [*flags, "--teacher_model_name_or_path", architecture, "--metric_for_best_model", "map"],
         "(one class per image, 10 classes)"),
        (distill.main, [*flags, "--teacher_model_name_or_path", architecture, "--metric_for_best_model", "kd_los"],
         "; did you mean kd_loss?"),  # the distillation term on validation chooses a student: it is a metric there
        (finetune.main, [*multi_label, "--metric_for_best_model", "eval_top5_accuracy"],
         "(several labels per image): choose one of accuracy, f1, f1_macro, loss, map, map_micro,"),
        (finetune.main, [*flags, "--metric_for_best_model", "raw_accuracy"], "; did you mean accuracy?"),
    ]
    for main, argv, message in cases:
        assert run_cli(main, argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("error: --metric_for_best_model ") and message in err[-1], err[-3:]
        assert not run.exists()  # nothing trained, nothing written
    # the weight EMA's raw weights are scored too: their metrics can choose
    check_metric("raw_accuracy", SingleLabel(10), ema=True)
    check_metric("eval_raw_map", MultiLabel(4), ema=True)
    # a distilled student's evaluations also report the distillation term, which chooses it by default
    check_metric("kd_loss", SingleLabel(10), also=("kd_loss",))
    with pytest.raises(UserError, match="did you mean kd_loss"):
        check_metric("kd_los", SingleLabel(10), also=("kd_loss",))


@pytest.mark.slow
def test_a_killed_search_continues_without_repeating_finished_trials(architecture, tmp_path, caplog):
    out = tmp_path / "search"
    flags = [*search_flags(architecture, out), "--n_trials", "2"]
    env = {**os.environ, "TEST_STEP_SLEEP": "0.2", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "2"}
    process = subprocess.Popen([sys.executable, str(ROOT / "tests" / "instrumented.py"), "search", *flags], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while not (out / "trial-001" / "checkpoint-8").is_dir():  # trial 0 done, trial 1 a third of the way
        assert process.poll() is None and time.time() < deadline, process.communicate()[1][-3000:]
        time.sleep(0.05)
    process.kill()
    process.wait()
    first = trials(out)[0]
    assert first.state.name == "COMPLETE" and not (out / "trial-001" / "model.safetensors").exists()
    finished_at = (out / "trial-000" / "all_results.json").stat().st_mtime_ns

    with caplog.at_level(logging.INFO):  # the same command again (here, in-process)
        tools(["search", *flags])
    stored = trials(out)
    # trial 0 kept as it was; trial 1 (killed) failed and queued again as trial 2, in its own folder, resumed there
    assert [t.state.name for t in stored] == ["COMPLETE", "FAIL", "COMPLETE"]
    assert stored[0].value == first.value and (out / "trial-000" / "all_results.json").stat().st_mtime_ns == finished_at
    rerun = next(t for t in stored if t.user_attrs.get("resumes") == 1)
    assert rerun.params == stored[1].params and rerun.user_attrs["folder"] == "trial-001"
    assert f"resuming from checkpoint {out / 'trial-001' / 'checkpoint-'}" in caplog.text
    summary = json.loads((out / "search_results.json").read_text())
    assert summary["best"]["validation"] == max(t.value for t in stored if t.value is not None)
    assert (out / "best" / "test_results.json").is_file()


def test_search_refusals_are_one_line(architecture, tmp_path, capsys):
    base = search_flags(architecture, tmp_path / "s")[:-2]
    cases = [
        ([*base, "--n_trials", "0"], "--n_trials must be >= 1"),
        ([*base, "--n_trials", "2", "--learning_rat", "0.1"], "did you mean --learning_rate?"),
        ([*(a for a in base if a != "--from_scratch"), "--n_trials", "2", "--do_train", "false"],
         "search trains: not with --do_train false"),
        ([*base, "--n_trials", "2", "--eval_strategy", "no", "--do_eval", "false"], "search chooses its trials on the valid"),
        ([*base, "--n_trials", "2", "--metric_for_best_model", "acc"], "any run reports: choose one of accuracy, f1, "),
        ([*base, "--n_trials", "2", "--metric_for_best_model", "acc"], "; did you mean accuracy?"),
        ([*base, "--n_trials", "2", "--overwrite_output_dir"], "leave --overwrite_output_dir out; to start afresh"),
        (base, "the following arguments are required: --n_trials"),
    ]
    for argv, message in cases:
        try:
            code = run_cli(tools, ["search", *argv])
        except SystemExit as exc:  # argparse's own
            code = exc.code
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and message in err[0], (argv, err)
    assert not (tmp_path / "s").exists()  # nothing written for a refused search


@pytest.mark.slow
def test_ray_tune_runs_the_same_trials_in_parallel_and_trains_the_best(architecture, tmp_path):
    pytest.importorskip("ray.tune")
    out = tmp_path / "search"
    argv = [*search_flags(architecture, out)[:-2], "--max_steps", "12"]
    tools(["search", *argv, "--n_trials", "2", "--backend", "ray"])
    summary = json.loads((out / "search_results.json").read_text())
    assert summary["backend"] == "ray" and len(summary["trials"]) == 2
    finished = [t for t in summary["trials"] if t["state"] == "COMPLETE"]
    assert finished and summary["best"]["validation"] == max(t["validation"] for t in finished) >= 0.5
    assert any(t["params"]["learning_rate"] == 0.01 for t in summary["trials"])  # the recipe is one of them
    for t in finished:  # each trial an ordinary run folder, never tested
        assert (out / t["folder"] / "eval_results.json").is_file() and not (out / t["folder"] / "test_results.json").exists()
    assert (out / "best" / "test_results.json").is_file() and (out / "ray").is_dir()
    # the same command again restores the finished experiment: nothing is trained again
    before = {p: p.stat().st_mtime_ns for p in out.glob("trial-*/all_results.json")}
    tools(["search", *argv, "--n_trials", "2", "--backend", "ray"])
    assert {p: p.stat().st_mtime_ns for p in out.glob("trial-*/all_results.json")} == before
