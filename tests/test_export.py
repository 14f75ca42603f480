"""`python -m hf_transfer export RUN_DIR --format onnx`: the exported model gives PyTorch's logits on the run's
own test images, takes any batch size, and carries what a server needs to prepare an image and name the class."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
from conftest import quick_flags
from helpers import colour_dataset, make_checkpoint, random_images
from transformers import AutoConfig

import run_finetune
from hf_transfer.cli.tools import main as tools
from hf_transfer.errors import UserError, run_cli
from hf_transfer.tools import checks, export


def exported(run_dir, out: Path, *flags) -> dict:
    tools(["export", str(run_dir), "--format", "onnx", "--output", str(out), *flags])
    return json.loads((out / "export_results.json").read_text())


def check_served_like_the_run(run_dir: Path, out: Path, results: dict) -> None:
    """The ONNX model scores the run's test split exactly as the run did, at any batch size, with its facts inside."""
    test = json.loads((run_dir / "test_results.json").read_text())
    assert results["images"] == test["test_samples"] and results["image_source"].endswith("run's test split")
    assert results["max_abs_logit_diff"] <= 1e-4 and results["top1_disagreements"] == 0
    assert results["onnx_accuracy"] == pytest.approx(test["test_accuracy"], abs=1e-9)

    id2label = AutoConfig.from_pretrained(run_dir).id2label  # (a timm config.json keeps them as label_names)
    metadata = {p.key: p.value for p in onnx.load(str(out / "model.onnx"), load_external_data=False).metadata_props}
    assert {int(k): v for k, v in json.loads(metadata["id2label"]).items()} == id2label
    processor = json.loads((run_dir / "preprocessor_config.json").read_text())
    assert {k: v for k, v in json.loads(metadata["image_processor"]).items() if k in processor} == processor
    session = onnxruntime.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    height, width = processor["crop_size"].values() if processor.get("do_center_crop") else processor["size"].values()
    for batch in (1, 5):
        logits = session.run(None, {"pixel_values": np.zeros((batch, 3, height, width), np.float32)})[0]
        assert logits.shape == (batch, len(id2label))


@pytest.mark.slow
def test_a_timm_run_exports_and_serves_its_test_split_as_the_run_scored_it(digits_run, tmp_path):
    run_dir, _ = digits_run
    out = tmp_path / "onnx"
    check_served_like_the_run(run_dir, out, exported(run_dir, out))


@pytest.mark.slow
def test_a_transformers_run_exports_and_so_does_its_checkpoint_folder(cifar_teacher, tmp_path):
    run_dir = Path(cifar_teacher)
    check_served_like_the_run(run_dir, tmp_path / "onnx", exported(run_dir, tmp_path / "onnx"))
    checkpoint = sorted(run_dir.glob("checkpoint-*"))[-1]  # its images are its run's (run_args.json one level up)
    results = exported(checkpoint, tmp_path / "ckpt", "--max_images", "7")
    assert results["images"] == 7 and results["top1_disagreements"] == 0


