#!/usr/bin/env python
"""The GPU check: one command sized for one 8-minute call on an H100/H200, every figure into a JSON written as it goes.

The sizing (not yet timed in this form): the speed stage ~2 minutes (the last H200 figures: 31-43 s per
300-step run), compile capped at --compile_budget_s (170), the GPU tests at --tests_budget_s (170), onnx_gpu about a
minute (one training step, an export, 50 timed calls per figure).

    python benchmarks/gpu_check.py --output benchmarks/gpu-h200.json   # all stages
    python benchmarks/gpu_check.py --stages speed                       # some of them
    python benchmarks/gpu_check.py --smoke                              # tiny models on the CPU: checks the script

Stages, in this order (a stage that fails or runs out of time is recorded and the next one runs):
- speed: training throughput of ResNet-50, ViT-B/16 and their distillation through run_finetune.py and
  run_distill.py, eager, bf16, on synthetic CIFAR-shaped data shown at 224 px, no network.
- compile: ResNet-50 and ViT-B/16 again with torch.compile, in a child process cut at --compile_budget_s
  seconds (compilation included; the figures of the runs that finished are kept).
- gpu_tests: the GPU-marked tests (`pytest -m "gpu or multi_gpu"`): CUDA's sync-debug host-read checks, fp16,
  and the shipped FSDP and DeepSpeed configs on one GPU, killed after a checkpoint and resumed (tests/test_scale_out.py).
- onnx_gpu: a ResNet-50 run (one step) exported by `export --precision fp16`, then model.onnx and model.fp16.onnx
  timed (batch 1 and 32) with each of onnxruntime's GPU execution providers this installation has (TensorRT, CUDA:
  the onnxruntime-gpu package; none with the CPU-only onnxruntime, which the stage records), beside PyTorch fp32
  and fp16 on the GPU, with each file's largest logit difference from onnxruntime's CPU fp32 answer.

The models are the presets (--model resnet50, --model vit-base) with --from_scratch: their
architectures and preprocessing, random weights, no download (models/loading.py knows the presets'
configs). Speed does not depend on the weights. For each run: train images/s (steady state, after
warm-up), the share of step time spent waiting for data, peak memory and the achieved TFLOP/s
(training = 3 x forward FLOPs: ResNet-50 24.7 GFLOP and ViT-B/16 105.5 GFLOP per 224 px image;
distillation = teacher forward 35.2 + student training 24.7).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

GFLOP_PER_IMAGE = {"resnet50": 24.7, "vit-base": 105.5, "distill": 35.2 + 24.7}  # training, 224 px
GOALS = {"resnet50": 5000, "vit-base": 3000, "distill": 2000}  # train images/s on one H100
STAGES = ("speed", "compile", "gpu_tests", "onnx_gpu")
GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")  # onnxruntime-gpu's, where installed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated, of: {', '.join(STAGES)}")
    parser.add_argument("--runs", default="resnet50,vit-base,distill", help="the speed stage's runs")
    parser.add_argument("--steps", type=int, default=200, help="training steps per speed run")
    parser.add_argument("--compile_steps", type=int, default=150, help="training steps per compiled run")
    parser.add_argument("--compile_budget_s", type=int, default=170, help="the compile stage's limit, compilation included")
    parser.add_argument("--tests_budget_s", type=int, default=170, help="the gpu_tests stage's limit")
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--images", type=int, default=20_480,
                        help="size of the synthetic training set; a multiple of the batch size keeps every batch "
                             "full (with --compile, a smaller last batch would compile the model again)")
    parser.add_argument("--workers", type=int, default=min(12, (os.cpu_count() or 2) - 1))
    parser.add_argument("--compile", action="store_true", help="torch.compile the speed stage's models")
    parser.add_argument("--latency_repeats", type=int, default=50, help="timed calls per figure of the onnx_gpu stage")
    parser.add_argument("--smoke", action="store_true", help="tiny models, a few steps, CPU: test the script")
    parser.add_argument("--output", default=None, help="also write the JSON here, rewritten after every run")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    stages = [s for s in args.stages.split(",") if s]
    unknown = set(stages) - set(STAGES)
    if unknown:
        sys.exit(f"--stages: unknown {', '.join(sorted(unknown))}; choose from {', '.join(STAGES)}")

    import torch

    if args.smoke:
        args.steps = args.compile_steps = 8
        args.batch_size, args.images, args.workers, args.latency_repeats = 8, 128, 0, 3
    elif not torch.cuda.is_available():
        sys.exit("no CUDA GPU: run with --smoke to check the script on the CPU")

    report = {
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() and not args.smoke else "cpu (smoke)",
        "date": datetime.date.today().isoformat(),
        "versions": versions(),
        "setup": {"steps": args.steps, "compile_steps": args.compile_steps, "batch_size": args.batch_size,
                  "workers": args.workers, "bf16": not args.smoke, "channels_last_cnn": True},
        "stages": {},
    }

    def save():
        if args.output:
            Path(args.output).write_text(json.dumps(report, indent=2) + "\n")

    for stage in stages:
        started = time.time()
        if stage == "speed":
            report["stages"]["speed"] = section = {"compile": args.compile, "runs": {}}
            speed(args, args.runs.split(","), section, save)
        elif stage == "compile":
            report["stages"]["compile"] = compiled(args)
        elif stage == "onnx_gpu":
            report["stages"]["onnx_gpu"] = onnx_gpu(args)
        else:
            report["stages"]["gpu_tests"] = gpu_tests(args.tests_budget_s)
        report["stages"][stage]["wall_s"] = round(time.time() - started, 1)
        save()
    print(json.dumps(report, indent=2))
    if any(failed(section) for section in report["stages"].values()):
        sys.exit(1)


def versions() -> dict:
    import accelerate
    import torch
    import transformers

    found = {"torch": torch.__version__, "cuda": torch.version.cuda, "transformers": transformers.__version__,
             "accelerate": accelerate.__version__}
    try:
        import deepspeed

        found["deepspeed"] = deepspeed.__version__
    except ImportError:
        found["deepspeed"] = None
    return found


def failed(section: dict) -> bool:
    return ("error" in section or section.get("failed", 0) > 0
            or any("error" in run for run in section.get("runs", {}).values()))


def speed(args, names: list[str], section: dict, save) -> None:
    """Train each run in this process; its figures (or its error) go into `section["runs"]` as it ends."""
    import torch
    from benchmark import make_checkpoints, make_dataset

    from hf_transfer.cli.distill import main as distill
    from hf_transfer.cli.finetune import main as finetune

    with tempfile.TemporaryDirectory(prefix="hf-transfer-gpu-check-") as tmp:
        tmp = Path(tmp)
        make_dataset(tmp / "data", n_train=args.images, n_eval=min(2048, args.images))
        common = ["--dataset_name", str(tmp / "data"), "--max_steps", str(args.steps),
                  "--per_device_train_batch_size", str(args.batch_size),
                  "--per_device_eval_batch_size", str(2 * args.batch_size), "--dataloader_num_workers", str(args.workers),
                  "--eval_strategy", "no", "--save_strategy", "no", "--load_best_model_at_end", "false",
                  "--max_eval_samples", str(min(2048, args.images)), "--logging_steps", "50", "--disable_tqdm", "true",
                  "--report_to", "none", "--overwrite_output_dir"]
        if args.compile:  # on the CPU (--smoke) the eager backend: the script's path, without minutes of compiling
            common += ["--torch_compile", *(["--torch_compile_backend", "eager"] if args.smoke else [])]
        if args.smoke:  # tiny stand-ins built from configs, on the CPU
            cnn, vit = tiny_resnet(tmp / "tiny-resnet"), make_checkpoints(tmp, image_size=32)["teacher"]
            common.append("--use_cpu")
        else:
            cnn, vit = "resnet50", "vit-base"
            common.append("--bf16")
        model_flag, student_flag = ("--model_name_or_path", "--student_model_name_or_path") if args.smoke else \
            ("--model", "--student")
        cnn_flags = ["--from_scratch", "--channels_last", "true"]
        flags = {"resnet50": [model_flag, cnn, *cnn_flags], "vit-base": [model_flag, vit, "--from_scratch"]}

        def record(name, run):  # one run's figures, or its error, so a failure keeps the others' figures
            started = time.time()
            try:
                metrics = run()
            except Exception as error:  # noqa: BLE001 -- reported in the JSON, and the exit status
                section["runs"][name] = {"error": f"{type(error).__name__}: {error}"}
            else:
                summary_ = summary(metrics, None if args.smoke else GFLOP_PER_IMAGE[name], time.time() - started)
                if not args.smoke:
                    summary_["goal"] = GOALS[name]
                    summary_["goal_met"] = summary_["train_images_per_second"] >= GOALS[name]
                section["runs"][name] = summary_
            save()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

        for name in names:
            if name == "distill":  # the ViT-B/16 just trained teaches a ResNet-50 (trained from it if not yet there)
                if not (tmp / "run-vit-base" / "config.json").is_file():
                    finetune([*flags["vit-base"], *common, "--max_steps", "1", "--output_dir", str(tmp / "run-vit-base")])
                record(name, lambda: distill(["--teacher_model_name_or_path", str(tmp / "run-vit-base"), student_flag,
                                              cnn, *cnn_flags, *common, "--output_dir", str(tmp / "run-distill")]))
            else:
                record(name, lambda name=name: finetune([*flags[name], *common, "--output_dir", str(tmp / f"run-{name}")]))


def compiled(args) -> dict:
    """The speed stage with torch.compile for ResNet-50 and ViT-B/16, in a child process killed at the budget."""
    with tempfile.TemporaryDirectory() as tmp:
        partial = Path(tmp) / "compile.json"
        command = [sys.executable, __file__, "--stages", "speed", "--compile", "--runs", "resnet50,vit-base",
                   "--steps", str(args.compile_steps), "--batch_size", str(args.batch_size), "--images",
                   str(args.images), "--workers", str(args.workers), "--output", str(partial),
                   *(["--smoke"] if args.smoke else [])]
        code, _, err = run_within(command, args.compile_budget_s)
        outcome = ({"error": f"cut at the budget of {args.compile_budget_s} s (compilation included)"} if code is None
                   else {} if code == 0 else {"error": f"exit {code}: {err[-1500:]}"})
        runs = json.loads(partial.read_text())["stages"]["speed"]["runs"] if partial.is_file() else {}
    return {"steps": args.compile_steps, "budget_s": args.compile_budget_s, "runs": runs, **outcome}


def onnx_gpu(args) -> dict:
    """Export a one-step ResNet-50 run in fp32 and fp16 and time both files with onnxruntime's GPU providers (on the
    CPU provider with --smoke, which checks the path), beside PyTorch on the same device."""
    import numpy as np
    import onnxruntime
    import torch
    from benchmark import make_dataset

    from hf_transfer.cli.finetune import main as finetune
    from hf_transfer.tools import checks
    from hf_transfer.tools.export import Precision, export_onnx
    from hf_transfer.tools.latency import onnx_session, timed_ms
    from hf_transfer.tools.quantize import first_line

    available = onnxruntime.get_available_providers()
    providers = [p for p in GPU_PROVIDERS if p in available] + (["CPUExecutionProvider"] if args.smoke else [])
    section = {"onnxruntime": onnxruntime.__version__, "available_providers": available, "runs": {}}
    if not providers:
        return {**section, "skipped": "this onnxruntime has no GPU execution provider (pip install onnxruntime-gpu)"}
    batches = [1, 32 if not args.smoke else 4]
    with tempfile.TemporaryDirectory(prefix="hf-transfer-onnx-gpu-") as tmp:
        tmp = Path(tmp)
        make_dataset(tmp / "data", n_train=64, n_eval=64)
        model_flags = ["--model_name_or_path", tiny_resnet(tmp / "tiny")] if args.smoke else ["--model", "resnet50"]
        run = tmp / "run"
        finetune([*model_flags, "--from_scratch", "--dataset_name", str(tmp / "data"), "--max_steps", "1",
                  "--per_device_train_batch_size", "8", "--dataloader_num_workers", "0", "--eval_strategy", "no",
                  "--save_strategy", "no", "--load_best_model_at_end", "false", "--report_to", "none",
                  "--disable_tqdm", "true", "--calibrate", "false", "--output_dir", str(run),
                  *(["--use_cpu"] if args.smoke else [])])
        export_onnx(str(run), str(tmp / "onnx"), max_images=64,
                              precision=Precision(precision="fp16", latency_repeats=0))
        files = {"fp32": tmp / "onnx" / "model.onnx", "fp16": tmp / "onnx" / "model.fp16.onnx"}
        config = json.loads((run / "preprocessor_config.json").read_text())
        side = (config.get("crop_size") or config.get("size") or {}).get("height", 224)
        example = torch.randn(max(batches), 3, side, side)
        reference = onnx_session(files["fp32"]).run(None, {"pixel_values": example.numpy()})[0]

        def figures(run_batch) -> dict:
            row = {}
            for batch in batches:
                feed = example[:batch]
                median, p90 = timed_ms(lambda feed=feed: run_batch(feed), args.latency_repeats)
                row[f"batch_{batch}"] = {"median_ms": round(median, 3), "p90_ms": round(p90, 3),
                                         "images_per_s": round(batch / median * 1000, 1)}
            logits = np.asarray(run_batch(example), dtype=np.float32)
            row["max_relative_logit_diff_from_cpu_fp32"] = float(checks.relative_differences(logits, reference).max())
            return row

        for provider in providers:
            for precision, path in files.items():
                name = f"{provider.removesuffix('ExecutionProvider')} {precision}"
                try:
                    session = onnx_session(path, providers=[provider])
                    section["runs"][name] = figures(lambda x, s=session: s.run(None, {"pixel_values": x.numpy()})[0])
                    section["runs"][name]["providers_used"] = session.get_providers()
                except Exception as error:  # noqa: BLE001 -- a provider that cannot build this graph: recorded
                    section["runs"][name] = {"error": f"{type(error).__name__}: {first_line(error)}"}
        if torch.cuda.is_available() and not args.smoke:
            from hf_transfer.models.loading import _from_pretrained

            model = _from_pretrained("model", str(run)).eval().cuda()
            for precision, dtype in (("fp32", torch.float32), ("fp16", torch.float16)):
                model = model.to(dtype)

                def call(x, dtype=dtype, model=model):
                    with torch.no_grad():
                        out = model(pixel_values=x.cuda().to(dtype)).logits.float().cpu().numpy()
                    return out  # .cpu() synchronises: the time is the whole call

                section["runs"][f"PyTorch cuda {precision}"] = figures(call)
    return {**section, "batches": batches, "repeats": args.latency_repeats,
            "note": "random weights (one training step): the logit differences check the arithmetic, not accuracy"}


def gpu_tests(budget_s: int) -> dict:
    """`pytest -m "gpu or multi_gpu"`: each test's outcome as it ends (kept when the budget cuts the stage), and counts."""
    command = [sys.executable, "-m", "pytest", "-m", "gpu or multi_gpu", "-v", "-p", "no:cacheprovider",
               str(ROOT / "tests")]
    code, output, _ = run_within(command, budget_s)
    outcome = {"error": f"cut at the budget of {budget_s} s"} if code is None else {"exit": code}
    tests = {}
    for line in output.splitlines():  # "tests/test_x.py::test_y[param] PASSED  [ 50%]"
        match = re.match(r"^(tests/\S+::\S+) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)", line)
        if match:
            tests[match.group(1)] = match.group(2).lower()
    counts = {"passed": sum(v == "passed" for v in tests.values()), "skipped": sum(v == "skipped" for v in tests.values()),
              "failed": sum(v in ("failed", "error") for v in tests.values())}
    result = {**counts, "tests": tests, **outcome}
    if outcome.get("exit", 1) not in (0, 5):  # 5: no test collected
        result["output_tail"] = output[-3000:]
    return result


