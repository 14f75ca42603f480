"""run_finetune end to end, in-process, offline, on tiny models and on real digits."""

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import yaml
from datasets import load_dataset
from helpers import make_checkpoint, texture_folders
from transformers import AutoImageProcessor, AutoModelForImageClassification, pipeline

import run_finetune
from hf_transfer.config.run_config import parse_arguments
from hf_transfer.data.dataset import load_image_data
from hf_transfer.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
OUTPUT_FILES = ["model.safetensors", "config.json", "preprocessor_config.json", "train_results.json",
                "eval_results.json", "test_results.json", "all_results.json", "trainer_state.json", "README.md",
                "test_per_class.json", "test_confusion_matrix.json", "test_confusion_matrix.png"]


def pipeline_predictions(output_dir, images):
    classify = pipeline("image-classification", model=str(output_dir), device="cpu")
    label2id = classify.model.config.label2id
    return [label2id[result[0]["label"]] for result in classify(images, top_k=1)]


@pytest.mark.parametrize("augmentation", ["none", "rrc+flip"])
def test_mixed_size_photos_are_seen_as_the_checkpoints_processor_sees_them(tmp_path, quick_args, augmentation):
    """A checkpoint whose processor keeps the aspect ratio and crops the centre (microsoft/resnet-50's: the shorter
    edge to 32 / 0.875, the centre 32 x 32), images of many sizes and shapes: the saved processor is the same
    geometry, and pipeline() on the saved model predicts what the run's test evaluation predicted (also after
    training on random-resized crops, which only training sees)."""
    data = texture_folders(tmp_path / "data", {"train": 6, "test": 6})
    checkpoint = make_checkpoint("hf-resnet", tmp_path / "arch", image_size=32, num_labels=4, crop_pct=0.875)
    out = tmp_path / "run"
    run_finetune.main(["--model_name_or_path", checkpoint, "--train_dir", str(data / "train"), "--test_dir",
                       str(data / "test"), "--output_dir", str(out), "--max_steps", "3", *quick_args,
                       "--augmentation", augmentation])
    processor = AutoImageProcessor.from_pretrained(out)
    assert processor.size == {"shortest_edge": 36} and processor.crop_size == {"height": 32, "width": 32}
    saved = json.loads((out / "test_predictions.json").read_text())
    test = load_image_data(train_dir=str(data / "train"), test_dir=str(data / "test"), seed=0).test
    images = [PIL.Image.open(test.with_format(None)[row]["image"]["path"]) for row in saved["rows"]]
    assert len({image.size for image in images}) > 1 and any(w != h for w, h in (image.size for image in images))
    assert pipeline_predictions(out, images) == saved["predictions"]


@pytest.mark.parametrize("fixture", ["tiny_vit", "tiny_resnet"])
def test_end_to_end_on_cifar_schema(request, fixture, cifar_like, tmp_path, quick_args):
    out = tmp_path / "run"
    results = run_finetune.main(["--model_name_or_path", request.getfixturevalue(fixture), "--dataset_name", cifar_like,
                                 "--output_dir", str(out), "--num_train_epochs", "2", *quick_args])
    for name in OUTPUT_FILES:
        assert (out / name).exists(), name
    assert not list(out.glob("*.bin")) or [p.name for p in out.glob("*.bin")] == ["training_args.bin"]

    test = json.loads((out / "test_results.json").read_text())
    assert {"test_accuracy", "test_f1", "test_precision", "test_recall", "test_f1_macro", "test_loss"} <= set(test)
    assert test["test_accuracy"] == results["test_accuracy"]

    # the output is a plain transformers model with the data set's label names
    model = AutoModelForImageClassification.from_pretrained(out)
    assert model.config.id2label == {0: "red", 1: "green", 2: "blue"}

    # pipeline() with the saved processor predicts exactly what the test evaluation predicted
    saved = json.loads((out / "test_predictions.json").read_text())
    raw_test = load_dataset(cifar_like, split="test")
    images = [raw_test[row]["img"] for row in saved["rows"]]
    assert pipeline_predictions(out, images) == saved["predictions"]
    assert np.mean(np.array(saved["predictions"]) == np.array(saved["labels"])) == pytest.approx(test["test_accuracy"])

    # the model card carries the test results in metadata the Hub reads
    card = (out / "README.md").read_text()
    metadata = yaml.safe_load(card.split("---")[1])
    metrics = {m["type"]: m["value"] for m in metadata["model-index"][0]["results"][0]["metrics"]}
    assert metrics["accuracy"] == round(test["test_accuracy"], 4)
    assert "pipeline(\"image-classification\"" in card


