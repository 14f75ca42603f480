"""`python -m hf_transfer export RUN_DIR --quantize int8 / --precision fp16`: smaller models, calibrated on the run's
training images, checked on its test split against fp32 (refused past --max_accuracy_drop), and a latency and size
table in export_results.json and the model card."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from helpers import make_checkpoint, random_images

import run_distill
from hf_transfer.cli.tools import main as tools
from hf_transfer.errors import run_cli
from hf_transfer.run.card import CardInfo, write_model_card
from hf_transfer.run.record import read_card
from hf_transfer.tools.deployment import SECTION
from hf_transfer.tools.report import build_report

FAST = ["--latency_repeats", "3", "--latency_batch", "8"]


def exported(run_dir, out: Path, *flags) -> dict:
    tools(["export", str(run_dir), "--output", str(out), *flags])
    return json.loads((out / "export_results.json").read_text())


def op_types(path) -> set[str]:
    return {node.op_type for node in onnx.load(str(path)).graph.node}


def initializer_types(path) -> set[int]:
    return {t.data_type for t in onnx.load(str(path)).graph.initializer}


@pytest.fixture(scope="module")
def student(digits_run, tmp_path_factory):
    """A ResNet-18 student (from scratch, 16 px) distilled from the digits teacher: the README's walkthrough."""
    teacher, _ = digits_run
    out = tmp_path_factory.mktemp("student")
    run_distill.main(["--teacher_model_name_or_path", str(teacher), "--student", "resnet18", "--from_scratch",
                      "--image_size", "16", "--dataset_name", "digits", "--output_dir", str(out),
                      "--num_train_epochs", "2", "--per_device_train_batch_size", "32", "--dataloader_num_workers", "0",
                      "--disable_tqdm", "true", "--report_to", "none", "--seed", "0",
                      # the 2 epochs asked for (82 steps), not distillation's patient length (563): a quantization test
                      "--min_seen_images", "0", "--min_train_steps", "0"])
    return out


