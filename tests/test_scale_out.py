"""Scale-out that runs: two machines on one host, FSDP2 and DeepSpeed ZeRO-2, each against the same run as two DDP
processes, in CPU processes over gloo; and each killed mid-run, then resumed to the same result.

The "machines" are two `accelerate launch` commands with --num_machines 2 and --machine_rank 0/1 on 127.0.0.1, the
shipped multi_node.yaml as a user would edit it. FSDP runs through accelerate's FSDP2 path with one test patch
(tests/instrumented.py, TEST_FSDP_ON_CPU: accelerate 1.15 selects FSDP for accelerator devices only); DeepSpeed runs
on its own CPU accelerator with no patch. What only a GPU can check (NCCL, bf16 weights on the device, speed) is in
benchmarks/gpu_check.py.
"""

import json
import os
import socket
import subprocess
import sys
import time
from importlib.util import find_spec
from pathlib import Path

import datasets
import psutil
import pytest
from conftest import quick_flags
from transformers import AutoModelForImageClassification, pipeline

from hf_transfer.errors import UserError
from hf_transfer.integrations.launch import check_launch, check_sharding
from hf_transfer.run.checkpoints import is_complete
from hf_transfer.trainers.transfer_config import TransferConfig

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "accelerate_configs"
# Against the 2-process DDP run: the same steps and metrics computed from the same predictions; weights within float
# rounding (FSDP reduce-scatters the gradients that DDP all-reduces, in other orders of summation).
WEIGHTS = 1e-5


def flags(model, data, out, *extra, cpu=True):
    """10 steps (2 epochs of 5 at 2 x 4 images), a checkpoint and an evaluation every 2 steps."""
    return ["--model_name_or_path", model, "--dataset_name", data, "--output_dir", str(out), "--num_train_epochs", "2",
            "--max_train_samples", "40", "--seed", "3", "--save_strategy", "steps", "--save_steps", "2",
            "--eval_strategy", "steps", "--eval_steps", "2", "--save_total_limit", "20", *quick_flags(),
            "--per_device_train_batch_size", "4", *(["--use_cpu"] if cpu else []),
            # the runs are compared with DDP's: FSDP and DeepSpeed fold no temperature (sharded weights), DDP does
            "--calibrate", "false", *extra]


