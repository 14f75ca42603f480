"""run_distill end to end, the teacher's handling, its view of the images, and the logit cache."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import quick_flags
from datasets import Image
from helpers import colour_dataset, make_checkpoint, texture_folders
from safetensors.torch import load_file
from transformers import AutoImageProcessor, AutoModelForImageClassification, pipeline

import run_distill
from hf_transfer.cli.tools import main as tools
from hf_transfer.data.dataset import ROW, load_image_data
from hf_transfer.data.samples import attach_transforms
from hf_transfer.errors import UserError
from hf_transfer.models.loading import load_model, load_teacher
from hf_transfer.run.assembly import trainer_kwargs
from hf_transfer.trainers.distillation_config import DistillationConfig
from hf_transfer.trainers.distillation_trainer import DistillationTrainer, teacher_cache_path


@pytest.fixture(scope="module")
def student_checkpoint(tmp_path_factory):
    """Another family than the ViT teacher, with ImageNet statistics and 24 px input."""
    return make_checkpoint("resnet", tmp_path_factory.mktemp("student"), image_size=24)


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_end_to_end(cifar_teacher, student_checkpoint, cifar_like, tmp_path, monkeypatch):
    teacher_before = state(AutoModelForImageClassification.from_pretrained(cifar_teacher))
    out = tmp_path / "student"
    results = run_distill.main(["--teacher_model_name_or_path", cifar_teacher,
                                "--student_model_name_or_path", student_checkpoint, "--dataset_name", cifar_like,
                                "--output_dir", str(out), "--num_train_epochs", "2", *quick_flags(),
                                "--logging_steps", "2"])

    test = json.loads((out / "test_results.json").read_text())
    assert test["test_accuracy"] == results["test_accuracy"] and "test_f1" in test
    # the teacher scored as its own run scored it; agreement: the share of test images both predict alike
    teacher_test = json.loads((Path(cifar_teacher) / "test_results.json").read_text())
    assert test["test_teacher_accuracy"] == pytest.approx(teacher_test["test_accuracy"])
    assert_agreement(test["test_agreement"], Path(cifar_teacher), out)

    # both terms are logged at every training log
    train_logs = [h for h in json.loads((out / "trainer_state.json").read_text())["log_history"] if "loss" in h]
    assert train_logs and all("ce_loss" in h and "kd_loss" in h for h in train_logs)

    # the student is a plain model: its own weights only, its own processor; no teacher anywhere
    student = AutoModelForImageClassification.from_pretrained(out)
    assert set(load_file(str(out / "model.safetensors"))) == set(student.state_dict())
    processor = AutoImageProcessor.from_pretrained(out)  # the student's own (timm crop_pct 0.95) at 24 px
    assert processor.size == {"shortest_edge": 25} and processor.crop_size == {"height": 24, "width": 24}
    classify = pipeline("image-classification", model=str(out), device="cpu")
    assert classify.model.config.id2label == {0: "red", 1: "green", 2: "blue"}

    # the teacher is untouched, bit for bit
    teacher_after = AutoModelForImageClassification.from_pretrained(cifar_teacher).state_dict()
    assert all(torch.equal(teacher_before[k], teacher_after[k]) for k in teacher_before)

    card = (out / "README.md").read_text()
    assert cifar_teacher in card and "knowledge-distillation" in card
    assert (f"distilled from the teacher `{cifar_teacher}` into a student that started from the weights of "
            f"`{student_checkpoint}`,") in card


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["kl", "dist"])  # every --distillation_loss (tasks/objectives.py)
def test_digits_student_learns_from_the_teacher(digits_run, tmp_path, loss):
    teacher_dir, _ = digits_run
    student = make_checkpoint("resnet", tmp_path / "arch", image_size=24, mean=(0.5,) * 3, std=(0.5,) * 3)
    results = run_distill.main([
        "--teacher_model_name_or_path", str(teacher_dir), "--student_model_name_or_path", student, "--from_scratch",
        "--dataset_name", "digits", "--output_dir", str(tmp_path / "out"), "--num_train_epochs", "5",
        "--learning_rate", "0.05", "--per_device_train_batch_size", "32", "--dataloader_num_workers", "0",
        "--disable_tqdm", "true", "--seed", "0", "--distillation_loss", loss,
    ])
    assert results["test_accuracy"] >= 0.9
    assert results["test_agreement"] >= 0.9
    card = (tmp_path / "out" / "README.md").read_text()
    assert ("| distillation loss | dist |" in card) == (loss == "dist")  # the card names a loss other than the default
    if loss == "dist":
        return
    # The student is a model like any other: it exports to ONNX and scores the test split as the run did.
    tools(["export", str(tmp_path / "out"), "--format", "onnx", "--output", str(tmp_path / "onnx")])
    exported = json.loads((tmp_path / "onnx" / "export_results.json").read_text())
    assert exported["top1_disagreements"] == 0 and exported["onnx_accuracy"] == pytest.approx(results["test_accuracy"])


def build_trainer(teacher_dir, student_dir, data_path, output_dir, augmentation="none"):
    data = load_image_data(data_path, seed=0)
    teacher = load_teacher(teacher_dir, data.label_names)
    student = load_model(student_dir, data.label_names)
    cache_path = teacher_cache_path(str(output_dir), teacher.model, teacher.spec, data.train, data.image_column)
    attach_transforms(data, augmentation)
    args = DistillationConfig(output_dir=str(output_dir), per_device_train_batch_size=6, dataloader_num_workers=0,
                              report_to="none", use_cpu=True, max_steps=2, alpha=0.5, temperature=2.0)
    trainer = DistillationTrainer(teacher=teacher.model, teacher_spec=teacher.spec,
                                  **trainer_kwargs(args, data, student))
    return trainer, data, teacher, student, cache_path


def one_training_step(trainer, data) -> tuple[dict, dict, list]:
    """The loss of one training batch, as training_step computes it (mixing drawn after torch.manual_seed(0)):
    the pixel_values each model received, the batch, and its images as datasets decodes them."""
    seen = {}
    trainer.teacher.register_forward_pre_hook(lambda m, a, kw: seen.__setitem__("teacher", kw["pixel_values"]),
                                              with_kwargs=True)
    trainer.model.register_forward_pre_hook(lambda m, a, kw: seen.__setitem__("student", kw["pixel_values"]),
                                            with_kwargs=True)
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.model.train()
    torch.manual_seed(0)
    trainer.compute_loss(trainer.model, trainer._prepare_inputs(batch))
    decoded = data.train.with_format(None).cast_column(data.image_column, Image())
    by_row = {row: image for row, image in zip(decoded[ROW], decoded[data.image_column])}
    return seen, batch, [by_row[int(row)] for row in batch["row_index"]]


def test_each_model_receives_exactly_its_own_processors_input(cifar_teacher, student_checkpoint, cifar_like,
                                                             tmp_path):
    trainer, data, teacher, student, _ = build_trainer(cifar_teacher, student_checkpoint, cifar_like, tmp_path)
    seen, _, images = one_training_step(trainer, data)
    # the same rows, decoded by datasets, preprocessed by each model's saved processor
    expected_teacher = AutoImageProcessor.from_pretrained(cifar_teacher)(images, return_tensors="pt")["pixel_values"]
    expected_student = student.spec.to_image_processor()(images, return_tensors="pt")["pixel_values"]
    assert seen["teacher"].shape[-1] == 32 and seen["student"].shape[-1] == 24
    torch.testing.assert_close(seen["teacher"], expected_teacher, rtol=0, atol=1e-6)
    torch.testing.assert_close(seen["student"], expected_student, rtol=0, atol=1e-6)


# ---------------------------------------------------------------- the teacher's own view of mixed-size images


@pytest.fixture(scope="module")
def textures(tmp_path_factory):
    """Texture folders (stripes and checkerboards 16 cycles across, noise; 56-120 px, any aspect ratio) and a
    ResNet teacher trained on them at 64 px. At 16 px the classes are gone: a teacher shown a 16 px picture
    scaled up is at chance."""
    import run_finetune

    root = tmp_path_factory.mktemp("textures")
    data = texture_folders(root / "data", {"train": 16, "test": 10})
    teacher = root / "teacher"
    run_finetune.main(["--model_name_or_path", make_checkpoint("resnet", root / "arch", image_size=64),
                       "--from_scratch", "--train_dir", str(data / "train"), "--test_dir", str(data / "test"),
                       "--output_dir", str(teacher), *quick_flags(), "--num_train_epochs", "10",
                       "--learning_rate", "0.05"])
    return data, teacher


@pytest.mark.slow
@pytest.mark.parametrize("augmentation", ["none", "rrc"])
def test_on_mixed_sizes_the_teacher_is_scored_as_in_its_own_evaluation(textures, tmp_path, augmentation):
    """(Trained on random-resized crops too: each model resizes the same crop whole, only in training.)"""
    import run_finetune

    data, teacher = textures
    folders = ["--train_dir", str(data / "train"), "--test_dir", str(data / "test")]
    own = run_finetune.main(["--model_name_or_path", str(teacher), *folders, "--do_train", "false",
                             "--output_dir", str(tmp_path / "eval"), *quick_flags()])
    student = make_checkpoint("resnet", tmp_path / "student", image_size=16)
    distilled = run_distill.main(["--teacher_model_name_or_path", str(teacher), "--student_model_name_or_path", student,
                                  "--from_scratch", *folders, "--output_dir", str(tmp_path / "d"), "--max_steps", "2",
                                  *quick_flags(), "--augmentation", augmentation])
    assert own["test_accuracy"] >= 0.6  # 4 classes: chance is 0.25, where a 16 px view leaves the teacher
    assert distilled["test_teacher_accuracy"] == pytest.approx(own["test_accuracy"])
    assert_agreement(distilled["test_agreement"], tmp_path / "eval", tmp_path / "d")


@pytest.mark.slow
def test_teacher_accuracy_and_agreement_come_from_each_models_own_predictions(student_checkpoint, cifar_like,
                                                                               tmp_path):
    """A teacher of random weights (wrong on many test images, unlike the trained ones above, with which agreement
    equals the student's accuracy): its accuracy is its own evaluation's, agreement the share of test images on
    which its predictions and the student's are the same class."""
    import run_finetune

    teacher = load_model(make_checkpoint("vit", tmp_path / "random"), ["red", "green", "blue"])
    teacher.model.save_pretrained(tmp_path / "teacher")
    teacher.spec.to_image_processor().save_pretrained(tmp_path / "teacher")
    own = run_finetune.main(["--model_name_or_path", str(tmp_path / "teacher"), "--dataset_name", cifar_like,
                             "--do_train", "false", "--output_dir", str(tmp_path / "eval"), *quick_flags()])
    distilled = run_distill.main(["--teacher_model_name_or_path", str(tmp_path / "teacher"),
                                  "--student_model_name_or_path", student_checkpoint, "--dataset_name", cifar_like,
                                  "--output_dir", str(tmp_path / "d"), "--max_steps", "3", *quick_flags()])
    assert own["test_accuracy"] < 0.9 and distilled["test_teacher_accuracy"] == pytest.approx(own["test_accuracy"])
    assert distilled["test_agreement"] != pytest.approx(distilled["test_accuracy"])  # the two can be told apart
    assert_agreement(distilled["test_agreement"], tmp_path / "eval", tmp_path / "d")


def assert_agreement(agreement: float, teacher_run: Path, student_run: Path) -> None:
    """`agreement` is the share of test images on which the two runs' own test predictions are the same."""
    predicted = [json.loads((run / "test_predictions.json").read_text()) for run in (teacher_run, student_run)]
    by_row = [dict(zip(p["rows"], p["predictions"])) for p in predicted]
    assert by_row[0].keys() == by_row[1].keys()
    assert agreement == pytest.approx(np.mean([by_row[0][r] == by_row[1][r] for r in by_row[0]]))


@pytest.mark.parametrize("mixup", ["0", "0.4"])
def test_on_mixed_sizes_the_teacher_trains_on_its_own_resize_of_each_image(textures, tmp_path, mixup):
    """The teacher's training input is its own processor's output for the original images (not the student's
    16 px resize scaled up); with mixup, the same blend of its own resizes."""
    data, teacher_dir = textures
    images = load_image_data(train_dir=str(data / "train"), seed=0)
    teacher = load_teacher(str(teacher_dir), images.label_names)
    student = load_model(make_checkpoint("resnet", tmp_path / "student", image_size=16), images.label_names)
    attach_transforms(images, "none")
    args = DistillationConfig(output_dir=str(tmp_path / "o"), per_device_train_batch_size=6, dataloader_num_workers=0,
                              report_to="none", use_cpu=True, max_steps=2, mixup=float(mixup))
    trainer = DistillationTrainer(teacher=teacher.model, teacher_spec=teacher.spec,
                                  **trainer_kwargs(args, images, student))
    seen, batch, originals = one_training_step(trainer, images)
    expected = AutoImageProcessor.from_pretrained(teacher_dir)(originals, return_tensors="pt")["pixel_values"]
    assert seen["teacher"].shape[-2:] == (64, 64) and seen["student"].shape[-2:] == (16, 16)
    if mixup != "0":  # the same draws (partners, weights) applied to the teacher's own inputs
        torch.manual_seed(0)
        expected, _, _ = trainer.batch_mix(expected, batch["labels"])
        assert not torch.allclose(seen["teacher"], AutoImageProcessor.from_pretrained(teacher_dir)(
            originals, return_tensors="pt")["pixel_values"], atol=1e-2)
    torch.testing.assert_close(seen["teacher"], expected, rtol=0, atol=1e-4)


def test_teacher_is_frozen_and_outside_the_optimizer(cifar_teacher, student_checkpoint, cifar_like, tmp_path):
    trainer, *_ = build_trainer(cifar_teacher, student_checkpoint, cifar_like, tmp_path, augmentation="basic")
    before = state(trainer.teacher)
    trainer.train()
    assert not trainer.teacher.training
    assert all(not p.requires_grad for p in trainer.teacher.parameters())
    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert not optimized & {id(p) for p in trainer.teacher.parameters()}
    assert all(torch.equal(before[k], v) for k, v in trainer.teacher.state_dict().items())


def test_cached_teacher_logits(cifar_teacher, student_checkpoint, cifar_like, tmp_path):
    trainer, data, teacher, _, path = build_trainer(cifar_teacher, student_checkpoint, cifar_like, tmp_path)
    trainer.use_cached_teacher_logits(data.train, path)
    assert path.exists()
    calls = []
    trainer.teacher.register_forward_hook(lambda *a: calls.append(1))
    batch = next(iter(trainer.get_train_dataloader()))
    # the cached logits are the teacher's on these very (unaugmented) images
    with torch.no_grad():
        direct = trainer.teacher(pixel_values=trainer.teacher_input(batch["pixel_values"])).logits
    calls.clear()
    torch.testing.assert_close(trainer.teacher_logits[batch["row_index"]], direct)
    trainer.model.train()
    trainer.compute_loss(trainer.model, trainer._prepare_inputs(batch))
    assert calls == []  # no teacher forward while training from the cache

    # a second trainer loads the file instead of recomputing
    again, *_ = build_trainer(cifar_teacher, student_checkpoint, cifar_like, tmp_path)
    again.teacher.register_forward_hook(lambda *a: calls.append(1))
    again.use_cached_teacher_logits(data.train, path)
    assert calls == [] and torch.equal(again.teacher_logits, trainer.teacher_logits)


def test_cache_file_changes_with_teacher_and_data(cifar_teacher, cifar_like, tmp_path):
    data = load_image_data(cifar_like, seed=0)
    teacher = load_teacher(cifar_teacher, data.label_names)

    def key(images):
        return teacher_cache_path("o", teacher.model, teacher.spec, images.train, images.image_column)

    base = key(data)
    assert base == key(load_image_data(cifar_like, seed=0))
    assert base != key(load_image_data(cifar_like, seed=1))
    assert base != teacher_cache_path("o", teacher.model, teacher.spec, data.train, data.image_column, "bf16")
    with torch.no_grad():
        next(teacher.model.parameters()).add_(1e-3)
    assert base != key(data)


def test_cache_file_follows_the_contents_of_image_files(cifar_teacher, tmp_path):
    """Class folders hold paths, not bytes: the key reads the files. Other pixels in one file give another key,
    the same bytes written again (a new modification time) the same one."""
    root = tmp_path / "folders"
    images = colour_dataset(n_per_class=5, splits=("train",))["train"]
    for i, (image, label) in enumerate(zip(images["img"], images["label"])):
        (root / ["red", "green", "blue"][label]).mkdir(parents=True, exist_ok=True)
        image.save(root / ["red", "green", "blue"][label] / f"{i}.png")
    teacher = load_teacher(cifar_teacher, ["red", "green", "blue"])

    def key():
        data = load_image_data(train_dir=str(root), seed=0)  # each key a new run's
        return teacher_cache_path("o", teacher.model, teacher.spec, data.train, data.image_column)

    base = key()
    trained = load_image_data(train_dir=str(root), seed=0).train.with_format(None)
    first = Path(trained[0]["image"]["path"])  # a training image
    original = first.read_bytes()
    colour_dataset(n_per_class=1, seed=7, splits=("train",))["train"]["img"][0].save(first)
    changed = key()
    assert changed != base
    first.write_bytes(original)  # the same pixels again, written later
    assert key() == base
    held_out = set(map(str, root.rglob("*.png"))) - set(c["path"] for c in trained["image"])
    colour_dataset(n_per_class=1, seed=7, splits=("train",))["train"]["img"][0].save(sorted(held_out)[0])
    assert key() == base  # a validation image is not in the training split's logits


@pytest.mark.slow
def test_overwrite_output_dir_keeps_only_the_cache_the_run_uses(cifar_teacher, student_checkpoint, cifar_like,
                                                                tmp_path):
    out = tmp_path / "cached"
    flags = ["--teacher_model_name_or_path", cifar_teacher, "--student_model_name_or_path", student_checkpoint,
             "--dataset_name", cifar_like, "--output_dir", str(out), "--augmentation", "none", "--max_steps", "2",
             *quick_flags()]
    run_distill.main([*flags, "--cache_teacher_logits"])
    (first,) = out.glob("_teacher_logits-*")
    first_time = first.stat().st_mtime_ns
    run_distill.main([*flags, "--cache_teacher_logits", "--overwrite_output_dir"])  # the same images: reused
    assert list(out.glob("_teacher_logits-*")) == [first] and first.stat().st_mtime_ns == first_time
    run_distill.main([*flags, "--cache_teacher_logits", "--overwrite_output_dir", "--seed", "1"])  # other rows
    (second,) = out.glob("_teacher_logits-*")
    assert second != first
    run_distill.main([*flags, "--overwrite_output_dir"])  # afresh, without a cache: none is left behind
    assert not list(out.glob("_teacher_logits-*"))


def test_cached_run_end_to_end(cifar_teacher, student_checkpoint, cifar_like, tmp_path):
    out = tmp_path / "cached"
    run_distill.main(["--teacher_model_name_or_path", cifar_teacher, "--student_model_name_or_path",
                      student_checkpoint, "--dataset_name", cifar_like, "--output_dir", str(out),
                      "--augmentation", "none", "--cache_teacher_logits", "--num_train_epochs", "2", *quick_flags()])
    assert len(list(out.glob("_teacher_logits-*.safetensors"))) == 1
    assert (out / "test_results.json").exists()


def test_label_mismatch_is_an_error_before_training(tiny_vit, cifar_like, tmp_path):
    with pytest.raises(UserError, match="the teacher's labels do not match the data set's: teacher has 3 "
                                        r"\(old0, old1, old2\), data set has 3 \(red, green, blue\)"):
        run_distill.main(["--teacher_model_name_or_path", tiny_vit, "--dataset_name", cifar_like,
                          "--output_dir", str(tmp_path / "o"), "--student", "resnet18", "--from_scratch"])


@pytest.mark.parametrize("flags, message", [
    (["--alpha", "1.5"], r"--alpha must be in \[0, 1\]"),
    (["--alpha", "-0.1"], r"--alpha must be in \[0, 1\]"),
    (["--temperature", "0"], "--temperature must be > 0"),
    (["--cache_teacher_logits"], "--cache_teacher_logits needs --augmentation none"),
    (["--cache_teacher_logits", "--augmentation", "none", "--mixup", "0.2"], "--cache_teacher_logits cannot be used with --mixup"),
])
def test_bad_distillation_flags(flags, message, tmp_path):
    with pytest.raises(UserError, match=message):
        run_distill.main(["--teacher_model_name_or_path", "t", "--output_dir", str(tmp_path / "o"), *flags])


def test_teacher_is_required(tmp_path, capsys):
    from hf_transfer.errors import run_cli

    with pytest.raises(SystemExit) as exit_info:
        run_cli(run_distill.main, ["--output_dir", str(tmp_path / "o")])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: the following arguments are required: --teacher_model_name_or_path/--teacher-model-name-or-path "
        "(see --help)"]
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------- the logged terms


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["convnext", "vit"])  # a timm student, a transformers-native one (loss kwargs)
def test_logged_terms_are_per_sample_means_of_each_step(kind, cifar_teacher, cifar_like, tmp_path):
    """The same 8 images per optimizer step as one batch of 8, as two accumulated batches of 4, and as 4 on each
    of 2 processes: the logged loss and its two terms are the same per-sample means, and loss = 0.3 ce + 0.7 kd.
    Students without BatchNorm, so that how a step's images are split does not change the logits."""
    from test_distributed import launch

    student = make_checkpoint(kind, tmp_path / "student", image_size=64 if kind == "convnext" else 24)
    common = ["--teacher_model_name_or_path", cifar_teacher, "--student_model_name_or_path", student,
              "--dataset_name", cifar_like, "--max_train_samples", "32", "--max_steps", "6", "--alpha", "0.7",
              "--eval_strategy", "no", "--save_strategy", "no", "--do_predict", "false", "--seed", "5",
              *quick_flags(), "--logging_steps", "1"]

    def logs(out):
        history = json.loads((out / "trainer_state.json").read_text())["log_history"]
        return [(h["loss"], h["ce_loss"], h["kd_loss"]) for h in history if "loss" in h]

    run_distill.main([*common, "--output_dir", str(tmp_path / "one"), "--per_device_train_batch_size", "8"])
    run_distill.main([*common, "--output_dir", str(tmp_path / "accumulated"), "--per_device_train_batch_size", "4",
                      "--gradient_accumulation_steps", "2"])
    proc = launch(tmp_path, "distill", [*common, "--output_dir", str(tmp_path / "two"),
                                        "--per_device_train_batch_size", "4"])
    assert proc.returncode == 0, proc.stderr[-3000:]

    one = logs(tmp_path / "one")
    assert len(one) == 6
    for other in ("accumulated", "two"):
        assert np.allclose(logs(tmp_path / other), one, atol=3e-4), (other, logs(tmp_path / other), one)
    for loss, ce, kd in one:
        assert loss == pytest.approx(0.3 * ce + 0.7 * kd, abs=2e-4)