@pytest.mark.slow
def test_a_run_on_relative_folders_exports_from_any_working_folder(tiny_resnet, tmp_path, monkeypatch, capsys):
    """Class folders named relative to where the run was started: export, started elsewhere, checks the run's own
    test split (what the run recorded, not its command line read again from here). A run recorded before folders
    were recorded whole is refused from elsewhere in one line that says what to do, and exports from its folder."""
    started, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    for split, part in colour_dataset(n_per_class=6).items():
        for i, row in enumerate(part):
            folder = started / "data" / split / part.features["label"].names[row["label"]]
            folder.mkdir(parents=True, exist_ok=True)
            row["img"].save(folder / f"{i}.png")
    elsewhere.mkdir()
    monkeypatch.chdir(started)
    run_finetune.main(["--model_name_or_path", tiny_resnet, "--train_dir", "data/train", "--test_dir", "data/test",
                       "--output_dir", "runs/colours", "--max_steps", "3", *quick_flags()])
    run_dir = started / "runs" / "colours"
    monkeypatch.chdir(elsewhere)
    results = exported(run_dir, tmp_path / "onnx")
    assert results["images"] == len(list((started / "data" / "test").rglob("*.png"))) == 18
    check_served_like_the_run(run_dir, tmp_path / "onnx", results)

    saved = json.loads((run_dir / "run_args.json").read_text())
    assert saved["resolved"]["data"]["train_dir"] == str(started / "data" / "train")  # what export reads
    del saved["resolved"]  # as the version before wrote it: the settings that shape training, folders whole
    (run_dir / "run_args.json").write_text(json.dumps(saved))
    assert exported(run_dir, tmp_path / "onnx-before", "--max_images", "4")["images"] == 4
    del saved["working_dir"]  # as an earlier version wrote it: the command line as typed, nothing else
    (run_dir / "run_args.json").write_text(json.dumps(saved))
    code = run_cli(tools, ["export", str(run_dir), "--output", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1] == ("error: the run's --train_dir 'data/train' is relative to the folder the run was "
                                     "started in, which a run saved by an earlier version does not record; run the "
                                     "command from that folder, or pass --images DIR with images to compare on")
    monkeypatch.chdir(started)
    assert exported(run_dir, tmp_path / "again", "--max_images", "4")["images"] == 4
    # the data moved away since: said in one line too
    (run_dir / "run_args.json").write_text(json.dumps({**saved, "working_dir": str(started)}))
    (started / "data").rename(tmp_path / "moved")
    assert run_cli(tools, ["export", str(run_dir), "--output", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: the run's --train_dir '{(started / 'data' / 'train').resolve()}' is not a folder any more; pass --images DIR with "
        "images to compare on")


def test_a_model_without_a_run_exports_against_a_folder_of_images(tmp_path):
    model = make_checkpoint("hf-resnet", tmp_path / "model", crop_pct=0.875)
    (tmp_path / "images" / "a").mkdir(parents=True)
    for i, image in enumerate(random_images(6, size=40)):
        image.resize((40 + 8 * i, 40)).save(tmp_path / "images" / "a" / f"{i}.png")
    results = exported(model, tmp_path / "onnx", "--images", str(tmp_path / "images"))
    assert results["images"] == 6 and results["max_abs_logit_diff"] <= 1e-4 and "onnx_accuracy" not in results


def test_the_tolerance_grows_with_the_size_of_each_images_logits(tmp_path):
    """float32 rounding grows with the values: logits in the thousands differ by more than 1e-4 between two correct
    runtimes. The check allows 1e-4 per unit of each image's largest |logit| (a real-weights EfficientNet-Lite0
    fine-tuned on the digits, logits up to about 30, differed by 3.0e-4 with the same top-1 on all 360 images)."""
    import torch
    from transformers import AutoModelForImageClassification

    model_dir = make_checkpoint("hf-resnet", tmp_path / "model", crop_pct=0.875)
    model = AutoModelForImageClassification.from_pretrained(model_dir)
    with torch.no_grad():
        model.classifier[-1].weight.mul_(1e4)  # the same top-1, logits 10,000 times larger
    model.save_pretrained(tmp_path / "large")
    shutil.copy(Path(model_dir) / "preprocessor_config.json", tmp_path / "large")
    (tmp_path / "images" / "a").mkdir(parents=True)
    for i, image in enumerate(random_images(6, size=40)):
        image.save(tmp_path / "images" / "a" / f"{i}.png")
    large = exported(tmp_path / "large", tmp_path / "onnx", "--images", str(tmp_path / "images"),
                     "--latency_repeats", "0")
    assert large["max_abs_logit_diff"] > 1e-4  # an absolute 1e-4 would refuse this correct file
    assert large["max_relative_logit_diff"] <= large["tolerance"] == 1e-4 and large["top1_disagreements"] == 0


def test_one_images_large_logits_do_not_widen_the_allowance_for_the_others():
    expected = np.array([[1000.0, 0.0], [0.5, -0.5]], dtype=np.float32)
    got = expected + np.array([[0.05, 0.0], [0.0, 0.001]], dtype=np.float32)  # the second image is off by 1e-3
    relative = checks.relative_differences(got, expected)
    assert relative[0] <= export.TOLERANCE < relative[1]


def test_a_nan_logit_is_a_difference_not_a_match():
    expected = np.array([[2.0, 1.0], [0.5, -0.5]], dtype=np.float32)
    got = expected.copy()
    got[0, 0] = np.nan  # max() and argmax would otherwise pass it
    assert np.isinf(checks.relative_differences(got, expected)[0]) and checks.relative_differences(got, expected)[1] == 0


def test_a_model_onnx_cannot_match_fails_and_keeps_the_file(digits_run, tmp_path, monkeypatch, capsys):
    run_dir, _ = digits_run
    monkeypatch.setattr(export, "TOLERANCE", -1.0)  # no difference can be below it: the check must fail
    code = run_cli(tools, ["export", str(run_dir), "--output", str(tmp_path / "onnx"), "--max_images", "4"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("error: the ONNX model differs from PyTorch on 4 images of the run's test")
    assert (tmp_path / "onnx" / "model.onnx").is_file()
    results = json.loads((tmp_path / "onnx" / "export_results.json").read_text())
    assert err[-1].startswith(f"error: {results['precisions']['fp32']['refused']}; ")  # predict reads it


def test_export_refusals_are_one_line(digits_run, tmp_path, capsys):
    run_dir, _ = digits_run
    no_run = tmp_path / "copied"  # a saved model whose run is unknown: no test images to compare on
    shutil.copytree(run_dir, no_run, ignore=shutil.ignore_patterns("checkpoint-*", "run_args.json"))
    (tmp_path / "empty").mkdir()
    cases = [
        ([str(tmp_path / "missing")], "is not a directory"),
        ([str(tmp_path / "empty")], "holds no saved model (config.json and preprocessor_config.json)"),
        ([str(no_run)], "has no run_args.json (not a run of this project) to find its test images; pass --images"),
        ([str(no_run), "--images", str(tmp_path / "empty")], "--images"),
        ([str(run_dir), "--format", "tflite"], "invalid choice: 'tflite'"),
    ]
    for argv, message in cases:
        try:
            code = run_cli(tools, ["export", *argv, "--output", str(tmp_path / "o")])
        except SystemExit as exc:  # argparse's own refusals
            code = exc.code
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and message in err[0], (argv, err)  # nothing before it: one line
    (tmp_path / "a-file").write_text("")
    assert run_cli(tools, ["export", str(run_dir), "--output", str(tmp_path / "a-file")]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: --output '{tmp_path / 'a-file'}' is a file: pass a folder (it is created if missing)"]


def test_an_opset_the_exporter_could_not_write_is_refused_and_the_file_removed(tmp_path):
    """torch's exporter keeps opset 18 when it cannot convert to an older one asked for, and only logs it."""
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    path = tmp_path / "model.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    export._check_opset(path, 18)
    export._check_opset(path, None)
    assert path.is_file()
    with pytest.raises(UserError, match=r"cannot write this model in opset 5 \(it wrote 18\): pass --opset 18 or later"):
        export._check_opset(path, 5)
    assert not path.exists()
