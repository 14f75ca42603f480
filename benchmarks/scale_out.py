#!/usr/bin/env python
"""One fine-tune, five ways of running it on the CPU: one process, 2 DDP processes, two machines on one host,
FSDP2 and DeepSpeed ZeRO-2 (2 processes each), with the same global batch.

    python benchmarks/scale_out.py --output benchmarks/scale-out-cpu-2core.json

The run: ResNet-18 (`--model resnet18 --from_scratch`) on scikit-learn's digits at 32 px, the README's first
command, with a fixed length (--num_train_epochs) so that all five train the same steps. Each launch is
`accelerate launch` with the shipped config (cpu.yaml, multi_node.yaml with --machine_rank 0/1 on 127.0.0.1,
fsdp.yaml, deepspeed_zero2.yaml) and fp32; FSDP goes through tests/instrumented.py with TEST_FSDP_ON_CPU=1
(accelerate 1.15 selects FSDP for accelerator devices only). Reported: test accuracy, final validation
loss, train loss, steps, wall time, and the largest weight difference to the DDP run (parameters and BatchNorm
statistics). The single process differs from the others by BatchNorm alone: each DDP process normalises its own
half of the batch (statistics are not synchronised across processes), one process the whole batch.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "accelerate_configs"
RUN = ["--model", "resnet18", "--from_scratch", "--dataset_name", "digits", "--image_size", "32", "--seed", "0",
       "--num_train_epochs", "6", "--disable_tqdm", "true", "--dataloader_num_workers", "0", "--save_total_limit", "1",
       "--report_to", "none"]
WAYS = {  # name: (accelerate config or None for one plain process, launch flags, environment)
    "one process": (None, [], {}),
    "DDP, 2 processes": ("cpu.yaml", [], {}),
    "2 machines x 1 process": ("multi_node.yaml", ["--num_machines", "2", "--main_process_ip", "127.0.0.1"], {}),
    "FSDP2, 2 processes": ("fsdp.yaml", [], {"TEST_FSDP_ON_CPU": "1"}),
    "DeepSpeed ZeRO-2, 2 processes": ("deepspeed_zero2.yaml", [], {}),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch_size", type=int, default=64, help="global batch (per process: half of it)")
    parser.add_argument("--output", default=None)
    parser.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "hf-transfer-scale-out-bench"))
    args = parser.parse_args()
    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)

    rows = {}
    for name, (config, launch, env) in WAYS.items():
        out = work / name.split(",")[0].replace(" ", "-")
        per_process = args.batch_size if config is None else args.batch_size // 2
        flags = [*RUN, "--output_dir", str(out), "--per_device_train_batch_size", str(per_process), "--use_cpu"]
        started = time.time()
        run(config, launch, env, flags, out)
        rows[name] = {**figures(out), "wall_s": round(time.time() - started, 1)}
        print(name, rows[name], flush=True)
    reference = work / "DDP"
    for name in WAYS:
        rows[name]["max_weight_difference_to_ddp"] = weight_difference(reference, work / name.split(",")[0].replace(" ", "-"))
    report = {"setup": {"command": "run_finetune.py " + " ".join(RUN), "global_batch": args.batch_size,
                        "threads_per_process": 1, "precision": "fp32"},
              "runs": rows}
    print(json.dumps(report, indent=2))
    if args.output:
        Path(args.output).write_text(json.dumps(report, indent=2) + "\n")


def run(config, launch, env, flags, out: Path) -> None:
    environ = {**os.environ, "OMP_NUM_THREADS": "1" if config else "2", "PYTHONPATH": str(ROOT),
               "HF_HUB_OFFLINE": "1", **env}
    script = [str(ROOT / "tests" / "instrumented.py"), "finetune"]
    if config is None:
        processes = [subprocess.Popen([sys.executable, *script, *flags], env=environ)]
    elif config == "multi_node.yaml":
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = str(s.getsockname()[1])
        processes = [subprocess.Popen([sys.executable, "-m", "accelerate.commands.launch", "-q", "--config_file",
                                       str(CONFIGS / config), "--num_processes", "2", "--mixed_precision", "no", *launch,
                                       "--machine_rank", str(rank), "--main_process_port", port, *script, *flags],
                                      env=environ) for rank in (0, 1)]
    else:
        processes = [subprocess.Popen([sys.executable, "-m", "accelerate.commands.launch", "-q", "--config_file",
                                       str(CONFIGS / config), "--num_processes", "2", "--mixed_precision", "no", *launch,
                                       *script, *flags], env=environ)]
    codes = [p.wait() for p in processes]
    if any(codes):
        sys.exit(f"{config or 'one process'}: exit {codes}")


def figures(out: Path) -> dict:
    results = json.loads((out / "all_results.json").read_text())
    state = json.loads((out / "trainer_state.json").read_text())
    return {"test_accuracy": round(results["test_accuracy"], 4), "eval_loss": round(results["eval_loss"], 5),
            "train_loss": round(results["train_loss"], 5), "steps": state["global_step"]}


def weight_difference(a: Path, b: Path) -> float:
    from transformers import AutoModelForImageClassification

    first, second = (AutoModelForImageClassification.from_pretrained(p).state_dict() for p in (a, b))
    floats = [k for k in first if first[k].is_floating_point()]  # (not BatchNorm's step counters)
    return float(max((first[k] - second[k]).abs().max().item() for k in floats))


if __name__ == "__main__":
    main()
