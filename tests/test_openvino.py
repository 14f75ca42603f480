"""`python -m hf_transfer export RUN_DIR --openvino`: model.onnx converted for OpenVINO's CPU plugin, checked against
PyTorch like the ONNX file, timed beside it; refused in one line when it differs or when openvino is missing."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from hf_transfer.cli.tools import main as tools
from hf_transfer.errors import run_cli

needs_openvino = pytest.mark.skipif(importlib.util.find_spec("openvino") is None,
                                    reason="openvino is not installed (pip install -e '.[openvino]')")


def exported(run_dir, out: Path, *flags) -> dict:
    tools(["export", str(run_dir), "--output", str(out), *flags])
    return json.loads((out / "export_results.json").read_text())


@pytest.mark.slow
@needs_openvino
def test_the_openvino_model_matches_pytorch_predicts_the_run_s_answers_and_is_timed(digits_run, tmp_path):
    import openvino
    import openvino.properties.hint as hints

    from hf_transfer.tools import export, openvino_ir

    run_dir, _ = digits_run
    results = exported(run_dir, tmp_path / "onnx", "--openvino", "--latency_repeats", "3", "--latency_batch", "8")
    figures = results["openvino"]
    xml = tmp_path / "onnx" / "openvino" / "model.xml"
    assert figures["model"] == str(xml) and figures["refused"] is None
    assert figures["max_relative_logit_diff"] <= figures["tolerance"] == 1e-4 and figures["top1_disagreements"] == 0
    assert figures["inference_precision"] == "f32" and figures["openvino"] == openvino.__version__.split("-")[0]
    # fp32 weights as written (save_model would halve them to fp16 by default), the run's configs beside them
    weights = sum(p.stat().st_size for p in run_dir.glob("*.safetensors"))
    assert (xml.parent / "model.bin").stat().st_size >= 0.9 * weights
    assert json.loads((xml.parent / "config.json").read_text()) == json.loads((run_dir / "config.json").read_text())

    # read back by OpenVINO's own Core (not the export's code), in f32: the run's own top-1 on its test split
    test = json.loads((run_dir / "test_predictions.json").read_text())
    test_results = json.loads((run_dir / "test_results.json").read_text())
    pictures, labels, _, _ = export._verification_images(run_dir, None, None)
    _, processor = export._load(run_dir)
    core = openvino.Core()
    compiled = core.compile_model(core.read_model(str(xml)), "CPU", {hints.inference_precision: openvino.Type.f32})
    predicted = np.concatenate([compiled(batch.numpy())[0].argmax(-1) for batch in export._prepared(processor, pictures)])
    assert test["rows"] == list(range(len(pictures))) and test["labels"] == list(labels)
    assert predicted.tolist() == test["predictions"]
    assert figures["accuracy"] == results["onnx_accuracy"] == pytest.approx(test_results["test_accuracy"])
    # the table's compilation asks for f32 too (this CPU plugin's default is bf16 where the CPU has it)
    assert openvino_ir.compiled(xml, 1).get_property(hints.inference_precision) == openvino.Type.f32

    table = results["latency"]
    rows = {row["runtime"]: row for row in table["rows"]}
    assert list(rows) == ["PyTorch fp32", "ONNX fp32", "OpenVINO fp32"] and table["batches"] == [1, 8]
    assert rows["OpenVINO fp32"]["bytes"] == figures["bytes"] and rows["OpenVINO fp32"]["accuracy"] == figures["accuracy"]
    for batch in ("batch_1", "batch_8"):
        assert 0 < rows["OpenVINO fp32"][batch]["median_ms"] <= rows["OpenVINO fp32"][batch]["p90_ms"]
    assert table["machine"]["openvino"] == figures["openvino"]
    card = (run_dir / "README.md").read_text()
    assert "| this model | OpenVINO fp32 |" in card and f"openvino {figures['openvino']}" in card


@needs_openvino
def test_an_openvino_model_that_differs_is_refused_in_one_line_kept_and_removed_by_a_later_export(
        digits_run, tmp_path, monkeypatch, capsys):
    from hf_transfer.tools import openvino_ir

    run_dir, _ = digits_run
    out = tmp_path / "onnx"
    with monkeypatch.context() as patched:
        patched.setattr(openvino_ir, "TOLERANCE", -1.0)  # no difference can be below it: the check must fail
        code = run_cli(tools, ["export", str(run_dir), "--output", str(out), "--openvino", "--max_images", "4",
                               "--latency_repeats", "0"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    results = json.loads((out / "export_results.json").read_text())
    figures = results["openvino"]
    assert err[0] == f"error: {figures['refused']}"
    assert err[0].startswith("error: the OpenVINO model differs from PyTorch on 4 images of the run's test split: "
                             f"largest logit difference {figures['max_relative_logit_diff']:.2e} per unit of the image's logits "
                             f"(absolute {figures['max_abs_logit_diff']:.2e}; allowed -1)")
    assert (out / "openvino" / "model.xml").is_file() and (out / "openvino" / "model.bin").is_file()
    assert "latency" not in results
    # exported again without --openvino: the earlier OpenVINO files must not stay beside the new model.onnx
    again = exported(run_dir, out, "--max_images", "4", "--latency_repeats", "0")
    assert "openvino" not in again and not (out / "openvino").exists()


def test_without_openvino_the_flag_is_refused_in_one_line_before_any_work(digits_run, tmp_path, monkeypatch, capsys):
    run_dir, _ = digits_run
    monkeypatch.setitem(sys.modules, "openvino", None)  # as if it were not installed: find_spec answers None
    code = run_cli(tools, ["export", str(run_dir), "--output", str(tmp_path / "o"), "--openvino"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "pip install 'hf-vision-transfer[openvino]'" in err[0], err
    assert not (tmp_path / "o").exists()
