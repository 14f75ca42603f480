"""The benchmark and the GPU check run (tiny, on the CPU); their numbers are not asserted here."""

import json
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import benchmark  # noqa: E402


def test_every_benchmark_mode_runs_and_the_summary_has_the_goal_ratios(tmp_path):
    benchmark.make_dataset(tmp_path / "data", n_train=96, n_eval=16)
    cfg = {"data": str(tmp_path / "data"), "out": str(tmp_path / "out"), "steps": 7, "batch_size": 8, "workers": 0,
           "image_size": 32, "bf16": False, "threads": 0, **benchmark.make_checkpoints(tmp_path, 32, width=16)}
    runs = {(f"{mode}@0" if mode in benchmark.PER_WORKER_COUNT else mode): [benchmark.run_mode(mode, cfg)]
            for mode in benchmark.MODES}
    for mode, (result,) in runs.items():
        assert result["steady_images_per_second"] > 0 and result["peak_memory_mb"] > 0, mode
    assert 0 <= runs["project@0"][0]["data_wait_share"] < 1
    args = Namespace(image_size=32, batch_size=8, steps=7, rounds=1, bf16=False, width=16, depth=1)
    summary = benchmark.summarize(runs, args)
    ips = summary["train_images_per_second"]
    assert summary["train_images_per_second_rounds"]["alone"] == [ips["alone"]]
    assert summary["project_of_model_alone"] == {0: round(ips["project@0"] / ips["alone"], 3)}
    assert summary["project_vs_best_reference"] == round(ips["project@0"] / ips["reference@0"], 2)
    assert summary["trainer_overhead"] == round(ips["plain"] / ips["project@0"] - 1, 3)
    assert summary["distill_vs_parts"] > 0 and set(summary["eval_images_per_second"]) >= {"reference@0", "project@0"}


@pytest.mark.slow
def test_gpu_check_smoke(tmp_path):
    """The GPU check's speed, compile and onnx_gpu stages on tiny models on the CPU (the compile stage's child process
    with the eager backend; onnx_gpu through onnxruntime's CPU provider); the JSON is the file it wrote as it went."""
    output = tmp_path / "gpu.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--smoke", "--stages",
                           "speed,compile,onnx_gpu", "--output", str(output)], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(output.read_text())
    onnx = report["stages"].pop("onnx_gpu")
    assert set(report["stages"]) == {"speed", "compile"} and report["versions"]["torch"]
    assert set(report["stages"]["speed"]["runs"]) == {"resnet50", "vit-base", "distill"}
    assert set(report["stages"]["compile"]["runs"]) == {"resnet50", "vit-base"}
    for stage in report["stages"].values():
        for run in stage["runs"].values():
            assert run["train_images_per_second"] > 0 and 0 <= run["data_wait_share"] <= 1 and run["peak_memory_mb"] > 0
    # fp32 and the fp16 file export wrote, timed; fp32 on the same provider is the reference itself
    assert set(onnx["runs"]) == {"CPU fp32", "CPU fp16"} and onnx["batches"] == [1, 4]
    assert onnx["runs"]["CPU fp32"]["max_relative_logit_diff_from_cpu_fp32"] == 0
    assert 0 < onnx["runs"]["CPU fp16"]["max_relative_logit_diff_from_cpu_fp32"] < 0.05
    for run in onnx["runs"].values():
        assert 0 < run["batch_1"]["median_ms"] <= run["batch_1"]["p90_ms"] and run["providers_used"]


def test_transfer_summary_compares_the_defaults_on_the_seeds_both_cells_have():
    import transfer

    def run(cell, seed, accuracy, init="pretrained"):
        return {"regime": "digits-10", "init": init, "cell": cell, "seed": seed, "test_accuracy": accuracy}

    records = [run("defaults", 0, 0.90), run("defaults", 1, 0.80), run("sgd-0.01-noclip", 0, 0.95),
               run("adamw-0.001-clip", 0, 0.70), run("adamw-0.001-clip", 1, 0.70), run("defaults", 0, 0.50, "scratch")]
    summary = transfer.summarize(records)["digits-10"]
    assert summary["pretrained"]["best_sweep_cell"] == "sgd-0.01-noclip"
    assert summary["pretrained"]["defaults_minus_best_sweep"] == -0.05  # seed 0 only, not 0.85 - 0.95
    assert summary["pretrained"]["mean_test_accuracy"]["defaults"] == 0.85
    assert summary["pretrained_defaults_minus_best_scratch"] == 0.35


def test_distillation_summary_compares_the_defaults_with_the_student_alone_seed_by_seed():
    import transfer

    def run(cell, seed, accuracy):
        return {"regime": "distill-10u", "init": "student-scratch", "cell": cell, "seed": seed,
                "test_accuracy": accuracy, "test_agreement": None if cell in transfer.ALONE_CELLS else accuracy,
                "test_teacher_accuracy": None if cell in transfer.ALONE_CELLS else 0.99, "unlabeled_samples": 1193,
                "seconds": 1.0}

    records = [run("student-alone", 0, 0.90), run("student-alone", 1, 0.80), run("distill-defaults", 0, 0.95),
               run("distill-defaults", 1, 0.82), run("alpha-1.0-T-4", 0, 0.97), run("alone-long", 0, 0.99),
               run("long", 0, 0.96), run("short", 0, 0.93)]
    summary = transfer.summarize(records)["distill-10u"]
    assert summary["defaults_minus_alone"] == 0.035 and summary["defaults_minus_alone_worst_seed"] == 0.02
    assert summary["best_cell"] == "alpha-1.0-T-4" and summary["best_minus_defaults"] == 0.02  # seed 0 only
    assert summary["long_minus_alone_long"] == -0.03  # the student alone is never a distillation cell
    table = transfer.markdown_distillation({"distill-10u": summary})
    assert ("| distill-10u | 100 | 1193 | 2 | 0.850 | 0.885 | +0.035 (+0.020) | 0.930 | 0.990 | 0.960 | "
            "alpha-1.0-T-4 0.970 | 0.990 |") in table
