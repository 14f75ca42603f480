"""accelerate configs, launch checks, and real 2-process runs on the CPU (gloo)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.commands.launch import launch_command_parser
from conftest import quick_flags
from transformers import AutoModelForImageClassification

import run_distill
import run_finetune
from hf_transfer.errors import UserError
from hf_transfer.integrations.launch import check_config_file, check_launch
from hf_transfer.trainers.transfer_config import TransferConfig
from hf_transfer.trainers.transfer_trainer import TransferTrainer

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "accelerate_configs").glob("*.yaml"))
# 2 processes against 1 with the same global batch: training is the same up to float rounding. Metrics
# computed from the gathered predictions are equal; the eval/test *loss* may differ a little, because
# the Trainer averages per-batch losses and the padded last batch of a rank repeats samples.
TOLERANCE = {"train_loss_rel": 1e-5, "weights": 1e-4, "eval_loss_rel": 0.05}


def test_the_configs_the_issue_asks_for_exist():
    names = {p.stem for p in CONFIGS}
    assert {"single_gpu", "multi_gpu", "fp16", "bf16", "multi_node", "fsdp", "deepspeed_zero2", "cpu"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_config_loads_with_accelerates_loader_and_only_known_keys(path):
    config = load_config_from_file(str(path))  # raises on unknown top-level keys
    known = {action.dest for action in launch_command_parser()._actions}
    assert set(config.fsdp_config) <= known and set(config.deepspeed_config) <= known
    summary = check_config_file(path, cuda_devices=8)
    assert summary["num_processes"] >= 1


def test_fsdp_config_wraps_vit_blocks_and_resnet_stages(tiny_vit, tiny_resnet, tiny_hf_resnet):
    from accelerate import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy

    from hf_transfer.models.loading import load_model

    fsdp = load_config_from_file(str(ROOT / "accelerate_configs" / "fsdp.yaml")).fsdp_config
    assert fsdp["fsdp_version"] == 2
    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy=fsdp["fsdp_auto_wrap_policy"].lower())
    expected = {"tiny_vit": {"ViTLayer"}, "tiny_resnet": {"BasicBlock", "Bottleneck"},  # timm test_resnet mixes both
                "tiny_hf_resnet": {"ResNetStage"}}
    for name, path in (("tiny_vit", tiny_vit), ("tiny_resnet", tiny_resnet), ("tiny_hf_resnet", tiny_hf_resnet)):
        model = load_model(path, ["a", "b", "c"]).model
        policy = fsdp2_prepare_auto_wrap_policy(plugin, model)
        wrapped = {type(m).__name__ for m in model.modules() if policy(m)}
        assert wrapped == expected[name], name


def test_config_file_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        check_config_file(tmp_path / "nope.yaml")
    text = (ROOT / "accelerate_configs" / "bf16.yaml").read_text()
    (tmp_path / "typo.yaml").write_text(text + "num_proceses: 2\n")
    with pytest.raises(UserError, match="unknown setting 'num_proceses'; did you mean 'num_processes'"):
        check_config_file(tmp_path / "typo.yaml")
    # not settings at all: one line each, never the YAML parser's or accelerate's traceback
    for name, content, message in [("broken.yaml", "a: [\n", "is not valid YAML"),
                                   ("scalar.yaml", "foo\n", "holds a str, not settings"),
                                   ("empty.yaml", "", "holds nothing, not settings")]:
        (tmp_path / name).write_text(content)
        with pytest.raises(UserError, match=message):
            check_config_file(tmp_path / name)
    with pytest.raises(UserError, match="is a folder; pass one of its .yaml files"):
        check_config_file(tmp_path)
    text = (ROOT / "accelerate_configs" / "fsdp.yaml").read_text()
    (tmp_path / "nested.yaml").write_text(text.replace("fsdp_version: 2", "fsdp_version: 2\n  fsdp_shard_everything: true"))
    with pytest.raises(UserError, match="unknown keys in fsdp_config: fsdp_shard_everything"):
        check_config_file(tmp_path / "nested.yaml")
    with pytest.raises(UserError, match="starts 8 processes per machine but this machine has 2 GPU"):
        check_config_file(ROOT / "accelerate_configs" / "multi_gpu.yaml", cuda_devices=2)
    with pytest.raises(UserError, match="fp16, which needs a GPU"):
        check_config_file(ROOT / "accelerate_configs" / "fp16.yaml", cuda_devices=0)


@pytest.mark.slow
def test_check_config_command_is_one_line():
    proc = subprocess.run([sys.executable, "-m", "hf_transfer", "check-config", "missing.yaml"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().startswith("error: accelerate config 'missing.yaml' does not")


def test_what_an_accelerate_launch_command_asked_for(tmp_path):
    from hf_transfer.integrations.launch import requested_processes

    assert requested_processes(["/usr/bin/python3", "/usr/local/bin/accelerate", "launch", "--num_processes", "2",
                                "run_finetune.py", "--num_processes", "7"]) == 2  # the script's flags are its own
    assert requested_processes(["python", "-m", "accelerate.commands.launch", "--config_file",
                                str(ROOT / "accelerate_configs" / "cpu.yaml"), "run_finetune.py"]) == 2
    assert requested_processes(["python", "run_finetune.py", "--num_processes", "2"]) is None  # not a launcher
    assert requested_processes([]) is None
    with pytest.raises(UserError, match="accelerate launch was asked for 2 processes but started one; on a machine "
                                        "without a GPU use accelerate launch --config_file"):
        check_launch(TransferConfig(output_dir="x"), environ={}, cuda_devices=0,
                     launcher=["accelerate", "launch", "--num_processes", "2", "run_finetune.py"])
    with pytest.raises(UserError, match="add --multi_gpu"):
        check_launch(TransferConfig(output_dir="x"), environ={}, cuda_devices=2,
                     launcher=["accelerate", "launch", "--num_processes", "2", "run_finetune.py"])
    check_launch(TransferConfig(output_dir="x", use_cpu=True), environ={}, cuda_devices=0,
                 launcher=["accelerate", "launch", "--num_processes", "1", "run_finetune.py"])  # asked for one


def test_launch_checks():
    args = TransferConfig(output_dir="x", use_cpu=True)
    check_launch(args, environ={}, cuda_devices=0)
    with pytest.raises(UserError, match="4 processes were started on this machine but it has 2 GPU"):
        check_launch(TransferConfig(output_dir="x"), environ={"WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "4"},
                     cuda_devices=2)
    with pytest.raises(UserError, match="do not form one distributed run.*--use_cpu"):
        check_launch(args, environ={"WORLD_SIZE": "2"}, cuda_devices=0)
    with pytest.raises(ValueError, match="--fp16 needs a GPU and this run has none: drop --fp16, or use --bf16 --use_cpu"):
        TransferConfig(output_dir="x", fp16=True, use_cpu=True)
    with pytest.raises(UserError, match="fp16 mixed precision needs a GPU"):
        check_launch(args, environ={"ACCELERATE_MIXED_PRECISION": "fp16"}, cuda_devices=0)


def launch(tmp_path, script, flags, *, use_cpu=True, timeout=420):
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(ROOT / "accelerate_configs" / "cpu.yaml"), str(ROOT / "tests" / "instrumented.py"), script,
               *flags, *(["--use_cpu"] if use_cpu else [])]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "TEST_ROWS_DIR": str(tmp_path / "rows")}
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, cwd=tmp_path)


def two_and_one(tmp_path, script: str, common: list[str]) -> tuple[Path, Path]:
    """The same run as 2 processes of batch 4 (launched) and 1 of batch 8 (in-process): the same global batch."""
    two = tmp_path / "two"
    proc = launch(tmp_path, script, [*common, "--output_dir", str(two), "--per_device_train_batch_size", "4"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = tmp_path / "one"
    (run_finetune if script == "finetune" else run_distill).main(
        [*common, "--output_dir", str(one), "--per_device_train_batch_size", "8"])
    return one, two


def results(out: Path) -> dict:
    return json.loads((out / "all_results.json").read_text())


def assert_same_run(one: Path, two: Path):
    a, b = results(one), results(two)
    for key in ("eval_accuracy", "eval_f1", "test_accuracy", "test_f1", "test_f1_macro"):
        assert a[key] == b[key], key
    assert abs(a["train_loss"] - b["train_loss"]) <= TOLERANCE["train_loss_rel"] * abs(a["train_loss"])
    assert abs(a["eval_loss"] - b["eval_loss"]) <= TOLERANCE["eval_loss_rel"] * abs(a["eval_loss"])
    first, second = (AutoModelForImageClassification.from_pretrained(p).state_dict() for p in (one, two))
    assert max((first[k] - second[k]).abs().max().item() for k in first) <= TOLERANCE["weights"]
    steps = [json.loads((p / "trainer_state.json").read_text())["global_step"] for p in (one, two)]
    assert steps[0] == steps[1]


def assert_sharded(rows: Path, train_rows: int):
    ranks = [json.loads((rows / f"rows-rank{r}.json").read_text()) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) > 0
    for step0, step1 in zip(*ranks):
        assert not set(step0) & set(step1)  # each rank its own shard of every global batch
    per_epoch = len(ranks[0]) // 2
    seen = {row for rank in ranks for step in rank[:per_epoch] for row in step}
    assert len(seen) == train_rows  # together they cover the training set once per epoch


@pytest.mark.slow
def test_two_process_finetune_with_unfreezing_matches_one_process(tiny_vit, cifar_like, tmp_path):
    common = ["--model_name_or_path", tiny_vit, "--dataset_name", cifar_like, "--num_train_epochs", "2",
              "--max_train_samples", "40", "--augmentation", "crop+randaugment", "--random_erasing", "0.25",
              "--class_weights", "auto", "--ema_decay", "0.9", "--unfreeze_schedule", "0:head,1:all",
              "--learning_rate", "0.01", "--seed", "3", "--save_total_limit", "5", *quick_flags()]
    one, two = two_and_one(tmp_path, "finetune", common)

    assert_same_run(one, two)
    assert_sharded(tmp_path / "rows", train_rows=40)
    # the output directory is written once: the same files as a 1-process run
    assert {p.name for p in two.iterdir()} == {p.name for p in one.iterdir()}
    # unfreezing under DDP: the backbone stayed put in epoch 0 and trained (in step on both ranks) in epoch 1
    epoch_0, epoch_1 = sorted(two.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    before, after_0, after_1 = (AutoModelForImageClassification.from_pretrained(p).state_dict()
                                for p in (tiny_vit, epoch_0, epoch_1))
    key = "vit.layers.0.mlp.fc1.weight"
    assert torch.equal(after_0[key], before[key]) and not torch.equal(after_1[key], before[key])


@pytest.mark.slow
@pytest.mark.scale_out
def test_two_process_run_with_drop_path(tiny_resnet, cifar_like, tmp_path):
    """Stochastic depth draws differ per process (so no 1-process twin); the 2-process run must just work."""
    out = tmp_path / "two"
    proc = launch(tmp_path, "finetune", ["--model_name_or_path", tiny_resnet, "--dataset_name", cifar_like,
                                         "--output_dir", str(out), "--max_steps", "4", "--drop_path_rate", "0.2",
                                         "--ema_decay", "0.9", *quick_flags()])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((out / "config.json").read_text())["model_args"]["drop_path_rate"] == 0.2
    assert results(out)["test_samples"] == 48 and list(out.glob("checkpoint-*/ema.safetensors"))


@pytest.mark.slow
def test_two_process_distillation_matches_one_process(cifar_teacher, tiny_vit, cifar_like, tmp_path):
    common = ["--teacher_model_name_or_path", cifar_teacher, "--student_model_name_or_path", tiny_vit,
              "--image_size", "24", "--dataset_name", cifar_like, "--num_train_epochs", "2", "--max_train_samples",
              "40", "--augmentation", "basic", "--seed", "3", *quick_flags()]  # crops and flips batched on the device
    one, two = two_and_one(tmp_path, "distill", common)
    assert_same_run(one, two)
    assert_sharded(tmp_path / "rows", train_rows=40)
    assert results(two)["test_teacher_accuracy"] == results(one)["test_teacher_accuracy"]
    logs = [h for h in json.loads((two / "trainer_state.json").read_text())["log_history"] if "loss" in h]
    assert all("kd_loss" in h for h in logs)


@pytest.mark.slow
def test_two_processes_without_a_distributed_backend_are_refused(tiny_vit, cifar_like, tmp_path):
    proc = launch(tmp_path, "finetune", ["--model_name_or_path", tiny_vit, "--dataset_name", cifar_like,
                                         "--output_dir", str(tmp_path / "o"), *quick_flags()], use_cpu=False)
    assert proc.returncode != 0
    assert "error: 2 processes were started but they do not form one distributed run" in proc.stderr
    assert not (tmp_path / "o" / "model.safetensors").exists()


@pytest.mark.parametrize("script", ["finetune", "distill"])
def test_bf16_on_cpu(script, cifar_teacher, tiny_resnet, cifar_like, tmp_path):
    flags = ["--dataset_name", cifar_like, "--output_dir", str(tmp_path / "o"), "--max_steps", "3", "--bf16",
             "--use_cpu", *quick_flags()]
    if script == "finetune":
        results = run_finetune.main(["--model_name_or_path", tiny_resnet, *flags])
    else:
        results = run_distill.main(["--teacher_model_name_or_path", cifar_teacher,
                                    "--student_model_name_or_path", tiny_resnet, *flags])
    assert np.isfinite(results["train_loss"]) and results["test_samples"] == 48
    # autocast computes in bf16; the weights stay float32 and are saved so
    saved = AutoModelForImageClassification.from_pretrained(tmp_path / "o")
    assert {p.dtype for p in saved.parameters()} == {torch.float32}


def test_teacher_forward_runs_in_the_runs_autocast_dtype(cifar_teacher, tiny_resnet, cifar_like, tmp_path):
    from hf_transfer.data.dataset import load_image_data
    from hf_transfer.data.samples import attach_transforms
    from hf_transfer.models.loading import load_model, load_teacher
    from hf_transfer.run.assembly import trainer_kwargs
    from hf_transfer.trainers.distillation_config import DistillationConfig
    from hf_transfer.trainers.distillation_trainer import DistillationTrainer

    data = load_image_data(cifar_like)
    attach_transforms(data, "none")
    teacher, student = load_teacher(cifar_teacher, data.label_names), load_model(tiny_resnet, data.label_names)
    args = DistillationConfig(output_dir=str(tmp_path), bf16=True, use_cpu=True, dataloader_num_workers=0,
                              per_device_train_batch_size=4, report_to="none")
    trainer = DistillationTrainer(teacher=teacher.model, teacher_spec=teacher.spec, **trainer_kwargs(args, data, student))
    dtypes = []
    linear = next(m for m in trainer.teacher.modules() if isinstance(m, torch.nn.Linear))
    linear.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
    trainer.model.train()
    trainer.compute_loss(trainer.model, trainer._prepare_inputs(next(iter(trainer.get_train_dataloader()))))
    assert dtypes == [torch.bfloat16]


def test_channels_last_and_compile_flags(tiny_resnet, cifar_like, tmp_path):
    results = run_finetune.main(["--model_name_or_path", tiny_resnet, "--dataset_name", cifar_like,
                                 "--output_dir", str(tmp_path / "o"), "--max_steps", "2", "--channels_last", "true",
                                 "--torch_compile", "--torch_compile_backend", "eager", *quick_flags()])
    assert np.isfinite(results["train_loss"])
    reloaded = AutoModelForImageClassification.from_pretrained(tmp_path / "o")
    assert reloaded(pixel_values=torch.zeros(1, 3, 32, 32)).logits.shape == (1, 3)


@pytest.mark.multi_gpu
def test_two_gpus(tiny_vit, cifar_like, tmp_path):
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(ROOT / "accelerate_configs" / "multi_gpu.yaml"), "--num_processes", "2",
               str(ROOT / "run_finetune.py"), "--model_name_or_path", tiny_vit, "--dataset_name", cifar_like,
               "--output_dir", str(tmp_path / "o"), "--num_train_epochs", "1", *quick_flags()]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "o" / "model.safetensors").exists()


@pytest.mark.parametrize("flag, family_model, expected", [
    (None, "tiny_resnet", False),  # auto: only on a GPU
    (True, "tiny_resnet", True),
    (True, "tiny_vit", False),  # channels-last is for CNNs
])
def test_channels_last_choice(flag, family_model, expected, request, cifar_like, tmp_path):
    from hf_transfer.data.dataset import load_image_data
    from hf_transfer.models.loading import load_model
    from hf_transfer.run.assembly import trainer_kwargs

    data = load_image_data(cifar_like)
    loaded = load_model(request.getfixturevalue(family_model), data.label_names)
    args = TransferConfig(output_dir=str(tmp_path), use_cpu=True, channels_last=flag, report_to="none")
    kwargs = trainer_kwargs(args, data, loaded)
    assert kwargs["channels_last"] is expected
    TransferTrainer(**kwargs)  # the trainer puts the weights in that layout
    conv = next(m for m in loaded.model.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size[0] > 1)
    assert conv.weight.is_contiguous(memory_format=torch.channels_last) == expected


def test_a_cnn_teacher_follows_the_students_channels_last_layout(tiny_resnet, tiny_vit, cifar_like, tmp_path):
    """What a GPU run gets by default, asked for on the CPU: the CNN teacher's weights and its input go channels-last."""
    from hf_transfer.data.dataset import load_image_data
    from hf_transfer.models.loading import load_model
    from hf_transfer.run.assembly import trainer_kwargs
    from hf_transfer.trainers.distillation_config import DistillationConfig
    from hf_transfer.trainers.distillation_trainer import DistillationTrainer

    data = load_image_data(cifar_like)
    for teacher_checkpoint, expected in ((tiny_resnet, True), (tiny_vit, False)):
        teacher = load_model(teacher_checkpoint, data.label_names)
        student = load_model(tiny_resnet, data.label_names)
        args = DistillationConfig(output_dir=str(tmp_path), use_cpu=True, channels_last=True,
                                  teacher_model_name_or_path=teacher_checkpoint, report_to="none")
        trainer = DistillationTrainer(teacher=teacher.model, teacher_spec=teacher.spec,
                                      **trainer_kwargs(args, data, student))
        conv = next(m for m in trainer.teacher.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size[0] > 1)
        assert conv.weight.is_contiguous(memory_format=torch.channels_last) == expected
        assert trainer.teacher_input.channels_last == expected


