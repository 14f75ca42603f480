"""Hub push (the client replaced at its API boundary), W&B / TensorBoard tracking, the comparison report."""

import fnmatch
import json
import re
from pathlib import Path

import pytest
import yaml
from conftest import quick_flags
from helpers import FakeHub

import run_distill
import run_finetune
from hf_transfer.cli.tools import main as tools
from hf_transfer.errors import UserError
from hf_transfer.integrations.hub import IGNORE
from hf_transfer.tools.report import build_report, count_parameters


def card_metadata(card: str) -> dict:
    return yaml.safe_load(card.split("---")[1])


def test_distilled_model_is_pushed_with_card_and_without_teacher_or_optimizer_state(
        cifar_teacher, tiny_resnet, cifar_like, tmp_path, monkeypatch):
    hub = FakeHub(monkeypatch)
    out = tmp_path / "student"
    results = run_distill.main(["--teacher_model_name_or_path", cifar_teacher, "--student_model_name_or_path",
                                tiny_resnet, "--dataset_name", cifar_like, "--output_dir", str(out),
                                "--augmentation", "none", "--cache_teacher_logits", "--num_train_epochs", "1",
                                "--push_to_hub", "--hub_model_id", "me/tiny-student", "--hub_private_repo", "true",
                                *quick_flags()])
    assert hub.repos == [{"repo_id": "me/tiny-student", "private": True}]
    uploaded = set(hub.uploaded)
    assert {"model.safetensors", "config.json", "preprocessor_config.json", "README.md", "test_results.json",
            "test_confusion_matrix.png"} <= uploaded
    assert not [f for f in uploaded if f.startswith(("checkpoint-", "_teacher_logits")) or f.endswith((".pt", ".bin"))]
    assert list(out.glob("_teacher_logits-*")) and list(out.glob("checkpoint-*"))  # kept locally

    card = (out / "README.md").read_text()
    metadata = card_metadata(card)
    metrics = {m["type"]: m["value"] for m in metadata["model-index"][0]["results"][0]["metrics"]}
    assert metrics["accuracy"] == round(results["test_accuracy"], 4)
    assert metadata["pipeline_tag"] == "image-classification" and "knowledge-distillation" in metadata["tags"]
    assert metadata["model-index"][0]["name"] == "me/tiny-student"
    for text in ("| alpha | 0.5 |", "| temperature | 2.0 |", f"| teacher | {cifar_teacher} |",
                 'pipeline("image-classification", model="me/tiny-student")', "| freezing | none |"):
        assert text in card, text


def test_a_failed_push_keeps_the_run_and_prints_the_command_to_push_later(tiny_resnet, cifar_like, tmp_path,
                                                                         monkeypatch):
    FakeHub(monkeypatch, fail_upload=True)
    out = tmp_path / "run"
    with pytest.raises(UserError) as info:
        run_finetune.main(["--model_name_or_path", tiny_resnet, "--dataset_name", cifar_like, "--output_dir", str(out),
                           "--max_steps", "2", "--push_to_hub", "--hub_model_id", "me/run", *quick_flags()])
    message = str(info.value)
    assert "the push to me/run failed (Hub unreachable)" in message
    assert f"python -m hf_transfer push {out} --hub_model_id me/run" in message
    assert (out / "model.safetensors").exists() and (out / "test_results.json").exists()

    hub = FakeHub(monkeypatch)  # later, with the network back
    tools(["push", str(out), "--hub_model_id", "me/run"])
    assert hub.repos == [{"repo_id": "me/run", "private": None}] and "model.safetensors" in hub.uploaded


@pytest.mark.parametrize("situation, message", [
    ("offline", "cannot work with HF_HUB_OFFLINE set; train without --push_to_hub and push later with: python -m hf_transfer push"),
    ("no token", "--push_to_hub needs a Hugging Face token"),
    ("refused", "the Hub refused the token or cannot be reached"),
])
def test_a_push_that_cannot_work_is_refused_before_training(situation, message, tiny_resnet, cifar_like, tmp_path,
                                                            monkeypatch):
    FakeHub(monkeypatch, whoami_error=PermissionError("401 Unauthorized") if situation == "refused" else None)
    if situation == "offline":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    if situation == "no token":
        monkeypatch.setattr("hf_transfer.integrations.hub.get_token", lambda: None)
    out = tmp_path / "run"
    with pytest.raises(UserError, match=message):
        run_finetune.main(["--model_name_or_path", tiny_resnet, "--dataset_name", cifar_like, "--output_dir", str(out),
                           "--push_to_hub", "--hub_model_id", "me/run", *quick_flags()])
    assert not (out / "model.safetensors").exists()