def distill_flags(teacher, student, data, out, cpu=True):
    return ["--teacher_model_name_or_path", teacher, "--student_model_name_or_path", student, "--image_size", "24",
            "--dataset_name", data, "--output_dir", str(out), "--num_train_epochs", "2", "--max_train_samples", "40",
            "--augmentation", "basic", "--seed", "3", *quick_flags(), "--per_device_train_batch_size", "4",
            *(["--use_cpu"] if cpu else [])]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(script, script_flags, config, log: Path, *, launch=(), sleep=0.0, env=()):
    """`accelerate launch --config_file CONFIG [launch...] tests/instrumented.py SCRIPT FLAGS`, output to `log`."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "-q", "--config_file", str(CONFIGS / config),
               "--num_processes", "2", "--mixed_precision", "no", *launch, str(ROOT / "tests" / "instrumented.py"),
               script, *script_flags]
    environ = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "TEST_STEP_SLEEP": str(sleep),
               "TEST_ROWS_DIR": str(log.parent / "rows"), **dict(env)}
    return subprocess.Popen(command, env=environ, stdout=open(log, "w"), stderr=subprocess.STDOUT, cwd=log.parent)


def machines(script, script_flags, log: Path, sleep=0.0):
    """The two machines of multi_node.yaml, as its comments say to edit it, on this host."""
    port = str(free_port())
    return [start(script, script_flags, "multi_node.yaml", log.with_suffix(f".machine{rank}.log"), sleep=sleep,
                  launch=("--num_machines", "2", "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1",
                          "--main_process_port", port)) for rank in (0, 1)]


def finish(processes, log: Path, timeout=300):
    for process in processes:
        assert process.wait(timeout=timeout) == 0, "".join(p.read_text()[-3000:] for p in log.parent.glob(log.stem + "*"))


def wait_for_checkpoint(out: Path, processes, step=4, timeout=240):
    deadline = time.time() + timeout
    while not ((out / f"checkpoint-{step}").is_dir() and is_complete(out / f"checkpoint-{step}")):
        assert all(p.poll() is None for p in processes), "a process ended before the checkpoint to kill after"
        assert time.time() < deadline, f"checkpoint-{step} did not appear"
        time.sleep(0.05)


def kill_machine(process) -> None:
    """SIGKILL to the launcher and everything under it (torchrun and its workers run in sessions of their own)."""
    tree = [psutil.Process(process.pid), *psutil.Process(process.pid).children(recursive=True)]
    for p in tree:
        p.kill()
    psutil.wait_procs(tree)
    process.wait()


def results(out: Path) -> dict:
    return json.loads((out / "all_results.json").read_text())


def assert_same_result(reference: Path, out: Path, teacher=False):
    a, b = results(reference), results(out)
    for key in ("eval_accuracy", "test_accuracy", "test_f1", *(["test_teacher_accuracy"] if teacher else [])):
        assert a[key] == b[key], key
    for key in ("eval_loss", "test_loss"):
        assert abs(a[key] - b[key]) <= 1e-5 * abs(a[key]), key
    steps = [json.loads((p / "trainer_state.json").read_text())["global_step"] for p in (reference, out)]
    assert steps[0] == steps[1] == 10
    first, second = (AutoModelForImageClassification.from_pretrained(p).state_dict() for p in (reference, out))
    assert max((first[k] - second[k]).abs().max().item() for k in first) <= WEIGHTS


def resumed_from(log: Path) -> int:
    """The step of the checkpoint the run says it resumed from (every process says it: one step)."""
    steps = {int(line.rsplit("-", 1)[-1]) for line in log.read_text().splitlines() if "resuming from checkpoint" in line}
    assert len(steps) == 1, f"resumed from {steps or 'no checkpoint'}"
    return steps.pop()


@pytest.fixture(scope="module")
def ddp(tiny_vit, cifar_like, cifar_teacher, tmp_path_factory):
    """The reference: the same fine-tuning and distillation as two DDP processes on one machine (cpu.yaml)."""
    root = tmp_path_factory.mktemp("ddp")
    runs = {"finetune": flags(tiny_vit, cifar_like, root / "finetune"),
            "distill": distill_flags(cifar_teacher, tiny_vit, cifar_like, root / "distill")}
    for script, script_flags in runs.items():
        finish([start(script, script_flags, "cpu.yaml", root / f"{script}.log")], root / f"{script}.log")
    return {script: root / script for script in runs}


def kill_and_resume(out: Path, log: Path, begin, *, kill_one_of=None):
    """Start the run slowed down, SIGKILL it (or one of its machines) after checkpoint-4, then run it again."""
    processes = begin(log, 1.0)  # 6 steps (6 s) left after checkpoint-4: time to kill it on a slow machine
    wait_for_checkpoint(out, processes)
    if kill_one_of is None:
        kill_machine(processes[0])
    else:
        kill_machine(processes[kill_one_of])
        survivor = processes[1 - kill_one_of]
        assert survivor.wait(timeout=120) != 0  # the other machine's collectives fail: it stops too, saving nothing
    assert not (out / "model.safetensors").exists()
    again = log.with_name(log.stem + "-again.log")
    finish(begin(again, 0.0), again)
    return again


@pytest.mark.slow
@pytest.mark.scale_out
def test_one_of_two_machines_killed_then_both_restarted_ends_as_two_processes_on_one(ddp, tiny_vit, cifar_like,
                                                                                      tmp_path):
    out = tmp_path / "run"
    again = kill_and_resume(out, tmp_path / "run.log",
                            lambda log, sleep: machines("finetune", flags(tiny_vit, cifar_like, out), log, sleep),
                            kill_one_of=1)
    assert resumed_from(again.with_suffix(".machine0.log")) >= 4
    assert_same_result(ddp["finetune"], out)
    rows = [json.loads((tmp_path / "rows" / f"rows-rank{rank}.json").read_text()) for rank in (0, 1)]
    assert len(rows[0]) == len(rows[1]) > 0 and not any(set(a) & set(b) for a, b in zip(*rows))  # a shard each


@pytest.mark.slow
@pytest.mark.scale_out
def test_two_machines_distil_as_two_processes_on_one(ddp, cifar_teacher, tiny_vit, cifar_like, tmp_path):
    out, log = tmp_path / "run", tmp_path / "run.log"
    finish(machines("distill", distill_flags(cifar_teacher, tiny_vit, cifar_like, out), log), log)
    assert_same_result(ddp["distill"], out, teacher=True)


def serves_its_test_split(out: Path, data: str, slack: int = 0):
    """The saved model in `pipeline` scores the test split as the run did (up to `slack` images: a bf16 run on a GPU
    against float32 on the CPU): what a user, or the Hub, gets."""
    test = datasets.load_dataset(data, split="test")
    classify = pipeline("image-classification", model=str(out), device="cpu")
    names = test.features["label"].names
    hits = [classify(row["img"], top_k=1)[0]["label"] == names[row["label"]] for row in test]
    assert abs(sum(hits) - results(out)["test_accuracy"] * len(hits)) <= slack + 1e-6


@pytest.mark.slow
@pytest.mark.scale_out
def test_fsdp_sharded_checkpoints_survive_sigkill_and_the_run_ends_as_ddp_and_is_pushed_whole(ddp, tiny_vit, cifar_like, tmp_path):
    out = tmp_path / "run"
    sharded = ("--fsdp_state_dict_type", "SHARDED_STATE_DICT")  # each process writes its own shard of each checkpoint

    push = ("--push_to_hub", "--hub_model_id", "me/fsdp-vit", "--hub_strategy", "end")

    def begin(log, sleep):  # pushed to a stand-in Hub (tests/instrumented.py TEST_FAKE_HUB)
        return [start("finetune", flags(tiny_vit, cifar_like, out, *push), "fsdp.yaml", log, launch=sharded,
                      sleep=sleep, env={"TEST_FSDP_ON_CPU": "1", "TEST_FAKE_HUB": str(tmp_path / "hub"),
                                        "HF_HUB_OFFLINE": "0"})]
    again = kill_and_resume(out, tmp_path / "run.log", begin)
    assert resumed_from(again) >= 4
    checkpoint = out / "checkpoint-4"
    assert (checkpoint / "pytorch_model_fsdp_0" / ".metadata").is_file() and len(list(checkpoint.rglob("*.distcp"))) == 4
    assert_same_result(ddp["finetune"], out)  # and the run ends with its model whole, not sharded
    serves_its_test_split(out, cifar_like)
    # what reached the Hub: the whole model, its processor and card, from the main process only; no sharded checkpoint
    uploads = [json.loads((tmp_path / f"hub.rank{rank}.json").read_text()) for rank in (0, 1)]
    assert uploads[1] == [] and len(uploads[0]) == 1 and uploads[0][0]["repo_id"] == "me/fsdp-vit"
    files = set(uploads[0][0]["files"])
    assert {"model.safetensors", "config.json", "preprocessor_config.json", "README.md"} <= files
    assert not any(name.startswith("checkpoint-") for name in files)


@pytest.mark.slow
@pytest.mark.scale_out
def test_fsdp_distillation_as_shipped_matches_ddp(ddp, cifar_teacher, tiny_vit, cifar_like, tmp_path):
    out, log = tmp_path / "run", tmp_path / "run.log"
    finish([start("distill", distill_flags(cifar_teacher, tiny_vit, cifar_like, out), "fsdp.yaml", log,
                  env={"TEST_FSDP_ON_CPU": "1"})], log)
    assert_same_result(ddp["distill"], out, teacher=True)


@pytest.mark.slow
@pytest.mark.scale_out
def test_deepspeed_zero2_checkpoints_survive_sigkill_and_the_run_ends_as_ddp(ddp, tiny_vit, cifar_like, tmp_path):
    pytest.importorskip("deepspeed")
    out = tmp_path / "run"

    def begin(log, sleep):
        return [start("finetune", flags(tiny_vit, cifar_like, out), "deepspeed_zero2.yaml", log, sleep=sleep)]
    again = kill_and_resume(out, tmp_path / "run.log", begin)
    assert resumed_from(again) >= 4
    optimizer = sorted(p.name for p in (out / "checkpoint-4" / "global_step4").glob("*optim_states.pt"))
    assert len(optimizer) == 2  # ZeRO-2: the optimizer state in one shard per process
    assert_same_result(ddp["finetune"], out)
    serves_its_test_split(out, cifar_like)


@pytest.mark.slow
@pytest.mark.scale_out
def test_deepspeed_zero2_distillation_matches_ddp(ddp, cifar_teacher, tiny_vit, cifar_like, tmp_path):
    pytest.importorskip("deepspeed")
    out, log = tmp_path / "run", tmp_path / "run.log"
    finish([start("distill", distill_flags(cifar_teacher, tiny_vit, cifar_like, out), "deepspeed_zero2.yaml", log)],
           log)
    assert_same_result(ddp["distill"], out, teacher=True)
    # the config's own bf16: DeepSpeed holds the student in bf16 without autocast, so the batches and the frozen teacher
    # are cast to it (compat.deepspeed_dtype); the run is told --bf16 (its card says so) and the teacher grades as in fp32
    out, log = tmp_path / "bf16", tmp_path / "bf16.log"
    finish([start("distill", distill_flags(cifar_teacher, tiny_vit, cifar_like, out), "deepspeed_zero2.yaml", log,
                  launch=("--mixed_precision", "bf16"))], log)
    assert "| mixed precision | bf16 |" in (out / "README.md").read_text()
    assert results(out)["test_teacher_accuracy"] == results(ddp["distill"])["test_teacher_accuracy"]


@pytest.mark.slow
@pytest.mark.scale_out
def test_fsdp_on_cpu_processes_is_refused_not_run_as_ddp(tiny_vit, cifar_like, tmp_path):
    """Without the test patch, accelerate would train an FSDP launch on the CPU as plain DDP: one line instead."""
    out, log = tmp_path / "run", tmp_path / "run.log"
    process = start("finetune", flags(tiny_vit, cifar_like, out), "fsdp.yaml", log)
    assert process.wait(timeout=300) != 0
    errors = {line for line in log.read_text().splitlines() if line.startswith("error:")}
    assert errors == {"error: the launch asks for FSDP but plain DDP would run instead: accelerate runs FSDP on GPUs "
                      "only; run it where each process has a GPU, or for CPU processes use accelerate launch "
                      "--config_file accelerate_configs/cpu.yaml run_finetune.py --use_cpu ..."}
    assert not list(out.glob("checkpoint-*")) and not (out / "model.safetensors").exists()


def test_what_the_launch_asked_for_and_what_accelerate_set_up():
    on_cpu = TransferConfig(output_dir="x", use_cpu=True)
    check_sharding(on_cpu, fsdp=False, deepspeed=False, processes=2, environ={})  # plain DDP asked for and given
    check_sharding(on_cpu, fsdp=True, deepspeed=False, processes=2, environ={"ACCELERATE_USE_FSDP": "true"})
    check_sharding(on_cpu, fsdp=False, deepspeed=True, processes=2, environ={"ACCELERATE_USE_DEEPSPEED": "true"})
    with pytest.raises(UserError, match="asks for FSDP but plain DDP would run instead"):
        check_sharding(on_cpu, fsdp=False, deepspeed=False, processes=2, environ={"ACCELERATE_USE_FSDP": "true"})
    with pytest.raises(UserError, match="asks for DeepSpeed but one process alone would run instead"):
        check_sharding(on_cpu, fsdp=False, deepspeed=False, processes=1, environ={"ACCELERATE_USE_DEEPSPEED": "true"})
    with pytest.raises(UserError, match="--ema_decay does not work with FSDP"):
        check_sharding(TransferConfig(output_dir="x", use_cpu=True, ema_decay=0.9), fsdp=True, deepspeed=False,
                       processes=2, environ={"ACCELERATE_USE_FSDP": "true"})
    # without --use_cpu and without a GPU, the processes of an FSDP launch would not even form one run
    with pytest.raises(UserError, match="asks for FSDP but 2 unrelated processes would run instead"):
        check_launch(TransferConfig(output_dir="x"), environ={"WORLD_SIZE": "2", "ACCELERATE_USE_FSDP": "true"},
                     cuda_devices=0, launcher=[])


def test_a_deepspeed_launch_gives_the_run_its_mixed_precision(monkeypatch):
    """DeepSpeed takes bf16/fp16 from the accelerate config and refuses arguments that say otherwise: they follow it."""
    pytest.importorskip("deepspeed")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    args = TransferConfig(output_dir="x", use_cpu=True)
    assert args.bf16 and not args.fp16
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")
    assert not TransferConfig(output_dir="x", use_cpu=True).bf16
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED")
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    assert not TransferConfig(output_dir="x", use_cpu=True).bf16  # other launches: accelerate's autocast, as before


def test_a_deepspeed_launch_without_deepspeed_installed_is_one_line(monkeypatch):
    import hf_transfer.trainers.transfer_config as config

    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setattr(config, "find_spec", lambda name: None if name == "deepspeed" else find_spec(name))
    with pytest.raises(ValueError, match=r"asks for DeepSpeed, which is not installed: pip install "
                                         r"'hf-vision-transfer\[deepspeed\]'"):
        TransferConfig(output_dir="x", use_cpu=True)


@pytest.mark.gpu
@pytest.mark.parametrize("config", ["fsdp.yaml", "deepspeed_zero2.yaml"])
def test_sharded_configs_as_shipped_on_one_gpu_resume_after_sigkill_and_serve(config, tiny_vit, tiny_resnet,
                                                                            cifar_teacher, cifar_like, tmp_path):
    """What only a GPU runs: the shipped config (bf16, NCCL) on one GPU, a ViT and a CNN killed after a checkpoint
    and resumed to the uninterrupted run's result, and a distillation. benchmarks/gpu_check.py runs it."""
    if config.startswith("deepspeed"):
        pytest.importorskip("deepspeed")

    def launch(script, script_flags, log, sleep=0.0):
        command = [sys.executable, "-m", "accelerate.commands.launch", "-q", "--config_file", str(CONFIGS / config),
                   "--num_processes", "1", str(ROOT / "tests" / "instrumented.py"), script, *script_flags]
        environ = {**os.environ, "PYTHONPATH": str(ROOT), "TEST_STEP_SLEEP": str(sleep)}
        return subprocess.Popen(command, env=environ, stdout=open(log, "w"), stderr=subprocess.STDOUT)

    for model in (tiny_vit, tiny_resnet):
        name = Path(model).name
        reference, out = tmp_path / f"{name}-reference", tmp_path / f"{name}-run"
        finish([launch("finetune", flags(model, cifar_like, reference, cpu=False), tmp_path / f"{name}-reference.log")],
               tmp_path / f"{name}-reference.log")
        killed = launch("finetune", flags(model, cifar_like, out, cpu=False), tmp_path / f"{name}-run.log", sleep=0.5)
        wait_for_checkpoint(out, [killed])
        kill_machine(killed)
        again = tmp_path / f"{name}-again.log"
        finish([launch("finetune", flags(model, cifar_like, out, cpu=False), again)], again)
        assert resumed_from(again) >= 4
        a, b = results(reference), results(out)  # (GPU kernels need not be deterministic: one test image of slack)
        assert abs(a["test_accuracy"] - b["test_accuracy"]) <= 1 / b["test_samples"] + 1e-9, name
        serves_its_test_split(out, cifar_like, slack=1)
    log = tmp_path / "distill.log"
    finish([launch("distill", distill_flags(cifar_teacher, tiny_resnet, cifar_like, tmp_path / "distill", cpu=False),
                   log)], log)
    assert results(tmp_path / "distill")["test_samples"] == 48