def run_within(command: list[str], budget_s: int) -> tuple[int | None, str, str]:
    """Run `command` (in ROOT) for at most `budget_s` seconds: its exit code (None when cut) and its output so far.
    Cut, the whole process group goes (DataLoader workers, the processes a test launched), freeing the GPU."""
    import signal

    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                               start_new_session=True)
    try:
        out, err = process.communicate(timeout=budget_s)
        return process.returncode, out, err
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        out, err = process.communicate()
        return None, out, err


def tiny_resnet(path: Path) -> str:
    """A small timm ResNet (through TimmWrapper, as the resnet50 preset) saved from a config."""
    import timm
    from transformers import AutoModelForImageClassification, TimmWrapperConfig

    pretrained_cfg = timm.get_pretrained_cfg("test_resnet").to_dict()
    pretrained_cfg["input_size"] = [3, 32, 32]
    config = TimmWrapperConfig(architecture="test_resnet", pretrained_cfg=pretrained_cfg, num_labels=10,
                               id2label={i: f"c{i}" for i in range(10)}, label2id={f"c{i}": i for i in range(10)})
    AutoModelForImageClassification.from_config(config).save_pretrained(path)
    return str(path)


def summary(metrics: dict, gflop_per_image: float | None, wall_s: float) -> dict:
    images_per_second = metrics.get("train_steady_images_per_second") or metrics["train_samples_per_second"]
    return {
        "train_images_per_second": round(images_per_second, 1),
        "data_wait_share": metrics.get("train_data_wait_share"),
        "peak_memory_mb": metrics.get("train_peak_memory_mb"),
        "peak_memory_of": metrics.get("train_peak_memory_of"),
        "achieved_tflops": round(images_per_second * gflop_per_image / 1000, 1) if gflop_per_image else None,
        "eval_images_per_second": metrics.get("test_samples_per_second"),
        "wall_s": round(wall_s, 1),
    }


if __name__ == "__main__":
    main()