def test_push_command_refuses_an_unfinished_run(tmp_path):
    with pytest.raises(UserError, match="is not a finished run"):
        tools(["push", str(tmp_path), "--hub_model_id", "me/x"])


def test_wandb_offline_run_holds_results_config_and_loss_terms(cifar_teacher, tiny_resnet, cifar_like, tmp_path,
                                                              monkeypatch):
    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_PROJECT", "hf-transfer-tests")
    monkeypatch.setenv("WANDB_SILENT", "true")
    try:
        results = run_distill.main(["--teacher_model_name_or_path", cifar_teacher, "--student_model_name_or_path",
                                    tiny_resnet, "--dataset_name", cifar_like, "--output_dir", str(tmp_path / "o"),
                                    "--num_train_epochs", "1", *quick_flags(), "--report_to", "wandb",
                                    "--run_name", "tiny-distill", "--backbone_lr_scale", "0.1", "--logging_steps", "2"])
        run = wandb.run
        assert run is not None and run.name == "tiny-distill" and run.project == "hf-transfer-tests"
        assert run.summary["eval/accuracy"] == results["eval_accuracy"]
        assert run.summary["test/accuracy"] == results["test_accuracy"]
        assert run.summary["test/agreement"] == results["test_agreement"]
        for key in ("train/kd_loss", "train/ce_loss", "train/learning_rate/head", "train/learning_rate/backbone"):
            assert key in run.summary.keys(), key
        assert run.config["model_name_or_path"] == tiny_resnet
        assert run.config["teacher_model_name_or_path"] == cifar_teacher and run.config["alpha"] == 0.5
        assert run.config["hub_token"] == "<HUB_TOKEN>"  # TrainingArguments masks it
        assert {"distillation", "cnn"} <= set(run.tags)
    finally:
        wandb.finish()


