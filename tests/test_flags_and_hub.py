"""Every flag does what it says (or is refused in one line), and the Hub gets the artifacts a user expects."""

import json
import logging

import numpy as np
import pytest
import yaml
from conftest import quick_flags
from helpers import FakeHub

import run_distill
import run_finetune
from hf_transfer.cli.tools import main as tools
from hf_transfer.config.fitting import fit_to_data
from hf_transfer.config.run_config import parse_arguments
from hf_transfer.errors import UserError, run_cli
from hf_transfer.integrations.tracking import check_tracking, forward_flops
from hf_transfer.models.loading import load_model
from hf_transfer.trainers.transfer_config import TransferConfig


def card_metadata(card: str) -> dict:
    return yaml.safe_load(card.split("---")[1])


def cli(main, argv, capsys) -> tuple[int, list[str]]:
    try:
        code = run_cli(main, argv)
    except SystemExit as exc:
        code = exc.code
    return code, [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]


# ---------------------------------------------------------------- flags that must work


@pytest.mark.slow
def test_evaluation_only_mode_scores_a_finished_run_exactly_as_its_own_test(digits_run, tmp_path):
    trained, results = digits_run
    out = tmp_path / "scored"
    scored = run_finetune.main(["--model_name_or_path", str(trained), "--dataset_name", "digits", "--do_train", "false",
                                "--do_predict", "--output_dir", str(out), "--dataloader_num_workers", "0"])
    own = json.loads((trained / "test_results.json").read_text())
    for key in ("test_accuracy", "test_loss", "test_f1", "test_f1_macro", "test_top5_accuracy", "test_samples"):
        assert scored[key] == own[key], key
    for name in ("test_confusion_matrix.json", "test_predictions.json"):
        assert (out / name).read_text() == (trained / name).read_text(), name
    assert not (out / "model.safetensors").exists() and not list(out.glob("checkpoint-*"))  # nothing trained or saved


def test_evaluation_only_mode_defaults_to_its_own_directory_and_refuses_what_makes_no_sense(tiny_resnet, capsys):
    assert parse_arguments(["--model_name_or_path", tiny_resnet, "--do_train", "false"]).training.output_dir.endswith(
        "-eval")
    code, err = cli(run_finetune.main, ["--model_name_or_path", tiny_resnet, "--do_train", "false", "--from_scratch"],
                    capsys)
    assert code == 2 and err == ["error: --do_train false evaluates a trained model as it is: not with --from_scratch "
                                 "(random weights) or --push_to_hub (nothing new to push)"]


def test_evaluating_a_checkpoint_folder_writes_beside_its_run_by_default(tiny_resnet, tmp_path, monkeypatch):
    """Every run has a checkpoint-209: the default output folder names the run it belongs to."""
    import shutil

    monkeypatch.chdir(tmp_path)
    shutil.copytree(tiny_resnet, tmp_path / "runs" / "photos")  # a finished run, and one of its checkpoints
    shutil.copytree(tiny_resnet, tmp_path / "runs" / "photos" / "checkpoint-209")

    def output_dir(model):
        flags = ["--model_name_or_path", model, "--dataset_name", "digits", "--do_train", "false"]
        return parse_arguments(flags).training.output_dir

    assert output_dir("runs/photos/checkpoint-209") == "runs/photos-checkpoint-209-digits-eval"
    assert output_dir(str(tmp_path / "runs" / "photos" / "checkpoint-209" / "")) == "runs/photos-checkpoint-209-digits-eval"
    assert output_dir("runs/photos") == "runs/photos-digits-eval"  # a run folder is its own name
    monkeypatch.chdir(tmp_path / "runs" / "photos")
    assert output_dir("checkpoint-209") == "runs/photos-checkpoint-209-digits-eval"


def test_evaluation_only_mode_needs_a_head_for_these_labels(tiny_resnet, cifar_like, tmp_path):
    with pytest.raises(UserError, match="head was made for other labels"):
        run_finetune.main(["--model_name_or_path", tiny_resnet, "--dataset_name", cifar_like, "--do_train", "false",
                           "--output_dir", str(tmp_path / "o")])


