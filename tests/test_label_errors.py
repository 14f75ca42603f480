"""`python -m hf_transfer label-errors RUN_DIR`: on the faulty digits (tests/faulty_data.py: 5% of the training labels
flipped on purpose, and 30 test images leaked into train, which the run's data check reports), the flagged set finds
the flipped files (precision and recall >= 0.5 at the default cut), out of sample; a second call reuses the folds;
what it cannot check is refused in one line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from faulty_data import faulty_digits

from hf_transfer.cli.tools import main as tools
from hf_transfer.errors import run_cli

pytest.importorskip("cleanlab")

# The recipe of the benchmark (benchmarks/label_errors.py), shortened to 8 epochs: each fold trains 80 steps.
RECIPE = ["--model", "resnet18", "--from_scratch", "--image_size", "16", "--num_train_epochs", "8",
          "--min_train_steps", "0", "--disable_tqdm", "true", "--dataloader_num_workers", "0", "--report_to", "none",
          "--save_total_limit", "1", "--seed", "0"]


@pytest.fixture(scope="module")
def noisy_run(tmp_path_factory):
    """A run on the noisy digits started from the data's folder with relative paths, and its label errors found
    from another working folder (the tool reads the run's folders whole from its record)."""
    import run_finetune

    root = tmp_path_factory.mktemp("noisy-digits")
    data = faulty_digits(root / "data", size=16)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        run_finetune.main([*RECIPE, "--train_dir", "data/train", "--validation_dir", "data/validation",
                           "--test_dir", "data/test", "--output_dir", "run"])
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(elsewhere)
        assert run_cli(tools, ["label-errors", str(root / "run")]) == 0
    return root / "run", data


def images_in(folder: str) -> int:
    return sum(1 for path in Path(folder).rglob("*") if path.is_file())


def flagged_files(result: dict) -> list[str]:
    return [image["file"] for image in result["images"]]


@pytest.mark.slow
def test_flipped_labels_are_found_out_of_sample(noisy_run, capsys):
    run, data = noisy_run
    result = json.loads((run / "label_errors.json").read_text())
    files = flagged_files(result)
    hits = sum(f in data.flipped for f in files)
    precision, recall = hits / len(files), hits / len(data.flipped)
    print(f"flagged {len(files)}, of them flipped {hits}: precision {precision:.2f}, recall {recall:.2f}")
    assert precision >= 0.5 and recall >= 0.5, (precision, recall)
    # The same run's data check (at its start) reported the leaked test images, byte copies and re-encoded ones.
    leaks = json.loads((run / "data_check.json").read_text())["leaks"]
    assert leaks == {"exact": sum(leak.kind == "exact" for leak in data.leaks),
                     "near": sum(leak.kind == "near" for leak in data.leaks)} == {"exact": 20, "near": 10}
    train, validation = images_in(data.train), images_in(data.validation)
    assert result["checked"] == train + validation and result["flagged"] == len(files)
    assert result["splits"]["train"]["checked"] == train and result["splits"]["validation"]["checked"] == validation
    first = result["images"][0]
    assert set(first) == {"split", "row", "file", "given", "suggested", "given_probability", "suggested_probability"}
    assert first["given"] != first["suggested"] and first["given_probability"] < first["suggested_probability"]
    given = sorted(image["given_probability"] for image in result["images"])
    assert [image["given_probability"] for image in result["images"]] == given  # most disputed first
    # A flipped file is stored under its given class: the list names it so.
    assert all(Path(image["file"]).parent.name == image["given"] for image in result["images"])


@pytest.mark.slow
def test_every_training_image_is_scored_by_a_fold_that_did_not_train_on_it(noisy_run):
    from hf_transfer.run import record
    from hf_transfer.tools.label_errors import DEFAULT_FOLDS, FOLDER, PROBABILITIES, Scored

    run, data = noisy_run
    folds = [Scored.load(run / FOLDER / f"fold-{k}" / PROBABILITIES) for k in range(1, DEFAULT_FOLDS + 1)]
    held = np.concatenate([f.rows for f in folds])
    assert sorted(held.tolist()) == list(range(images_in(data.train)))  # each training image held out by exactly one fold
    # Each fold's run trained on the others only: its record says how many images it trained on.
    assert not (run / FOLDER / "fold-1" / "run").exists()  # removed without --keep_fold_runs
    assert record.read(run)["command"] == "finetune"
    # Out of sample, the flipped images are mostly disagreed with: far below the in-sample fit of the run.
    accuracy = np.mean(np.concatenate([f.probabilities.argmax(1) == f.labels for f in folds]))
    assert 0.7 < accuracy < 0.97, accuracy


@pytest.mark.slow
def test_a_second_call_reuses_the_folds_and_gives_the_same_list(noisy_run, capsys, monkeypatch):
    from hf_transfer.run import pipeline

    run, _ = noisy_run
    before = json.loads((run / "label_errors.json").read_text())
    monkeypatch.setattr(pipeline.FineTune, "run", lambda self: pytest.fail("a finished fold was trained again"))
    assert run_cli(tools, ["label-errors", str(run)]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith(f"{before['flagged']} of {before['checked']} images flagged; the most disputed: ")
    assert json.loads((run / "label_errors.json").read_text()) == before


@pytest.mark.slow
def test_runs_it_cannot_check_are_refused_in_one_line(noisy_run, tmp_path, capsys):
    import run_finetune

    run, data = noisy_run
    evaluated = tmp_path / "eval"
    run_finetune.main(["--model_name_or_path", str(run), "--train_dir", data.train, "--validation_dir",
                       data.validation, "--test_dir", data.test, "--do_train", "false", "--output_dir",
                       str(evaluated), "--disable_tqdm", "true", "--report_to", "none"])
    partial = tmp_path / "partial"
    partial.mkdir()
    shutil.copy(run / "run_args.json", partial / "run_args.json")
    cases = [(evaluated, "is an evaluation-only run (--do_train false)"),
             (partial, "is not a finished run (no all_results.json or model.safetensors)"),
             (tmp_path / "nowhere", "is not a directory")]
    for folder, message in cases:
        capsys.readouterr()
        assert run_cli(tools, ["label-errors", str(folder)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and message in err and "\n" not in err, err
    assert not (evaluated / "label-errors").exists() and not (partial / "label-errors").exists()


@pytest.mark.slow
@pytest.mark.parametrize("flag, message", [
    ("multi_label", "the run has several labels per image: confident learning here judges one given class per image"),
    ("streaming", "the run streamed its training split (--streaming)"),
])
def test_multi_label_and_streamed_runs_are_refused_in_one_line(noisy_run, tmp_path, capsys, flag, message):
    run, _ = noisy_run
    saved = json.loads((run / "run_args.json").read_text())
    saved["resolved"]["data"][flag] = True
    (tmp_path / "run_args.json").write_text(json.dumps(saved))
    for name in ("all_results.json", "model.safetensors"):
        shutil.copy(run / name, tmp_path / name)
    assert run_cli(tools, ["label-errors", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err, err
    assert not (tmp_path / "label-errors").exists()


def test_flags_are_checked_before_anything_loads(capsys):
    with pytest.raises(SystemExit) as exit_:
        tools(["label-errors", "some-run", "--fold", "3"])
    assert exit_.value.code == 2
    assert "did you mean --folds?" in capsys.readouterr().err
    assert run_cli(tools, ["label-errors", "some-run", "--folds", "1"]) == 2
    assert "--folds must be >= 2" in capsys.readouterr().err


def test_the_help_states_the_default_folds():
    from hf_transfer.cli.tools import tools_parser
    from hf_transfer.tools.label_errors import DEFAULT_FOLDS

    folds = next(a for a in tools_parser()[1]["label-errors"]._actions if a.dest == "folds")
    assert f"default {DEFAULT_FOLDS}:" in folds.help


def test_folds_are_stratified_and_cover_every_row():
    from hf_transfer.tools.label_errors import fold_rows

    rows = np.arange(100, 400)
    labels = np.repeat(np.arange(3), 100)
    folds = fold_rows(rows, labels, 3, seed=0)
    assert sorted(np.concatenate(folds).tolist()) == rows.tolist()
    for held in folds:  # a third of each class
        assert set(np.bincount(labels[held - 100], minlength=3).tolist()) <= {33, 34}
    assert [f.tolist() for f in fold_rows(rows, labels, 3, seed=0)] == [f.tolist() for f in folds]