def test_wandb_without_account_or_offline_mode_fails_before_training(tiny_resnet, cifar_like, tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(UserError, match="--report_to wandb needs a W&B account .* or WANDB_MODE=offline"):
        run_finetune.main(["--model_name_or_path", tiny_resnet, "--dataset_name", cifar_like, "--output_dir",
                           str(tmp_path / "o"), "--report_to", "wandb", *quick_flags()[:-2]])
    assert not (tmp_path / "o" / "model.safetensors").exists()


def test_tensorboard_event_files_hold_the_eval_accuracy(tiny_resnet, cifar_like, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "o"
    results = run_finetune.main(["--model_name_or_path", tiny_resnet, "--dataset_name", cifar_like, "--output_dir",
                                 str(out), "--num_train_epochs", "2", *quick_flags()[:-2], "--report_to", "tensorboard"])
    event_dirs = {p.parent for p in out.rglob("events.out.tfevents.*")}
    assert event_dirs
    accuracies = []
    for directory in event_dirs:
        events = EventAccumulator(str(directory))
        events.Reload()
        if "eval/accuracy" in events.Tags()["scalars"]:
            accuracies += [e.value for e in events.Scalars("eval/accuracy")]
    assert len(accuracies) >= 2 and pytest.approx(results["eval_accuracy"]) in accuracies


def test_trackio_offline(tiny_resnet, cifar_like, tmp_path):
    pytest.importorskip("trackio")  # optional: not a dependency (it pins pillow<13)
    results = run_finetune.main(["--model_name_or_path", tiny_resnet, "--dataset_name", cifar_like, "--output_dir",
                                 str(tmp_path / "o"), "--max_steps", "2", *quick_flags()[:-2], "--report_to", "trackio"])
    assert results["test_samples"] == 48 and results["train_loss"] == results["train_loss"]  # not NaN


def test_comparison_report_is_made_of_the_runs_own_numbers(cifar_teacher, tiny_resnet, cifar_like, tmp_path):
    cnn = tmp_path / "resnet"
    run_finetune.main(["--model_name_or_path", tiny_resnet, "--dataset_name", cifar_like, "--output_dir", str(cnn),
                       "--num_train_epochs", "2", *quick_flags()])
    distilled = tmp_path / "distilled"
    run_distill.main(["--teacher_model_name_or_path", cifar_teacher, "--student_model_name_or_path", tiny_resnet,
                      "--dataset_name", cifar_like, "--output_dir", str(distilled), "--num_train_epochs", "2",
                      *quick_flags()])
    runs = [cifar_teacher, str(cnn), str(distilled)]
    report = tmp_path / "report"
    tools(["report", *runs, "--output", str(report)])

    summary = json.loads((report / "summary.json").read_text())
    for row, run in zip(summary, map(Path, runs)):
        test = json.loads((run / "test_results.json").read_text())
        train = json.loads((run / "train_results.json").read_text())
        evaluation = json.loads((run / "eval_results.json").read_text())
        assert row["test_accuracy"] == test["test_accuracy"] and row["test_f1"] == test["test_f1"]
        assert row["train_runtime_s"] == train["train_runtime"]
        assert row["train_images_per_s"] == train["train_samples_per_second"]
        assert row["eval_images_per_s"] == evaluation["eval_samples_per_second"]
        assert row["peak_memory_mb"] == train["train_peak_memory_mb"] > 0
        from transformers import AutoModelForImageClassification

        assert row["parameters_m"] * 1e6 == count_parameters(run) == sum(
            p.numel() for p in AutoModelForImageClassification.from_pretrained(run).parameters())
        state = json.loads((run / "trainer_state.json").read_text())
        best = [h for h in state["log_history"] if h.get("step") == state["best_global_step"] and "eval_accuracy" in h]
        assert row["epochs_to_best"] == round(best[0]["epoch"], 2)
    assert summary[2]["test_agreement"] == json.loads((distilled / "test_results.json").read_text())["test_agreement"]

    table = (report / "report.md").read_text()
    assert f"{summary[1]['test_accuracy']:.4f}" in table and "| resnet |" in table and "agreement" in table
    for image in ("curves.png", "confusion_matrices.png"):
        assert (report / image).read_bytes()[:4] == b"\x89PNG"


def test_report_needs_finished_runs(tmp_path):
    with pytest.raises(UserError, match="is not a finished run: train_results.json is missing"):
        build_report([tmp_path], tmp_path / "out")


DOCS = Path(__file__).resolve().parents[1] / "docs" / "hub-tracking-report.md"


def documented(first_cell: str) -> list[str]:
    """The backquoted names in the cells after `first_cell` of the docs' table row that starts with it."""
    row = next(line for line in DOCS.read_text().splitlines() if line.startswith(f"| {first_cell} |"))
    return [re.findall(r"`([^`]+)`", cell) for cell in row.strip("|").split("|")[1:]]


def matches(path: str, pattern: str) -> bool:
    """A documented name: a file name pattern (`*.pt`), or a folder (`runs/`) and everything in it."""
    if pattern.endswith("/"):
        return path.startswith(pattern)
    return any(fnmatch.fnmatch(part, pattern) for part in path.split("/"))


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["end", "every_save", "checkpoint", "all_checkpoints"])
def test_each_hub_strategy_uploads_what_the_docs_say(strategy, tiny_resnet, cifar_like, tmp_path, monkeypatch):
    """docs/hub-tracking-report.md's two tables, against what a run with the Hub client replaced uploads: at each
    save (the root's files, and the checkpoint's under its folder) and at the end (every file it holds that the
    docs say goes up, none they say stays local, none they do not name)."""
    hub = FakeHub(monkeypatch)
    out = tmp_path / "run"
    run_finetune.main(["--model_name_or_path", tiny_resnet, "--dataset_name", cifar_like, "--output_dir", str(out),
                       "--max_steps", "2", "--save_strategy", "steps", "--save_steps", "1", "--eval_strategy", "steps",
                       "--eval_steps", "1", "--push_to_hub", "--hub_model_id", "me/run", "--hub_strategy", strategy,
                       *quick_flags(), "--report_to", "tensorboard"])
    *during, final = hub.uploads
    root, checkpoint = documented(f"`{strategy}`" + (" (the default)" if strategy == "end" else ""))
    folder, files = (checkpoint[0], checkpoint[1:]) if checkpoint else (None, [])
    folders = [folder.replace("N", str(step)) for step in (1, 2)] if folder == "checkpoint-N/" else [folder]
    expected = {*root, *(f"{f}{name}" for f in folders if f for name in files)}
    assert {name for upload in during for name in upload["files"]} == expected
    assert len(during) == 2 * (bool(root) + bool(files))  # at each of the two saves

    goes_up, stays_local = documented("goes up")[0], documented("stays local")[0]
    local = [p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()]
    assert any(name.startswith("runs/") for name in local) and any(name.startswith("checkpoint-") for name in local)
    assert set(final["files"]) == {name for name in local if not any(matches(name, p) for p in stays_local)}
    assert all(any(matches(name, p) for p in goes_up) for name in final["files"]), final["files"]
    assert final["card"] is not None and all(upload["card"] is None for upload in during)


def test_ignore_patterns_cover_the_private_files():
    for name in ("checkpoint-10", "incomplete-checkpoint-12", "superseded-checkpoint-14", "run_args.json",
                 "_teacher_logits-abc.safetensors", "training_args.bin", "optimizer.pt", "data_check.json",
                 "data_check.html", "label_errors.json", "label-errors/fold-1/probabilities.npz"):
        assert any(fnmatch.fnmatch(name, p) for p in IGNORE), name