def test_save_strategy_no_trains_with_the_last_weights(tiny_resnet, cifar_like, tmp_path, caplog):
    out = tmp_path / "o"
    with caplog.at_level(logging.INFO):
        results = run_finetune.main(["--model_name_or_path", tiny_resnet, "--dataset_name", cifar_like,
                                     "--output_dir", str(out), "--num_train_epochs", "1", "--save_strategy", "no",
                                     *quick_flags()])
    assert "--save_strategy no: the run ends with its last weights" in caplog.text
    assert results["test_samples"] == 48 and (out / "model.safetensors").exists() and not list(out.glob("checkpoint-*"))


def test_one_strategy_given_and_the_other_follows_it():
    args = parse_arguments(["--eval_strategy", "steps", "--eval_steps", "7"]).training
    assert (args.save_strategy.value, args.save_steps, args.load_best_model_at_end) == ("steps", 7, True)


def test_two_user_flags_that_conflict_are_an_error(capsys):
    code, err = cli(run_finetune.main, ["--save_strategy", "no", "--load_best_model_at_end", "true"], capsys)
    assert code == 2 and len(err) == 1 and "load_best_model_at_end requires" in err[0]


@pytest.mark.parametrize("flags, message", [
    (["--optim", "galore_adamw"], "argument --optim: invalid choice: 'galore_adamw' (choose from 'adamw_torch'"),
    (["--enable_jit_checkpoint"], "--enable_jit_checkpoint is not needed"),
    (["--do_train", "false", "--push_to_hub"], "--do_train false evaluates a trained model as it is"),
])
def test_refused_flags_are_one_line_and_exit_2(flags, message, tmp_path, capsys):
    code, err = cli(run_finetune.main, ["--output_dir", str(tmp_path / "o"), *flags], capsys)
    assert code == 2 and len(err) == 1 and message in err[0], err


def test_distillation_does_not_take_do_train_false(capsys):
    code, err = cli(run_distill.main, ["--teacher_model_name_or_path", "x/y", "--do_train", "false"], capsys)
    assert code == 2 and "run_distill.py trains a student" in err[0]


def test_an_unsupported_optimizer_is_refused_by_the_config_too():
    with pytest.raises(ValueError, match="--optim galore_adamw is not supported here .* sgd"):
        TransferConfig(output_dir="x", optim="galore_adamw")


# ---------------------------------------------------------------- tracking