def test_digits_from_scratch_learns(digits_run):
    out, results = digits_run
    assert results["test_accuracy"] >= 0.95
    assert results["test_samples"] == 360  # the fixed test split of the real data set


def test_checkpoint_transfers_to_new_labels(digits_run, cifar_like, tmp_path, quick_args):
    checkpoint, _ = digits_run
    out = tmp_path / "transfer"
    results = run_finetune.main(["--model_name_or_path", str(checkpoint), "--dataset_name", cifar_like,
                                 "--output_dir", str(out), "--num_train_epochs", "3", "--learning_rate", "0.02",
                                 *quick_args])
    model = AutoModelForImageClassification.from_pretrained(out)
    assert model.config.id2label == {0: "red", 1: "green", 2: "blue"}
    # 3 colour classes, chance 1/3. Training reaches them all within these 18 steps; what is evaluated and saved
    # does too only because BatchNorm's statistics are recomputed for the final weights (0.60-0.69 without).
    assert results["test_accuracy"] >= 0.9


def test_a_rerun_is_compared_with_the_length_the_data_fitted(tiny_resnet, cifar_like, tmp_path, quick_args):
    """43 training images at batch 8 and --min_train_steps 24: the run trains 4 epochs, not the default 3. Its
    exact command, and the same command naming those 4 epochs, are that run; naming 3 epochs is not."""
    out = tmp_path / "run"
    args = ["--model_name_or_path", tiny_resnet, "--dataset_name", cifar_like, "--output_dir", str(out), *quick_args,
            "--min_train_steps", "24"]
    first = run_finetune.main(args)
    assert first["epoch"] == 4
    saved = json.loads((out / "run_args.json").read_text())
    assert saved["shaping"]["training.num_train_epochs"] == 4
    assert saved["fitted_fields"] == ["training.metric_for_best_model", "training.num_train_epochs"]
    card = (out / "README.md").read_text()
    assert "| epochs | 4.0 |" in card
    assert run_finetune.main(args) == first
    # a run saved before the checkpoint metric was fitted (one class per image: accuracy) is the same run
    older = {**saved, "fitted_fields": ["training.num_train_epochs"]}
    (out / "run_args.json").write_text(json.dumps(older))
    assert run_finetune.main(args) == first
    assert run_finetune.main([*args, "--num_train_epochs", "4"]) == first
    with pytest.raises(UserError, match=r"holds a finished run with other settings \(num_train_epochs 4 -> 3\)"):
        run_finetune.main([*args, "--num_train_epochs", "3"])
    # a run that named its length, rerun without it (the data would fit it): not known to be the same run
    named = tmp_path / "named"
    run_finetune.main([*args[:4], "--output_dir", str(named), *args[6:], "--num_train_epochs", "2"])
    with pytest.raises(UserError, match=r"num_train_epochs 2 -> fitted to the data"):
        run_finetune.main([*args[:4], "--output_dir", str(named), *args[6:]])


def test_mixed_size_image_folder_with_rgba_and_grayscale(tiny_hf_resnet, tmp_path, quick_args):
    from helpers import colour_dataset

    folders = tmp_path / "folders"
    ds = colour_dataset(n_per_class=6, size=24)
    for split, part in ds.items():
        for i, row in enumerate(part):
            image = row["img"].resize((24 + 4 * (i % 3), 24))  # three different sizes
            image = image.convert(["RGB", "RGBA", "L"][i % 3]) if i % 3 else image
            target = folders / split / part.features["label"].names[row["label"]]
            target.mkdir(parents=True, exist_ok=True)
            image.save(target / f"{i}.png")
    out = tmp_path / "run"
    run_finetune.main(["--model_name_or_path", tiny_hf_resnet, "--train_dir", str(folders / "train"),
                       "--test_dir", str(folders / "test"), "--output_dir", str(out), "--max_steps", "3", *quick_args])
    saved = json.loads((out / "test_predictions.json").read_text())
    raw = load_dataset("imagefolder", data_files={"test": str(folders / "test" / "**")}, split="test")
    assert pipeline_predictions(out, [raw[row]["image"] for row in saved["rows"]]) == saved["predictions"]
    # each prediction names its file, and the file is the row's image
    assert len(saved["files"]) == len(saved["rows"]) and all(Path(f).is_file() for f in saved["files"])
    assert pipeline_predictions(out, saved["files"]) == saved["predictions"]


