"""Several labels per image: detected from the data, trained with a sigmoid per class, scored by mAP and by F1 at a
threshold chosen on validation, saved so that `pipeline` returns each label's own score, and distilled."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import quick_flags
from datasets import ClassLabel, Dataset, DatasetDict, Features, Image, List, Value
from helpers import distil, make_checkpoint, png_bytes, random_images
from sklearn.metrics import f1_score
from transformers import pipeline
from transformers.trainer_utils import PredictionOutput

import run_distill
import run_finetune
from hf_transfer.data.dataset import load_image_data
from hf_transfer.data.samples import attach_transforms
from hf_transfer.data.sources import digits_multilabel_dataset
from hf_transfer.errors import UserError
from hf_transfer.models.loading import load_model
from hf_transfer.on_device.mixing import BatchMix
from hf_transfer.run.assembly import trainer_kwargs
from hf_transfer.tasks.classification import THRESHOLDS, MultiLabel, SingleLabel
from hf_transfer.tasks.losses import (
    binary_cross_entropy,
    binary_kl,
    positive_class_weights,
)
from hf_transfer.tasks.metrics import multilabel_metrics, sigmoid
from hf_transfer.tools.report import build_report
from hf_transfer.trainers.distillation_config import DistillationConfig
from hf_transfer.trainers.distillation_trainer import DistillationTrainer
from hf_transfer.trainers.transfer_config import TransferConfig
from hf_transfer.trainers.transfer_trainer import TransferTrainer

# ---------------------------------------------------------------- the loss, the metrics, the threshold


def test_binary_cross_entropy_sums_the_classes_averages_the_images_and_weights_positives():
    torch.manual_seed(0)
    logits, targets = torch.randn(6, 4), (torch.rand(6, 4) > 0.5).float()
    expected = F.binary_cross_entropy_with_logits(logits, targets, reduction="sum") / 6
    assert torch.allclose(binary_cross_entropy(logits, targets), expected)
    weights = torch.tensor([1.0, 3.0, 1.0, 0.5])
    expected = F.binary_cross_entropy_with_logits(logits, targets, pos_weight=weights, reduction="sum") / 6
    assert torch.allclose(binary_cross_entropy(logits, targets, positive_weights=weights), expected)
    # negatives per positive: 3 of 4 images negative for class 0 -> 3; a class with no positive -> 1
    assert positive_class_weights(torch.tensor([1.0, 2.0, 0.0]), 4).tolist() == [3.0, 1.0, 1.0]


def test_binary_kl_is_zero_only_for_the_same_scores_and_the_term_is_scaled_by_t():
    torch.manual_seed(1)
    student, teacher, labels = torch.randn(5, 3), torch.randn(5, 3), (torch.rand(5, 3) > 0.5).float()
    assert binary_kl(student, student.clone(), 2.0).abs().max() < 1e-6
    assert (binary_kl(student, teacher, 1.0) > 0).all()
    p, q = torch.sigmoid(teacher / 2), torch.sigmoid(student / 2)
    by_definition = (p * (p / q).log() + (1 - p) * ((1 - p) / (1 - q)).log()).sum(-1)
    assert torch.allclose(binary_kl(student, teacher, 2.0), by_definition, atol=1e-6)
    loss, ce, kd = distil(student, teacher, labels, alpha=0.3, temperature=2.0, multi_label=True)
    assert torch.allclose(kd, by_definition.mean() * 2) and torch.allclose(ce, binary_cross_entropy(student, labels))
    assert torch.allclose(loss, 0.7 * ce + 0.3 * kd)


def test_metrics_reward_only_right_scores_and_the_threshold_is_chosen_by_f1():
    labels = np.array([[1, 0, 1], [0, 1, 0], [1, 1, 0], [0, 0, 0]])
    perfect = np.where(labels == 1, 3.0, -3.0)
    metrics = multilabel_metrics(perfect, labels)
    assert metrics["map"] == metrics["map_micro"] == metrics["f1"] == metrics["accuracy"] == 1.0
    inverted = multilabel_metrics(-perfect, labels)
    assert inverted["map"] < 0.7 and inverted["f1"] == 0.0 and inverted["accuracy"] == 0.0
    # Scores that are right only above 0.2 (sigmoid): the chosen threshold is between them, F1 then 1
    scores = np.where(labels == 1, 0.3, 0.1)
    task = MultiLabel(3)
    threshold = task.choose_threshold(np.log(scores / (1 - scores)), labels)
    assert 0.1 < threshold <= 0.3 and task.metrics(np.log(scores / (1 - scores)), labels)["f1"] == 1.0


def test_mixup_blends_label_sets_as_it_blends_images():
    torch.manual_seed(0)
    images = torch.rand(6, 3, 8, 8) * 255
    labels = torch.tensor([[1, 0, 1], [0, 1, 0], [1, 1, 0], [0, 0, 0], [1, 0, 0], [0, 0, 1]]).float()
    mixed, targets, _ = BatchMix(MultiLabel(3).targets, mixup_alpha=1.0)(images, labels)
    # each target row is lam * own + (1 - lam) * partner's: recover lam from a pixel, check the labels follow
    for i in range(6):
        for j in range(6):
            lam = ((mixed[i] - images[j]) / (images[i] - images[j])).flatten()
            if torch.allclose(lam, lam[0].expand_as(lam), atol=1e-3):
                assert torch.allclose(targets[i], lam[0] * labels[i] + (1 - lam[0]) * labels[j], atol=1e-3)
                break
        else:
            assert torch.allclose(mixed[i], images[i]) and torch.equal(targets[i], labels[i])  # its own partner
    assert SingleLabel(3).targets(torch.tensor([2, -1])).tolist() == [[0, 0, 1], [0, 0, 0]]


# ---------------------------------------------------------------- the data: detected, checked


def save(splits: dict, root: Path, features: Features | None = None) -> str:
    DatasetDict({k: Dataset.from_dict(v, features=features) for k, v in splits.items()}).save_to_disk(str(root))
    return str(root)


def images(n):
    return [{"bytes": png_bytes(im), "path": None} for im in random_images(n, size=12)]


@pytest.mark.parametrize("labels,dtype,names", [
    ([["cat", "dog"], [], ["dog"], ["cat"]], "string", ["cat", "dog"]),  # names, and an image with no label
    ([[0, 2], [1], [], [2]], "int64", ["0", "1", "2"]),  # class ids
])
def test_list_columns_are_several_labels_per_image(tmp_path, labels, dtype, names):
    path = save({"train": {"image": images(4), "labels": labels}, "test": {"image": images(2), "labels": labels[:2]}},
                tmp_path / "d", Features({"image": Image(), "labels": List(Value(dtype))}))
    data = load_image_data(path, validation_split=0.5, seed=0)
    assert data.task.multi_label and data.label_names == names
    assert all(isinstance(v, list) for v in data.train.with_format(None)["labels"])
    assert data.task.sample_labels([]).tolist() == [0.0] * len(names)  # no positive label: allowed


def test_a_sequence_of_class_labels_keeps_its_names_and_an_image_folder_reads_metadata_lists(tmp_path):
    feature = List(ClassLabel(names=["sky", "sea", "sand"]))
    path = save({"train": {"image": images(4), "labels": [[0], [1, 2], [], [0, 2]]}}, tmp_path / "d",
                Features({"image": Image(), "labels": feature}))
    data = load_image_data(path, validation_split=0.5, seed=0)
    assert data.task.multi_label and data.label_names == ["sky", "sea", "sand"]

    folder = tmp_path / "folder"
    folder.mkdir()
    lines = []
    for i, image in enumerate(random_images(6, size=12)):
        image.save(folder / f"{i}.png")
        lines.append(json.dumps({"file_name": f"{i}.png", "labels": [["a"], ["a", "b"], []][i % 3]}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    data = load_image_data(train_dir=str(folder), validation_split=0.5, seed=0)
    assert data.task.multi_label and data.label_names == ["a", "b"]


def test_multi_label_flag_turns_single_labels_into_sets_of_one(cifar_like):
    data = load_image_data(cifar_like, multi_label=True, seed=0)
    assert data.task.multi_label and data.label_names == ["red", "green", "blue"]  # the ClassLabel's own names
    first = data.train.with_format(None)[0]
    assert first["label"] == [first["label"][0]] and len(first["label"]) == 1


def test_bad_label_lists_are_refused_in_one_line(tmp_path):
    features = Features({"image": Image(), "labels": List(Value("string"))})
    path = save({"train": {"image": images(2), "labels": [["cat"], ["dog"]]},
                 "test": {"image": images(1), "labels": [["zebra"]]}}, tmp_path / "unknown", features)
    with pytest.raises(UserError, match="the test split has labels no training image has: zebra"):
        load_image_data(path, validation_split=0.5)

    folder = tmp_path / "mixed"
    folder.mkdir()
    for i, image in enumerate(random_images(4, size=12)):
        image.save(folder / f"{i}.png")
    (folder / "metadata.jsonl").write_text("".join(json.dumps({"file_name": f"{i}.png", "labels": v}) + "\n"
                                                   for i, v in enumerate([["a"], "b", ["a"], ["b"]])))
    with pytest.raises(UserError, match="holds a list of labels in some rows and a single value in others"):
        load_image_data(train_dir=str(folder), validation_split=0.5)


def test_a_distilled_student_scores_the_teacher_at_the_teachers_own_threshold(tmp_path, monkeypatch):
    """The teacher's exact-match accuracy and the agreement take the teacher's label sets at the threshold it was
    saved with, the student's at its own: scores right only above 0.3 (the teacher's) and above 0.5 (the
    student's) give two perfect label sets; at the student's threshold the teacher would predict no label at all."""
    labels = [[0, 2], [1], [0, 1], []]
    features = Features({"image": Image(), "labels": List(ClassLabel(names=["a", "b", "c"]))})
    path = save({"train": {"image": images(8), "labels": labels * 2}, "test": {"image": images(4), "labels": labels}},
                tmp_path / "d", features)
    data = load_image_data(path, validation_split=0.25, seed=0)
    teacher = load_model(make_checkpoint("resnet", tmp_path / "t", image_size=12), data.label_names)
    teacher.model.config.multi_label_threshold = 0.3
    student = load_model(make_checkpoint("resnet", tmp_path / "s", image_size=12), data.label_names)
    attach_transforms(data, "none")
    args = DistillationConfig(output_dir=str(tmp_path / "o"), report_to="none", use_cpu=True,
                              dataloader_num_workers=0)
    trainer = DistillationTrainer(teacher=teacher.model, teacher_spec=teacher.spec,
                                  **trainer_kwargs(args, data, student))
    data.task.threshold = 0.5  # the student's, as chosen on validation
    multi_hot = np.array([[1, 0, 1], [0, 1, 0], [1, 1, 0], [0, 0, 0]])

    def logits(positive, negative):
        scores = np.where(multi_hot == 1, positive, negative)
        return np.log(scores / (1 - scores))

    monkeypatch.setattr(trainer, "teacher_predict", lambda dataset, description="": (np.arange(4), logits(0.4, 0.1)))
    metrics = trainer.extra_test_metrics(data.test, PredictionOutput(logits(0.6, 0.2), multi_hot, {}))
    assert metrics["test_teacher_accuracy"] == 1.0 and metrics["test_agreement"] == 1.0
    assert metrics["test_teacher_threshold"] == 0.3 and metrics["test_teacher_map"] == 1.0
    del teacher.model.config.multi_label_threshold  # a model saved without one: 0.5, as its evaluation alone
    assert MultiLabel(3).of_model(teacher.model.config).threshold == 0.5


# ---------------------------------------------------------------- trained, saved, served, distilled


def multilabel_flags(checkpoint, out, *extra):
    return ["--model_name_or_path", checkpoint, "--from_scratch", "--dataset_name", "digits-multilabel",
            "--output_dir", str(out), "--num_train_epochs", "6", "--per_device_train_batch_size", "64", "--dataloader_num_workers", "0", "--disable_tqdm", "true",
            "--seed", "0", "--report_to", "none", *extra]


@pytest.fixture(scope="module")
def multilabel_run(tmp_path_factory):
    checkpoint = make_checkpoint("resnet", tmp_path_factory.mktemp("arch"), image_size=32)
    out = tmp_path_factory.mktemp("multilabel-run")
    return out, run_finetune.main(multilabel_flags(checkpoint, out))


def validation_predictions(run: Path, work: Path) -> tuple[np.ndarray, np.ndarray]:
    """A saved digits-multilabel model's logits on the validation split its run held out (seed 0), and the labels."""
    data = load_image_data("digits-multilabel", seed=0)
    model = load_model(str(run), data.label_names, problem_type="multi_label_classification")
    attach_transforms(data, "none")
    args = TransferConfig(output_dir=str(work), report_to="none", use_cpu=True, dataloader_num_workers=0)
    output = TransferTrainer(**trainer_kwargs(args, data, model)).predict(data.validation)
    return output.predictions, output.label_ids


@pytest.mark.slow
def test_composited_digits_are_learned_and_the_model_serves_each_labels_score(multilabel_run, tmp_path):
    out, results = multilabel_run
    # Two or three of ten digits per image: a model that ranks at random has mAP about 0.25
    assert results["test_map"] >= 0.85 and results["test_f1"] >= 0.75
    config = json.loads((out / "config.json").read_text())
    assert config["problem_type"] == "multi_label_classification"
    assert config["multi_label_threshold"] == results["test_threshold"] == results["eval_threshold"]
    # chosen on the validation split: of the candidates, the best micro-F1 of the model's validation predictions
    logits, labels = validation_predictions(out, tmp_path / "predict")
    f1 = [f1_score(labels, sigmoid(logits) >= t, average="micro") for t in THRESHOLDS]
    best = [t for t, score in zip(THRESHOLDS, f1) if score == max(f1)]
    assert config["multi_label_threshold"] == best[len(best) // 2]  # the middle of a tie
    per_class = json.loads((out / "test_per_class.json").read_text())
    assert set(per_class) == {"threshold", *map(str, range(10))} and per_class["3"]["average_precision"] > 0.5

    test = digits_multilabel_dataset()["test"]
    classifier = pipeline("image-classification", model=str(out), top_k=10)
    scores = classifier(test[0]["image"])
    assert len(scores) == 10 and sum(s["score"] for s in scores) > 1.2  # sigmoids, not a softmax
    shown = {s["label"] for s in scores if s["score"] >= config["multi_label_threshold"]}
    assert shown == {str(d) for d in test[0]["labels"]}  # the first test image, read right
    card = (out / "README.md").read_text()
    assert "mAP (macro)" in card and "multi_label_threshold" in card and "multi-label-classification" in card
    table = build_report([out], tmp_path / "report")
    assert "test mAP" in table and f"{results['test_map']:.4f}" in table


@pytest.mark.slow
def test_a_saved_multilabel_model_is_evaluated_with_its_own_threshold(multilabel_run, tmp_path):
    out, results = multilabel_run
    again = run_finetune.main(["--model_name_or_path", str(out), "--dataset_name", "digits-multilabel",
                               "--do_train", "false", "--output_dir", str(tmp_path / "eval"), *quick_flags()])
    assert again["test_threshold"] == results["test_threshold"]
    for key in ("test_map", "test_f1", "test_accuracy"):
        assert again[key] == pytest.approx(results[key], abs=1e-6), key


@pytest.mark.slow
def test_a_multilabel_teacher_teaches_through_per_class_sigmoid_targets_alone(multilabel_run, tmp_path):
    teacher, teacher_results = multilabel_run
    student = make_checkpoint("resnet", tmp_path / "arch", image_size=16, mean=(0.5,) * 3, std=(0.5,) * 3)
    # alpha 1: the labels play no part in training; what the student learns comes from the teacher's scores
    results = run_distill.main([
        "--teacher_model_name_or_path", str(teacher), "--student_model_name_or_path", student, "--from_scratch",
        "--dataset_name", "digits-multilabel", "--output_dir", str(tmp_path / "out"), "--num_train_epochs", "6",
        "--per_device_train_batch_size", "64", "--dataloader_num_workers", "0", "--disable_tqdm", "true",
        "--seed", "0", "--report_to", "none", "--alpha", "1"])
    # the teacher scored as its own run scored it, at its own threshold; agreement between each model's label sets
    # at its own threshold
    assert results["test_teacher_map"] == pytest.approx(teacher_results["test_map"])
    # The teacher teaches with its logits from before calibration (models/loading.py, uncalibrate): its threshold is
    # the same decision on them, sigmoid(T x logit(t))
    t, threshold = teacher_results["calibration_temperature"], teacher_results["test_threshold"]
    assert results["test_teacher_threshold"] == pytest.approx(sigmoid(t * np.log(threshold / (1 - threshold))))
    assert results["test_teacher_accuracy"] == pytest.approx(teacher_results["test_accuracy"])
    assert results["test_teacher_f1"] == pytest.approx(teacher_results["test_f1"])  # beside the student's test_f1
    predicted = [json.loads((run / "test_predictions.json").read_text()) for run in (teacher, tmp_path / "out")]
    by_row = [dict(zip(p["rows"], p["predictions"])) for p in predicted]
    assert results["test_agreement"] == pytest.approx(np.mean([by_row[0][r] == by_row[1][r] for r in by_row[0]]))
    assert results["test_map"] >= 0.7  # a student ranking at random: about 0.25
    card = (tmp_path / "out" / "README.md").read_text()
    assert "teacher mAP" in card and "student-teacher agreement" in card
    with pytest.raises(UserError, match="the teacher was trained for several labels per image"):
        run_distill.main(["--teacher_model_name_or_path", str(teacher), "--student_model_name_or_path", student,
                          "--from_scratch", "--dataset_name", "digits", "--output_dir", str(tmp_path / "o2"),
                          *quick_flags()])


def test_a_distillation_loss_of_one_class_per_image_is_refused_for_several_labels(tiny_resnet, tmp_path):
    """DIST correlates each image's softmax with the teacher's: refused, in one line naming the loss that applies,
    before the teacher or the student is loaded (the teacher path is not even a model)."""
    with pytest.raises(UserError, match=r"^--distillation_loss dist compares each image's class distribution .* "
                                        r"use --distillation_loss kl$"):
        run_distill.main(["--teacher_model_name_or_path", str(tmp_path), "--student_model_name_or_path", tiny_resnet,
                          "--dataset_name", "digits-multilabel", "--distillation_loss", "dist",
                          "--output_dir", str(tmp_path / "out"), *quick_flags()])
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_a_multilabel_model_quantizes_judged_by_its_decisions_and_micro_f1(multilabel_run, tmp_path, capsys):
    """int8 and fp16 of a model with several labels per image, judged on the test split by each class's decision at
    the threshold the model carries and the micro-F1 those decisions earn (it was refused: a top-1 check does not
    judge it); the agreement recomputed here from the files themselves."""
    import onnxruntime
    from transformers import AutoImageProcessor

    from hf_transfer.cli.tools import main as tools
    from hf_transfer.errors import run_cli

    run, results = multilabel_run
    out = tmp_path / "onnx"
    tools(["export", str(run), "--output", str(out), "--quantize", "int8", "--precision", "fp16",
           "--latency_repeats", "3", "--latency_batch", "8"])
    exported = json.loads((out / "export_results.json").read_text())
    assert exported["onnx_f1"] == pytest.approx(results["test_f1"], abs=0.01)
    assert exported["onnx_map"] == pytest.approx(results["test_map"], abs=0.01)
    threshold = results["test_threshold"]
    test = digits_multilabel_dataset()["test"]
    prepared = AutoImageProcessor.from_pretrained(str(run))(images=[r.convert("RGB") for r in test["image"]],
                                                            return_tensors="np")["pixel_values"]
    decisions = {name: sigmoid(onnxruntime.InferenceSession(str(out / f"model{name}.onnx")).run(
        None, {"pixel_values": prepared})[0]) >= threshold for name in ("", ".int8", ".fp16")}
    truth = np.stack([np.isin(np.arange(10), labels) for labels in test["labels"]])
    for name, suffix in (("int8", ".int8"), ("fp16", ".fp16")):
        figures = exported["precisions"][name]
        assert figures["threshold"] == threshold and figures["refused"] is None, figures
        assert figures["decision_agreement"] == pytest.approx((decisions[suffix] == decisions[""]).mean())
        assert figures["f1"] == pytest.approx(f1_score(truth, decisions[suffix], average="micro"))
        assert figures["fp32_f1"] == exported["onnx_f1"] and figures["f1_drop"] <= 0.01
    assert exported["precisions"]["fp16"]["decision_agreement"] >= 0.99
    table = exported["latency"]
    rows = {row["runtime"]: row for row in table["rows"]}
    assert rows["ONNX int8"]["accuracy"] == exported["precisions"]["int8"]["f1"]
    assert rows["ONNX int8"]["agreement"] == exported["precisions"]["int8"]["decision_agreement"]
    assert table["score"] == f"micro-F1 at threshold {threshold:g}"
    assert f"test micro-F1 at threshold {threshold:g}" in (run / "README.md").read_text()
    # the refusal names the figure it judged by
    code = run_cli(tools, ["export", str(run), "--output", str(tmp_path / "refused"), "--quantize", "int8",
                           "--max_accuracy_drop", "-1", "--latency_repeats", "0"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and f"micro-F1 drop at threshold {threshold:g}" in err[0], err
    # images without labels: judged by the decisions that changed, still named as the model's score; the card keeps
    # the table of the run's own test split
    card = (run / "README.md").read_text()
    (tmp_path / "images").mkdir()
    for i, image in enumerate(test["image"][:12]):
        image.save(tmp_path / "images" / f"{i}.png")
    tools(["export", str(run), "--output", str(tmp_path / "unlabelled"), "--images", str(tmp_path / "images"),
           "--quantize", "int8", "--calibration_images", "32", "--latency_repeats", "2", "--latency_batch", "4"])
    unlabelled = json.loads((tmp_path / "unlabelled" / "export_results.json").read_text())
    assert "f1" not in unlabelled["precisions"]["int8"] and unlabelled["latency"]["score"] == table["score"]
    assert unlabelled["card"] is None and (run / "README.md").read_text() == card