def test_wandb_credentials_are_found_where_wandb_finds_them(tmp_path, monkeypatch):
    for name in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    args = TransferConfig(output_dir="x", report_to="wandb")
    with pytest.raises(UserError, match="--report_to wandb needs a W&B account"):
        check_tracking(args)
    netrc = tmp_path / "netrc"
    netrc.write_text(f"machine api.wandb.ai\n  login user\n  password {'0123456789' * 4}\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc))
    check_tracking(args)  # wandb would log in with this key: no refusal


# ---------------------------------------------------------------- Hub artifacts


@pytest.fixture(scope="module")
def finished_run(tiny_resnet, tmp_path_factory):
    out = tmp_path_factory.mktemp("finished") / "run"
    run_finetune.main(["--model_name_or_path", tiny_resnet, "--dataset_name", "digits", "--max_train_samples", "60",
                       "--max_eval_samples", "30", "--image_size", "32", "--output_dir", str(out),
                       "--num_train_epochs", "1", *quick_flags()[:-2], "--report_to", "tensorboard"])
    return out


def test_push_later_renders_the_card_for_its_repo_and_branch(finished_run, monkeypatch):
    hub = FakeHub(monkeypatch)
    tools(["push", str(finished_run), "--hub_model_id", "me/digits", "--revision", "v1"])
    card = hub.uploads[-1]["card"]
    assert card_metadata(card)["model-index"][0]["name"] == "me/digits"
    assert 'pipeline("image-classification", model="me/digits")' in card and str(finished_run) not in card
    assert hub.branches == [("me/digits", "v1")] and hub.uploads[-1]["revision"] == "v1"
    uploaded = hub.uploads[-1]["files"]
    assert any(f.startswith("runs/") and "tfevents" in f for f in uploaded)  # the Hub's metrics tab reads them
    assert not [f for f in uploaded if f.endswith(".bin") or f.startswith("checkpoint-")]


def test_a_data_set_that_is_not_on_the_hub_is_described_not_claimed(finished_run):
    card = (finished_run / "README.md").read_text()
    metadata = card_metadata(card)
    assert "datasets" not in metadata
    assert metadata["model-index"][0]["results"][0]["dataset"]["type"] == "custom"
    assert "scikit-learn's bundled 8x8 handwritten digits (`--dataset_name digits`, not a Hub data set)" in card


def test_the_card_records_the_library_versions(finished_run):
    import transformers

    card = (finished_run / "README.md").read_text()
    assert "## Framework versions" in card and f"- transformers {transformers.__version__}" in card


def test_pushes_during_training_carry_no_pickles_and_no_card_but_the_runs(tiny_resnet, cifar_like, tmp_path,
                                                                         monkeypatch):
    hub = FakeHub(monkeypatch)
    run_finetune.main(["--model_name_or_path", tiny_resnet, "--dataset_name", cifar_like, "--output_dir",
                       str(tmp_path / "o"), "--num_train_epochs", "2", "--push_to_hub", "--hub_model_id", "me/live",
                       "--hub_strategy", "checkpoint", *quick_flags()])
    during, final = hub.uploads[:-1], hub.uploads[-1]
    assert len(during) == 4  # two epochs: the model, and the checkpoint under last-checkpoint/
    assert all(not f.endswith(".bin") for upload in hub.uploads for f in upload["files"])
    # what goes up to resume from is named in hub.push_checkpoint: torch files read back with weights_only=True
    checkpoint = {f.split("/", 1)[1] for upload in during for f in upload["files"] if f.startswith("last-checkpoint/")}
    assert checkpoint == {"model.safetensors", "config.json", "trainer_state.json", "optimizer.pt", "scheduler.pt",
                          "rng_state.pth", "preprocessor_config.json"}, checkpoint
    assert not [f for f in final["files"] if f.endswith((".pt", ".pth", ".bin"))]  # the final push: none at all
    assert all(upload["card"] is None for upload in during)
    assert "hf-vision-transfer" in final["card"] and card_metadata(final["card"])["model-index"][0]["name"] == "me/live"


# ---------------------------------------------------------------- conventions


def test_an_arguments_file_with_flags_that_override_it(tmp_path):
    settings = {"dataset_name": "digits", "learning_rate": 0.02, "num_train_epochs": 4, "freeze_backbone": True,
                "report_to": ["none"]}
    json_file, yaml_file = tmp_path / "run.json", tmp_path / "run.yaml"
    json_file.write_text(json.dumps(settings))
    yaml_file.write_text(yaml.safe_dump(settings))
    for file in (json_file, yaml_file):
        parsed = parse_arguments([str(file), "--learning_rate", "0.5"])
        assert parsed.data.dataset_name == "digits" and parsed.training.freeze_backbone
        assert (parsed.training.learning_rate, parsed.training.num_train_epochs) == (0.5, 4)
        assert "num_train_epochs" in parsed.given  # set by the user (in the file): the data-fitted default stays away
    with pytest.raises(UserError, match="arguments file '.*missing.json' does not exist"):
        parse_arguments([str(tmp_path / "missing.json")])


def test_the_transformers_examples_flag_names_carry_over(tmp_path):
    parsed = parse_arguments(["--image_column_name", "img", "--label_column_name", "label", "--train_val_split",
                              "0.2", "--cache_dir", str(tmp_path)])
    assert (parsed.data.image_column, parsed.data.label_column, parsed.data.validation_split) == ("img", "label", 0.2)
    assert parsed.model.cache_dir == str(tmp_path)


@pytest.mark.parametrize("spelling", [
    ["--per-device-train-batch-size", "256", "--num-train-epochs", "1"],  # dashes
    ["--per_device_train_batch_size=256", "--num_train_epochs=1"],  # --name=value
    ["--per-device-train-batch-size=256", "--max-steps", "7"],
])
def test_every_spelling_of_a_flag_is_the_users_and_the_data_fitted_defaults_leave_it_alone(spelling):
    parsed = parse_arguments(["--model", "resnet18", *spelling])
    assert parsed.training.per_device_train_batch_size == 256
    assert fit_to_data(parsed.training, 1293, parsed.given) == []  # no "a tenth of the data", no longer schedule
    assert parsed.training.per_device_train_batch_size == 256 and parsed.training.num_train_epochs in (1, 3)


def test_aliases_and_complements_count_as_given():
    parsed = parse_arguments(["--model", "resnet18", "--train_val_split", "0.2", "--no_load_best_model_at_end",
                              "--save_strategy", "no"])
    assert {"validation_split", "load_best_model_at_end", "save_strategy"} <= parsed.given


@pytest.mark.parametrize("script", [run_finetune, run_distill])
def test_abbreviated_flags_are_refused_with_the_full_name(script, tmp_path, capsys):
    argv = ["--output_dir", str(tmp_path / "o"), "--per_device_train_bat", "8"]
    with pytest.raises(SystemExit) as exit_info:
        run_cli(script.main, ["--teacher_model_name_or_path", str(tmp_path), *argv] if script is run_distill else argv)
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip() == ("error: unrecognized arguments: --per_device_train_bat 8; did you mean "
                                               "--per_device_train_batch_size? (see --help)")


def test_the_tools_take_dashes_and_refuse_abbreviations(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        tools(["report", str(tmp_path), "--out", str(tmp_path / "r")])
    assert exit_info.value.code == 2 and "unrecognized arguments: --out" in capsys.readouterr().err
    with pytest.raises(UserError, match="is not a finished run"):  # parsed: the run itself is what is missing
        tools(["push", str(tmp_path / "nothing"), "--hub-model-id", "me/model"])


@pytest.mark.parametrize("argv, start, end", [
    (["export", "run", "--format", "tflite"], "argument --format: invalid choice: 'tflite'", ""),
    (["exprt", "run"], "argument command: invalid choice: 'exprt'", "; did you mean export?"),
    (["search", "--n_trial", "3"], "unrecognized arguments: --n_trial 3; did you mean --n_trials?", ""),
    (["search", "--n_trials", "3", "--backend", "optunaa"], "argument --backend: invalid choice: 'optunaa'",
     "; did you mean optuna?"),
    (["search", "--n_trials", "3", "--lr_scheduler_type", "cosin"],
     "argument --lr_scheduler_type/--lr-scheduler-type: invalid choice: 'cosin'", "; did you mean cosine?"),
    (["search", "--model", "resnet18"], "the following arguments are required: --n_trials/--n-trials", ""),
    (["report", "run", "--ouput", "r"], "unrecognized arguments: --ouput r; did you mean --output?", ""),
    (["push", "run"], "the following arguments are required: --hub_model_id/--hub-model-id", ""),
    (["check-config"], "the following arguments are required: files", ""),
    (["export", "run", "--max_images", "0"], "--max_images must be >= 1", ""),
    ([], "the following arguments are required: command", ""),
])
def test_every_tool_refusal_is_one_line_with_the_closest_name(argv, start, end, capsys):
    with pytest.raises(SystemExit) as exit_info:
        tools(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"error: {start}") and err.endswith(f"{end} (see --help)\n"), err


def test_long_steps_of_ours_show_a_progress_bar(cifar_teacher, cifar_like, tmp_path, capsys):
    run_distill.main(["--teacher_model_name_or_path", cifar_teacher, "--student_model_name_or_path", cifar_teacher,
                      "--dataset_name", cifar_like, "--output_dir", str(tmp_path / "o"), "--augmentation", "none",
                      "--cache_teacher_logits", *quick_flags(), "--max_steps", "1", "--disable_tqdm", "false"])
    err = capsys.readouterr().err
    assert "caching the teacher's logits" in err and "teacher on the test split" in err


def test_total_flos_counts_the_input_the_model_sees(tiny_resnet, cifar_like, tmp_path):
    """32 px images trained at 64 px: the FLOPs of a 64 px forward, x3, per image seen."""
    out = tmp_path / "o"
    results = run_finetune.main(["--model_name_or_path", tiny_resnet, "--dataset_name", cifar_like, "--output_dir",
                                 str(out), "--num_train_epochs", "2", "--image_size", "64", *quick_flags()])
    model = load_model(tiny_resnet, ["red", "green", "blue"], image_size=64).model
    expected = 3 * forward_flops(model, (64, 64)) * 2 * results["train_samples"]
    assert np.isclose(results["total_flos"], expected, rtol=1e-6)
    assert forward_flops(model, (64, 64)) > 3.5 * forward_flops(model, (32, 32))  # what counting at 32 px missed


def test_every_field_of_ours_says_whether_it_shapes_training_and_the_record_follows():
    """run_args.json compares what shapes training: each field of the project's says so in its metadata, so a new
    flag cannot be forgotten; the Trainer's own shaping fields are named and must exist."""
    import dataclasses

    from transformers import TrainingArguments

    from hf_transfer.config.flags import (
        DataArguments,
        DistillationDataArguments,
        ModelArguments,
        StudentArguments,
    )
    from hf_transfer.run import record as run_args
    from hf_transfer.trainers.distillation_config import DistillationConfig

    for cls in (ModelArguments, StudentArguments, DataArguments, DistillationDataArguments, TransferConfig,
                DistillationConfig):
        own = cls.__dict__.get("__annotations__", {})
        for f in dataclasses.fields(cls):
            if f.name in own:
                assert "shapes" in f.metadata, f"{cls.__name__}.{f.name} does not say whether it shapes training"
    trainer_fields = {f.name for f in dataclasses.fields(TrainingArguments)}
    assert set(run_args.TRAINER_SHAPING) <= trainer_fields
    training = set(run_args.shaping_fields(DistillationConfig))
    assert {"bf16", "fp16", "teacher_revision", "teacher_model_name_or_path", "precise_bn_images", "seed"} <= training
    assert not {"output_dir", "logging_steps", "report_to", "dataloader_num_workers"} & training
    assert "unlabeled_dir" in run_args.shaping_fields(DistillationDataArguments)
    for cls in (ModelArguments, DataArguments, TransferConfig, DistillationConfig):  # what the card shows shapes
        assert all(f.metadata["shapes"] for f in dataclasses.fields(cls) if f.metadata.get("card")), cls


@pytest.mark.parametrize("flags, expected", [
    ([], ("sgd", "momentum=0.9,nesterov=True", 0.0, 0.01)),  # the CNN recipe as it is
    (["--optim", "sgd"], ("sgd", "momentum=0.9,nesterov=True", 0.0, 0.01)),
    (["--optim", "adamw_torch"], ("adamw_torch", None, 1.0, 1e-3)),  # AdamW's own, not SGD's momentum and no-clip
    (["--optim", "adamw_torch", "--max_grad_norm", "0.5", "--learning_rate", "3e-4"], ("adamw_torch", None, 0.5, 3e-4)),
    (["--recipe", "tutorial"], ("sgd", "momentum=0.9", 0.0, 1e-3)),  # a recipe's own optimizer keeps its settings
    (["--model", "vit-tiny", "--optim", "sgd"], ("sgd", "momentum=0.9,nesterov=True", 0.0, 5e-5)),
])
def test_what_belongs_to_an_optimizer_comes_with_the_optimizer_used(flags, expected, caplog, tmp_path):
    argv = ["--model", "resnet18", *flags] if "--model" not in flags else flags
    with caplog.at_level(logging.WARNING):
        parsed = parse_arguments([*argv, "--output_dir", str(tmp_path / "o")])
    args = parsed.training
    assert (str(getattr(args.optim, "value", args.optim)), args.optim_args, args.max_grad_norm,
            args.learning_rate) == expected
    unmeasured = "--optim sgd for ViTs: the learning rate 5e-05 is the one measured with adamw_torch" in caplog.text
    assert unmeasured == ("vit-tiny" in flags)


def test_the_card_shows_the_optimizer_and_clipping_that_ran(tiny_resnet, cifar_like, tmp_path):
    out = tmp_path / "o"
    run_finetune.main(["--model_name_or_path", tiny_resnet, "--dataset_name", cifar_like, "--output_dir", str(out),
                       "--optim", "adamw_torch", "--max_steps", "2", "--mixup", "0.2", "--label_smoothing_factor",
                       "0.1", *quick_flags()])
    card = (out / "README.md").read_text()
    assert "| optimizer | adamw_torch |" in card and "| gradient clipping | at norm 1 |" in card
    assert "| learning rate | 0.001 |" in card
    # a setting changed from its default is shown under its field's card name; one left alone is not
    assert "| mixup | 0.2 |" in card and "| label smoothing | 0.1 |" in card and "cutmix" not in card