@pytest.mark.slow
def test_rerun_keeps_a_finished_run_resumes_a_partial_one_and_refuses_other_settings(tiny_vit, cifar_like, tmp_path,
                                                                                    quick_args, caplog):
    out = tmp_path / "run"
    args = ["--model_name_or_path", tiny_vit, "--dataset_name", cifar_like, "--output_dir", str(out),
            "--num_train_epochs", "2", *quick_args]
    first = run_finetune.main(args)
    saved = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert json.loads(saved["run_args.json"])["shaping"]["training.num_train_epochs"] == 2

    # the same command again: the finished run is reported, and no file changes
    with caplog.at_level(logging.WARNING):
        assert run_finetune.main(args) == json.loads(saved["all_results.json"])
    assert f"the run in {out} is complete (test accuracy {first['test_accuracy']:.4f})" in caplog.text
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == saved

    # other settings on a finished run: refused, naming what differs
    with pytest.raises(UserError, match=r"holds a finished run with other settings \(num_train_epochs 2 -> 3; seed 42 -> 1\)"):
        run_finetune.main([*args, "--num_train_epochs", "3", "--seed", "1"])

    # a partial run (killed after its last checkpoint) resumes from it with the same command, not with others
    state = json.loads((out / "trainer_state.json").read_text())
    last = out / f"checkpoint-{state['global_step']}"
    for name in ("all_results.json", "model.safetensors"):
        (out / name).unlink()
    with pytest.raises(UserError, match=r"holds a partial run with other settings \(global_batch_size 8 -> 16\)"):
        run_finetune.main([*args, "--per_device_train_batch_size", "16"])
    with caplog.at_level(logging.WARNING):
        run_finetune.main(args)
    assert f"resuming from checkpoint {last}" in caplog.text
    again = json.loads((out / "trainer_state.json").read_text())
    steps = [h for h in state["log_history"] if "loss" in h or "eval_loss" in h]
    assert [h for h in again["log_history"] if "loss" in h or "eval_loss" in h] == steps  # nothing trained again

    # --resume_from_checkpoint PATH: a checkpoint cut short is refused as automatic resume would skip it
    broken = tmp_path / "broken"
    shutil.copytree(last, broken)
    (broken / "model.safetensors").write_bytes((broken / "model.safetensors").read_bytes()[:100])
    with pytest.raises(UserError, match="--resume_from_checkpoint '.*broken' is not a complete checkpoint"):
        run_finetune.main([*args[:4], "--output_dir", str(tmp_path / "x"), *args[6:], "--resume_from_checkpoint",
                           str(broken)])

    # --resume_from_checkpoint PATH: continue that run's state into another directory
    elsewhere = tmp_path / "continued"
    run_finetune.main([*args[:4], "--output_dir", str(elsewhere), *args[6:], "--resume_from_checkpoint", str(last)])
    assert json.loads((elsewhere / "trainer_state.json").read_text())["global_step"] == state["global_step"]
    with pytest.raises(UserError, match="--resume_from_checkpoint '.*nope' is not a directory"):
        run_finetune.main([*args, "--resume_from_checkpoint", str(tmp_path / "nope")])

    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    elsewhere = [*args[:4], "--output_dir", str(other), *args[6:]]
    with pytest.raises(UserError, match="already holds files but no checkpoint"):
        run_finetune.main(elsewhere)
    run_finetune.main([*elsewhere, "--overwrite_output_dir"])
    assert (other / "notes.txt").read_text() == "mine" and (other / "model.safetensors").exists()


def test_early_stopping(tiny_vit, cifar_like, tmp_path, quick_args):
    out = tmp_path / "run"
    run_finetune.main(["--model_name_or_path", tiny_vit, "--dataset_name", cifar_like, "--output_dir", str(out),
                       "--num_train_epochs", "20", "--learning_rate", "1e-9", "--early_stopping_patience", "1",
                       *quick_args])
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["epoch"] == 2  # no improvement at the second evaluation stops the run