@pytest.mark.gpu
@pytest.mark.parametrize("script", ["finetune", "distill"])
def test_fp16_on_a_gpu(script, cifar_teacher, tiny_resnet, cifar_like, tmp_path):
    flags = ["--dataset_name", cifar_like, "--output_dir", str(tmp_path / "o"), "--max_steps", "3", "--fp16",
             *quick_flags()]
    if script == "finetune":
        results = run_finetune.main(["--model_name_or_path", tiny_resnet, *flags])
    else:
        results = run_distill.main(["--teacher_model_name_or_path", cifar_teacher,
                                    "--student_model_name_or_path", tiny_resnet, *flags])
    assert np.isfinite(results["train_loss"]) and results["test_samples"] == 48
    # autocast computes in bf16; the weights stay float32 and are saved so
    saved = AutoModelForImageClassification.from_pretrained(tmp_path / "o")
    assert {p.dtype for p in saved.parameters()} == {torch.float32}


@pytest.mark.slow
@pytest.mark.scale_out
def test_two_process_run_with_the_transfer_strategies_matches_one_process(tiny_vit, cifar_like, tmp_path):
    """docs/strategies.md: layer decay, step decay, a backbone learning-rate scale and label smoothing in 2 processes
    give the 1-process run. (Mixup and CutMix draw per process, so their 2-process runs have no 1-process twin: the
    second launch checks that they run.)"""
    common = ["--model_name_or_path", tiny_vit, "--dataset_name", cifar_like, "--num_train_epochs", "2",
              "--max_train_samples", "40", "--layer_decay", "0.8", "--lr_step_size", "1", "--backbone_lr_scale",
              "0.5", "--label_smoothing_factor", "0.1", "--seed", "3", *quick_flags()]
    one, two = two_and_one(tmp_path, "finetune", common)
    assert_same_run(one, two)
    mixed = tmp_path / "mixed"
    proc = launch(tmp_path, "finetune", [*common, "--output_dir", str(mixed), "--mixup", "0.4", "--cutmix", "1.0",
                                         "--freeze_backbone", "--layer_decay", "1.0"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert results(mixed)["test_samples"] == 48
