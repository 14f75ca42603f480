"""`python -m hf_transfer search`: trials are ordinary runs chosen on validation only, the study continues after a
kill without repeating finished trials, and the best trial becomes an ordinary run folder."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from helpers import make_checkpoint, random_images
from transformers import pipeline

from hf_transfer.commands.tools import main as tools
from hf_transfer.errors import run_cli

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
def test_three_trials_choose_on_validation_and_the_best_becomes_a_run(architecture, tmp_path):
    out = tmp_path / "search"
    tools(["search", *search_flags(architecture, out)])
    stored = trials(out)
    assert [t.state.name for t in stored] == ["COMPLETE"] * 3
    assert len({t.params["learning_rate"] for t in stored}) == 3  # three different proposals
    for t in stored:  # each trial an ordinary run folder, scored on validation, never tested
        run = out / t.user_attrs["folder"]
        assert json.loads((run / "eval_results.json").read_text())["eval_accuracy"] == t.value
        assert not (run / "test_results.json").exists()
    best = max(stored, key=lambda t: t.value)
    assert best.value >= 0.5  # ten classes: chance is 0.1, and the best of three trained ResNets is far above it
    summary = json.loads((out / "search_results.json").read_text())
    assert summary["best"]["trial"] == best.number and summary["best"]["flags"] == best.user_attrs["flags"]
    # The best trial's flags trained again as an ordinary run: the same model (validation accuracy), tested once.
    run = out / "best"
    assert json.loads((run / "eval_results.json").read_text())["eval_accuracy"] == best.value
    test = json.loads((run / "test_results.json").read_text())["test_accuracy"]
    assert summary["best"]["test_accuracy"] == test
    assert (run / "README.md").is_file() and "--learning_rate" in json.loads((run / "run_args.json").read_text())["argv"]
    scores = pipeline("image-classification", model=str(run), top_k=10)(random_images(1)[0])
    assert sorted(s["label"] for s in scores) == [str(d) for d in range(10)]


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
        ([*base, "--n_trials", "2", "--do_train", "false"], "search trains: not with --do_train false"),
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