@pytest.mark.slow
def test_a_distilled_student_quantizes_within_the_threshold_and_its_card_shows_the_table(student, tmp_path):
    test = json.loads((student / "test_results.json").read_text())
    card_before = (student / "README.md").read_text()
    results = exported(student, tmp_path / "onnx", "--quantize", "int8", *FAST)

    int8 = results["precisions"]["int8"]
    path = Path(int8["model"])
    assert path == tmp_path / "onnx" / "model.int8.onnx" and int8["refused"] is None
    assert int8["method"] == "static" and int8["calibration_images"] == 256
    assert int8["calibration_source"] == "256 images of the run's training split"
    # really int8: activations quantized (QDQ pairs) and weights stored as int8, a quarter of the fp32 file or less
    assert {"QuantizeLinear", "DequantizeLinear"} <= op_types(path)
    assert onnx.TensorProto.INT8 in initializer_types(path)
    assert path.stat().st_size == int8["bytes"] < results["onnx_bytes"] / 3
    # on the run's own test split: fp32 scores what the run scored, int8 within the threshold of it
    assert int8["images"] == test["test_samples"] and int8["fp32_accuracy"] == pytest.approx(test["test_accuracy"])
    assert int8["accuracy_drop"] == pytest.approx(test["test_accuracy"] - int8["accuracy"])
    assert int8["accuracy_drop"] <= int8["max_accuracy_drop"] == 0.01 and int8["top1_agreement"] >= 0.97

    table = results["latency"]
    rows = {(row["model"], row["runtime"]): row for row in table["rows"]}
    teacher = f"teacher ({Path(json.loads((student / 'run_args.json').read_text())['shaping']['training.teacher_model_name_or_path']).name})"
    assert list(rows) == [("this model", "PyTorch fp32"), ("this model", "ONNX fp32"), ("this model", "ONNX int8"),
                          (teacher, "PyTorch fp32"), (teacher, "ONNX fp32")]
    assert table["threads"] >= 1 and table["batches"] == [1, 8] and table["repeats"] == 3
    for row in rows.values():
        for batch in ("batch_1", "batch_8"):
            assert 0 < row[batch]["median_ms"] <= row[batch]["p90_ms"]
    assert rows[("this model", "ONNX int8")]["accuracy"] == int8["accuracy"]
    assert rows[("this model", "ONNX int8")]["agreement"] == int8["top1_agreement"]
    assert rows[("this model", "PyTorch fp32")]["parameters"] > 10_000_000  # ResNet-18's 11.2 M
    assert rows[(teacher, "PyTorch fp32")]["parameters"] < rows[("this model", "PyTorch fp32")]["parameters"]
    assert rows[(teacher, "ONNX fp32")]["accuracy"] == test["test_teacher_accuracy"]
    assert rows[(teacher, "ONNX fp32")]["agreement"] == test["test_agreement"]

    card = (student / "README.md").read_text()
    assert results["card"] == str(student / "README.md") and card.startswith(card_before.rstrip("\n"))
    assert card.count(f"<!-- hf_transfer:{SECTION} -->") == 1 and "| this model | ONNX int8 |" in card
    # and in the report, from the run's folder though the files went elsewhere: student and teacher side by side
    build_report([student], tmp_path / "report")
    report = (tmp_path / "report" / "report.md").read_text()
    assert f"## Deployment of {student}: latency and size" in report and "| this model | ONNX int8 |" in report
    assert f"| {teacher} | ONNX fp32 |" in report and f"Files: `{tmp_path / 'onnx'}`." in report
    page = (tmp_path / "report" / "report.html").read_text()
    assert "<h3>Deployment: latency and size</h3>" in page and "<td>ONNX int8</td>" in page
    # a second export replaces the section (no int8 this time), the rest of the card as it was
    exported(student, tmp_path / "again", "--latency_repeats", "2", "--latency_batch", "4")
    again = (student / "README.md").read_text()
    assert again.count("## Deployment: latency and size") == 1 and "ONNX int8" not in again
    assert again.startswith(card_before.rstrip("\n")) and "batch 4 median" in again
    build_report([student], tmp_path / "report")  # the report shows the latest export's table
    assert "batch 4 median" in (tmp_path / "report" / "report.md").read_text()
    assert f"Files: `{tmp_path / 'again'}`." in (tmp_path / "report" / "report.md").read_text()
    assert "<td>ONNX int8</td>" not in (tmp_path / "report" / "report.html").read_text()
    # the card rendered again (as a push does) keeps the section
    write_model_card(student, CardInfo(**read_card(student)), test, None)
    assert (student / "README.md").read_text().count("## Deployment: latency and size") == 1
    # an export elsewhere without a table leaves the table of the files in again/ (they are still there) ...
    exported(student, tmp_path / "third", "--latency_repeats", "0", "--max_images", "16")
    assert json.loads((student / "deployment.json").read_text())["files"] == str((tmp_path / "again").resolve())
    # ... an export that replaces those files without a new table takes it out: it would describe files now gone
    exported(student, tmp_path / "again", "--latency_repeats", "0", "--max_images", "16")
    assert not (student / "deployment.json").exists()
    card = (student / "README.md").read_text()
    assert f"hf_transfer:{SECTION}" not in card and "Deployment: latency and size" not in card
    assert card.startswith(card_before.split("\n\n")[0])  # the rest of the card as it was