@pytest.mark.parametrize("flags, message", [
    (["--learning_rate", "0"], "--learning_rate must be > 0"),
    (["--per_device_train_batch_size", "0"], "--per_device_train_batch_size must be >= 1"),
    (["--validation_split", "1.5"], "--validation_split must be between 0 and 1"),
    (["--image_size", "0"], "--image_size must be a positive number"),
    (["--model", "resnet51"], "unknown --model 'resnet51'"),
    (["--early_stopping_patience", "2", "--load_best_model_at_end", "false"], "needs --load_best_model_at_end"),
])
def test_bad_flags_fail_before_loading_anything(flags, message, tmp_path):
    with pytest.raises(UserError, match=message):
        run_finetune.main(["--dataset_name", "does-not/matter", "--output_dir", str(tmp_path / "o"), *flags])
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_output_dir_that_cannot_be_written(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(UserError, match="cannot be written|is not a directory"):
        run_finetune.main(["--dataset_name", "digits", "--output_dir", str(blocker / "sub")])


@pytest.mark.slow
def test_cli_error_is_one_line_and_exit_code_2(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "run_finetune.py"), "--model", "resnet51",
                           "--output_dir", str(tmp_path / "o")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: unknown --model 'resnet51'; choose one of:")
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_help_lists_the_presets():
    proc = subprocess.run([sys.executable, str(ROOT / "run_finetune.py"), "--help"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0
    for preset in ("resnet18", "resnet34", "resnet50", "vit-base", "vit-small", "--learning_rate", "--from_scratch"):
        assert preset in proc.stdout


def test_recipes_fill_only_what_the_user_left_out():
    cnn = parse_arguments(["--output_dir", "x"])
    assert cnn.family == "cnn"
    assert (cnn.training.optim, cnn.training.learning_rate, cnn.training.lr_scheduler_type) == ("sgd", 0.01, "cosine")
    assert "momentum=0.9" in cnn.training.optim_args
    vit = parse_arguments(["--model", "vit-tiny", "--output_dir", "x", "--learning_rate", "3e-4"])
    assert (vit.family, vit.training.optim, vit.training.learning_rate) == ("vit", "adamw_torch", 3e-4)
    tutorial = parse_arguments(["--recipe", "tutorial"]).training
    assert (tutorial.learning_rate, tutorial.weight_decay, tutorial.num_train_epochs) == (1e-3, 1e-4, 3)
    assert tutorial.output_dir == str(Path("runs") / "resnet50-cifar10")


def test_a_local_checkpoint_picks_its_family_recipe(tiny_vit, tiny_resnet):
    assert parse_arguments(["--model_name_or_path", tiny_vit]).training.optim == "adamw_torch"
    parsed = parse_arguments(["--model_name_or_path", tiny_resnet])
    assert parsed.training.optim == "sgd" and parsed.training.output_dir == str(Path("runs") / f"{Path(tiny_resnet).name}-cifar10")


@pytest.mark.network
@pytest.mark.parametrize("preset", ["resnet18", "vit-tiny"])
def test_pretrained_presets_download_and_fine_tune(preset, tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    results = run_finetune.main(["--model", preset, "--dataset_name", "digits", "--output_dir", str(tmp_path / "o"),
                                 "--max_steps", "3", "--image_size", "64" if preset == "resnet18" else "224",
                                 "--per_device_train_batch_size", "8", "--max_eval_samples", "32",
                                 "--dataloader_num_workers", "0"])
    assert results["test_samples"] == 32 and np.isfinite(results["train_loss"])
    config = json.loads((tmp_path / "o" / "config.json").read_text())
    assert "pretrained_cfg" not in config and len(config.get("id2label") or config.get("label_names")) == 10


@pytest.mark.network
def test_cifar10_from_the_hub_has_the_expected_schema(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    from hf_transfer.data.dataset import load_image_data

    data = load_image_data("uoft-cs/cifar10", max_train_samples=64, max_eval_samples=64)
    assert (data.image_column, data.label_column) == ("img", "label") and len(data.label_names) == 10
    assert data.validation_from_train and len(data.test) == 64