def test_a_quantized_model_below_the_threshold_is_refused_in_one_line_and_kept(digits_run, tmp_path, capsys):
    run_dir, _ = digits_run
    out = tmp_path / "onnx"
    code = run_cli(tools, ["export", str(run_dir), "--output", str(out), "--quantize", "int8",
                           "--max_accuracy_drop", "-1", "--latency_repeats", "0", "--calibration_images", "32"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    results = json.loads((out / "export_results.json").read_text())
    int8 = results["precisions"]["int8"]
    assert err[0].startswith(f"error: int8 {out / 'model.int8.onnx'}: accuracy drop {int8['accuracy_drop']:.4f} "
                             f"(top-1 agreement with fp32 {int8['top1_agreement']:.4f}, accuracy {int8['accuracy']:.4f} "
                             f"(fp32 {int8['fp32_accuracy']:.4f})), above --max_accuracy_drop -1")
    assert "above --max_accuracy_drop -1" in err[0] and int8["refused"] in err[0]
    assert (out / "model.int8.onnx").is_file() and "latency" not in results


def test_precision_flags_are_checked_before_any_work(digits_run, tmp_path, capsys):
    run_dir, _ = digits_run
    for argv, message in [(["--quantize", "int4"], "invalid choice: 'int4'"),
                          (["--precision", "bf16"], "invalid choice: 'bf16'"),
                          (["--calibration_images", "0"], "--calibration_images must be >= 1"),
                          (["--latency_batch", "0"], "--latency_batch must be >= 1"),
                          # nan would switch the refusal off (no drop is > nan), inf too
                          (["--max_accuracy_drop", "nan"], "--max_accuracy_drop must be a finite fraction"),
                          (["--max_accuracy_drop", "inf"], "--max_accuracy_drop must be a finite fraction")]:
        try:
            code = run_cli(tools, ["export", str(run_dir), "--output", str(tmp_path / "o"), *argv])
        except SystemExit as exc:  # argparse's own refusals
            code = exc.code
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and message in err[0], (argv, err)
    assert not (tmp_path / "o").exists()


def test_fp16_halves_the_file_and_keeps_the_run_s_answers(digits_run, tmp_path):
    run_dir, _ = digits_run
    results = exported(run_dir, tmp_path / "onnx", "--precision", "fp16", "--latency_repeats", "0")
    fp16 = results["precisions"]["fp16"]
    assert onnx.TensorProto.FLOAT16 in initializer_types(fp16["model"]) and fp16["refused"] is None
    assert fp16["bytes"] < 0.6 * results["onnx_bytes"]
    assert fp16["fp32_accuracy"] == results["onnx_accuracy"] and abs(fp16["accuracy_drop"]) <= 0.01
    assert "int8" not in results["precisions"] and "latency" not in results
    # exported again without fp16 (another model, or the same one after it was retrained): the fp16 file of the
    # earlier export, which export_results.json no longer names, must not stay beside the new model.onnx
    again = exported(run_dir, tmp_path / "onnx", "--latency_repeats", "0", "--max_images", "16")
    assert list(again["precisions"]) == ["fp32"] and not (tmp_path / "onnx" / "model.fp16.onnx").exists()


def test_a_model_without_a_run_gets_dynamic_int8_not_calibrated_on_its_own_check(tmp_path):
    model = make_checkpoint("hf-resnet", tmp_path / "model")
    (tmp_path / "images" / "a").mkdir(parents=True)
    for i, image in enumerate(random_images(6, size=40)):
        image.save(tmp_path / "images" / "a" / f"{i}.png")
    results = exported(model, tmp_path / "onnx", "--images", str(tmp_path / "images"), "--quantize", "int8",
                       "--max_accuracy_drop", "1", *FAST)
    int8 = results["precisions"]["int8"]
    assert int8["method"] == "dynamic" and "no training images" in int8["why_dynamic"]
    assert "accuracy" not in int8 and 0 <= int8["top1_agreement"] <= 1
    assert results["card"] is None and len(results["latency"]["rows"]) == 3


def test_calibration_images_are_the_run_s_training_images_prepared_as_for_evaluation(digits_run):
    """The images that calibrate int8 are drawn from the training split (never the test split that checks it)."""
    from hf_transfer.tools import export

    run_dir, _ = digits_run
    pictures, source = export._calibration_images(run_dir, None, 20)
    saved = export._saved(run_dir)
    data = export._run_data(saved)
    train = {np.asarray(p).tobytes() for p in export._decoded(data.train.with_format(None)[data.image_column],
                                                                  "train")}
    test = {np.asarray(p).tobytes() for p in export._decoded(data.test.with_format(None)[data.image_column], "test")}
    assert len(pictures) == 20 and source == "20 images of the run's training split"
    assert all(np.asarray(p).tobytes() in train for p in pictures)
    assert not any(np.asarray(p).tobytes() in test for p in pictures)


ORT_FAILURE = ("[ONNXRuntimeError] : 9 : NOT_IMPLEMENTED : Could not find an implementation for ConvInteger(10) node "
               "with name '/conv/Conv_quant'\n  at onnxruntime/core/session/inference_session.cc:1805\n  (more lines)")


@pytest.mark.parametrize("where", ["quantize", "run"])
def test_a_model_onnxruntime_cannot_quantize_or_run_in_int8_is_refused_in_one_line(digits_run, tmp_path, capsys,
                                                                                    monkeypatch, where):
    """No student preset hits this (tests/test_student_presets.py), but an operator onnxruntime cannot quantize, or
    has no int8 kernel for, must end the export in one line that says which, not in a page of traceback; and no int8
    file is left to be served, not even one an earlier export wrote there."""
    import onnxruntime.quantization

    from hf_transfer.tools import latency

    def fails(*args, **kwargs):
        raise RuntimeError(ORT_FAILURE)

    if where == "quantize":
        monkeypatch.setattr(onnxruntime.quantization, "quantize_static", fails)
    else:
        real = latency.onnx_session
        monkeypatch.setattr(latency, "onnx_session", lambda path, *a, **k: fails() if "int8" in str(path)
                            else real(path, *a, **k))
    run_dir, _ = digits_run
    out = tmp_path / "onnx"
    out.mkdir()
    (out / "model.int8.onnx").write_bytes(b"an earlier export's int8 model")
    code = run_cli(tools, ["export", str(run_dir), "--output", str(out), "--quantize", "int8", "--max_images", "32",
                           "--calibration_images", "16", "--latency_repeats", "0"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    said = {"quantize": "onnxruntime cannot quantize this model to int8: ",
            "run": "onnxruntime cannot run the int8 model of this timm_wrapper model: "}[where]
    assert err[0] == f"error: {said}{ORT_FAILURE.splitlines()[0]}"
    assert not (out / "model.int8.onnx").exists() and (out / "model.onnx").is_file()


def test_a_smaller_precision_of_a_multilabel_model_is_judged_by_its_decisions_at_the_threshold():
    """Several labels per image: the answers are each class's decision at the model's threshold, so agreement counts
    those (not the top-1, which can stay while a second label is lost) and the score is micro-F1 at the threshold."""
    from hf_transfer.tasks.classification import MultiLabel, SingleLabel
    from hf_transfer.tools import checks

    task = MultiLabel(3, threshold=0.7)  # decision: logit >= log(0.7 / 0.3) = 0.847
    fp32 = np.array([[3.0, 1.0, -2.0], [2.0, -1.0, -3.0]])
    int8 = np.array([[3.1, 0.8, -2.0], [2.1, -1.0, -3.0]])  # the top-1 stays; image 0's second label falls below
    labels = [[0, 1], [0]]
    figures = checks.against_fp32(int8, fp32, labels, task)
    assert figures["threshold"] == 0.7 and "top1_agreement" not in figures
    assert figures["decision_agreement"] == pytest.approx(5 / 6) and figures["label_set_agreement"] == 0.5
    assert figures["fp32_f1"] == 1.0 and figures["f1"] == pytest.approx(0.8)  # 2 of 3 positives found, none wrong
    assert figures["f1_drop"] == pytest.approx(0.2) and checks.drop_of(figures)[0] == pytest.approx(0.2)
    assert checks.drop_of(checks.against_fp32(int8, fp32, None, task))[0] == pytest.approx(1 / 6)  # no labels
    assert checks.agreement(figures) == figures["decision_agreement"]
    # one class per image: the same logits agree on the top-1 of both images
    single = checks.against_fp32(int8, fp32, [0, 0], SingleLabel(3))
    assert single["top1_agreement"] == 1.0 and single["accuracy_drop"] == 0.0


def test_a_multilabel_model_without_a_threshold_is_refused_before_any_work(tmp_path, capsys):
    """Its answers are decisions at the threshold its run chose at the end (a checkpoint-N folder has none): without
    one, predict could not serve the file and a smaller precision would be judged at a threshold never chosen."""
    run = tmp_path / "checkpoint-20"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"model_type": "resnet", "problem_type": "multi_label_classification"}))
    (run / "preprocessor_config.json").write_text("{}")
    assert run_cli(tools, ["export", str(run), "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "several labels per image but no decision threshold" in err[0], err
    assert not (tmp_path / "o").exists()


def test_a_table_measured_on_a_busy_machine_says_so():
    from hf_transfer.tools.deployment import cells

    row = {"model": "this model", "runtime": "ONNX fp32", "bytes": 1e6, "parameters": 1e6,
           "batch_1": {"median_ms": 1.0, "p90_ms": 2.0, "images_per_s": 1000.0},
           "batch_8": {"median_ms": 4.0, "p90_ms": 5.0, "images_per_s": 2000.0}}
    table = {"batches": [1, 8], "threads": 2, "repeats": 3, "warmup": 2, "images": "8 images", "rows": [row],
             "machine": {"cpu": "x86_64", "cpu_count": 2, "torch": "2", "onnxruntime": "1", "load_average": 1.5}}
    assert "busy" not in cells(table)[2]
    table["machine"]["load_average"] = 6.0
    assert "The machine was busy (load average 6 on 2 cores)" in cells(table)[2]
