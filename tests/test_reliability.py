"""Interruption and resume, bad data, bad numbers, unsafe files and leaked secrets, a small soak."""

import gc
import json
import logging
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import PIL.Image
import psutil
import pytest
import torch
from conftest import quick_flags
from datasets import ClassLabel, Dataset, DatasetDict, Features, Image, Value
from helpers import png_bytes, random_images
from transformers import AutoModelForImageClassification, TrainerCallback

import run_distill
import run_finetune
from hf_transfer.data.dataset import load_image_data
from hf_transfer.data.samples import attach_transforms
from hf_transfer.errors import UserError
from hf_transfer.models.loading import load_model
from hf_transfer.run.assembly import trainer_kwargs
from hf_transfer.run.checkpoints import is_complete, last_complete_checkpoint
from hf_transfer.trainers.transfer_config import TransferConfig
from hf_transfer.trainers.transfer_trainer import NonFiniteLossError, TransferTrainer

ROOT = Path(__file__).resolve().parents[1]


def run_flags(model, data, out, *extra):
    """12 steps (2 epochs of 6), a checkpoint every 2 steps, augmentation (with RandAugment and random erasing),
    class weights and weight EMA on: the run the interruption tests repeat, so that each must resume exactly."""
    return ["--model_name_or_path", model, "--dataset_name", data, "--output_dir", str(out), "--num_train_epochs", "2",
            "--save_strategy", "steps", "--save_steps", "2", "--eval_strategy", "steps", "--eval_steps", "2",
            "--save_total_limit", "20", "--seed", "7", "--augmentation", "basic+randaugment", "--random_erasing",
            "0.25", "--class_weights", "auto", "--ema_decay", "0.9", *extra, *quick_flags()]


def start(flags, sleep=0.0, script="finetune", log: Path | None = None):
    """The instrumented script in a subprocess; `log`: its output goes to that file (a process left running beside
    another must not block on a full pipe nobody reads), else to pipes for `communicate`."""
    env = {**os.environ, "TEST_STEP_SLEEP": str(sleep), "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "2"}
    output = open(log, "w") if log is not None else subprocess.PIPE  # (the child holds the file open)
    return subprocess.Popen([sys.executable, str(ROOT / "tests" / "instrumented.py"), script, *flags], env=env,
                            stdout=output, stderr=subprocess.STDOUT if log is not None else subprocess.PIPE, text=True)


def wait_for(path: Path, process, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if path.is_dir() and is_complete(path):
            return
        assert process.poll() is None, process.communicate()[1][-3000:]
        time.sleep(0.05)
    raise AssertionError(f"{path} did not appear")


def final(out: Path) -> tuple[dict, dict]:
    results = json.loads((out / "all_results.json").read_text())
    keep = {k: v for k, v in results.items() if "runtime" not in k and "per_second" not in k and "flos" not in k}
    return keep, AutoModelForImageClassification.from_pretrained(out).state_dict()


def assert_identical(a: Path, b: Path):
    (results_a, weights_a), (results_b, weights_b) = final(a), final(b)
    for key in ("eval_accuracy", "eval_loss", "test_accuracy", "test_loss", "test_f1"):
        assert results_a[key] == results_b[key], key
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)


@pytest.fixture(scope="module")
def uninterrupted(tiny_vit, cifar_like, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference") / "run"
    process = start(run_flags(tiny_vit, cifar_like, out))
    _, err = process.communicate(timeout=300)
    assert process.returncode == 0, err[-3000:]
    return out


@pytest.mark.slow
def test_sigkill_mid_epoch_then_the_same_command_finishes_bit_identical(uninterrupted, tiny_vit, cifar_like, tmp_path):
    out = tmp_path / "run"
    flags = run_flags(tiny_vit, cifar_like, out)
    process = start(flags, sleep=0.3)
    wait_for(out / "checkpoint-4", process)  # epoch 0 has 6 steps: this is mid-epoch
    process.kill()
    process.wait()
    assert not (out / "model.safetensors").exists()
    newest = Path(last_complete_checkpoint(out)).name  # checkpoint-4, or a later one if the kill came late

    again = start(flags)
    _, err = again.communicate(timeout=300)
    assert again.returncode == 0, err[-3000:]
    resumed_from = [line for line in err.splitlines() if "resuming from checkpoint" in line]
    assert len(resumed_from) == 1 and resumed_from[0].endswith(newest), resumed_from
    assert_identical(uninterrupted, out)


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_exits_cleanly(uninterrupted, tiny_vit, cifar_like, tmp_path):
    out = tmp_path / "run"
    flags = run_flags(tiny_vit, cifar_like, out)
    process = start(flags, sleep=0.3)
    wait_for(out / "checkpoint-2", process)
    sent = time.time()
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=60)
    assert time.time() - sent < 30
    assert process.returncode == 143
    last = err.strip().splitlines()[-1]
    assert last.startswith("stopped: SIGTERM at step ") and "run the same command again to resume" in last
    step = int(last.split("at step ")[1].split(";")[0])
    assert step >= 2 and is_complete(out / f"checkpoint-{step}") and "Traceback" not in err

    again = start(flags)
    _, err = again.communicate(timeout=300)
    assert again.returncode == 0, err[-3000:]
    assert f"resuming from checkpoint {out / f'checkpoint-{step}'}" in err
    assert_identical(uninterrupted, out)


@pytest.mark.slow
def test_a_truncated_checkpoint_is_never_resumed_from(uninterrupted, tiny_vit, cifar_like, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(uninterrupted, out)
    for name in ("all_results.json", "model.safetensors"):  # a run killed in its last checkpoint has not finished
        (out / name).unlink()
    weights = out / "checkpoint-12" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # killed while writing it
    assert not is_complete(out / "checkpoint-12") and is_complete(out / "checkpoint-10")

    process = start(run_flags(tiny_vit, cifar_like, out))
    _, err = process.communicate(timeout=300)
    assert process.returncode == 0, err[-3000:]
    assert f"resuming from checkpoint {out / 'checkpoint-10'}" in err
    assert (out / "incomplete-checkpoint-12").is_dir()
    assert_identical(uninterrupted, out)


def test_completeness_checks_each_file(tmp_path):
    checkpoint = tmp_path / "checkpoint-3"
    checkpoint.mkdir()
    AutoModelForImageClassification.from_config(
        __import__("transformers").ViTConfig(num_hidden_layers=1, hidden_size=8, num_attention_heads=1,
                                             intermediate_size=8, image_size=8, patch_size=4)
    ).save_pretrained(checkpoint)
    torch.save({"state": {}}, checkpoint / "optimizer.pt")
    assert not is_complete(checkpoint)  # no trainer_state.json yet: it is written last
    (checkpoint / "trainer_state.json").write_text("{}")
    assert is_complete(checkpoint)
    optimizer = (checkpoint / "optimizer.pt").read_bytes()
    (checkpoint / "optimizer.pt").write_bytes(optimizer[:-30])
    assert not is_complete(checkpoint)
    assert last_complete_checkpoint(tmp_path) is None and (tmp_path / "incomplete-checkpoint-3").is_dir()


# ---------------------------------------------------------------- non-finite losses


def test_a_run_cut_short_twice_while_saving_the_same_step_resumes(tmp_path):
    """The second incomplete checkpoint-N takes the place of the first one moved aside (a kill that comes at the
    same save each time: memory, a time limit)."""
    for attempt in range(2):
        (tmp_path / "checkpoint-2").mkdir()
        (tmp_path / "checkpoint-2" / "trainer_state.json").write_text("{")  # cut short while written
        (tmp_path / "checkpoint-2" / "attempt").write_text(str(attempt))
        assert last_complete_checkpoint(tmp_path) is None
    assert (tmp_path / "incomplete-checkpoint-2" / "attempt").read_text() == "1"


class NanAt:
    """Forward pre-hook: the n-th training forward pass gets NaN pixels (so its loss is NaN); with `every`, every
    later one too."""

    def __init__(self, n, every=False):
        self.n, self.every, self.calls = n, every, 0

    def __call__(self, module, args, kwargs):
        if module.training:
            self.calls += 1
            if self.calls == self.n or (self.every and self.calls > self.n):
                kwargs = {**kwargs, "pixel_values": kwargs["pixel_values"] * float("nan")}
        return args, kwargs


class InfiniteGradientAt:
    """Forward hook: the n-th training forward pass's logits pass infinite gradients back (its loss is finite)."""

    def __init__(self, n, every=False):
        self.n, self.every, self.calls = n, every, 0

    def __call__(self, module, args, output):
        if module.training:
            self.calls += 1
            if self.calls == self.n or (self.every and self.calls > self.n):
                output.logits.register_hook(lambda grad: grad * float("inf"))


def nan_trainer(tiny_vit, cifar_like, tmp_path, bad="loss", every=False, **overrides):
    """Six steps of 8 images; the third has a NaN loss (`bad="loss"`) or infinite gradients (and every later one
    too, with `every`)."""
    data = load_image_data(cifar_like)
    attach_transforms(data, "none")
    loaded = load_model(tiny_vit, data.label_names)
    args = TransferConfig(output_dir=str(tmp_path), per_device_train_batch_size=8, dataloader_num_workers=0,
                          report_to="none", use_cpu=True, save_strategy="steps", save_steps=2,
                          eval_strategy="no", load_best_model_at_end=False, max_steps=6, **overrides)
    trainer = TransferTrainer(**trainer_kwargs(args, data, loaded))
    if bad == "loss":
        loaded.model.register_forward_pre_hook(NanAt(3, every), with_kwargs=True)
    else:
        loaded.model.register_forward_hook(InfiniteGradientAt(3, every))
    return trainer


def test_a_nan_loss_stops_the_run_at_its_step_and_keeps_the_last_checkpoint(tiny_vit, cifar_like, tmp_path):
    trainer = nan_trainer(tiny_vit, cifar_like, tmp_path)
    with pytest.raises(NonFiniteLossError, match="the training loss is nan at step 3 .*the last checkpoint is "
                                                 f"{tmp_path / 'checkpoint-2'}"):
        trainer.train()
    assert is_complete(tmp_path / "checkpoint-2") and not (tmp_path / "checkpoint-4").exists()
    saved = AutoModelForImageClassification.from_pretrained(tmp_path / "checkpoint-2").state_dict()
    assert all(torch.isfinite(v).all() for v in saved.values())


class Snapshots(TrainerCallback):
    """The whole training state at the start of every optimizer step: weights (and the weight average), the
    optimizer's state, the schedule's, the step count."""

    def __init__(self, trainer):
        self.trainer, self.before, self.after = trainer, [], []

    def state(self, state):
        trainer = self.trainer
        optimizer = trainer.optimizer.state_dict()
        return {"step": state.global_step, "weights": {k: v.clone() for k, v in trainer.model.state_dict().items()},
                "optimizer": {i: {k: v.clone() for k, v in s.items()} for i, s in optimizer["state"].items()},
                "lr": [g["lr"] for g in optimizer["param_groups"]], "schedule": trainer.lr_scheduler.last_epoch,
                "ema": {k: v.clone() for k, v in trainer.ema.state_dict().items()} if trainer.ema else {}}

    def on_step_begin(self, args, state, control, **kwargs):
        self.before.append(self.state(state))

    def on_step_end(self, args, state, control, **kwargs):
        self.after.append(self.state(state))


def same_state(a, b) -> bool:
    def equal(x, y):
        if isinstance(x, dict):
            return x.keys() == y.keys() and all(equal(x[k], y[k]) for k in x)
        return torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y
    return equal(a, b)


@pytest.mark.parametrize("bad", ["loss", "gradients"])
def test_max_nan_steps_skips_a_bad_step_as_if_it_never_happened(tiny_vit, cifar_like, tmp_path, caplog, bad):
    """The 3rd step has a NaN loss, or a finite loss and an infinite gradient: with --max_nan_steps it leaves
    the weights, the weight average, the optimizer's momentum and step counts, the schedule and the step count
    exactly as they were. SGD with Nesterov momentum and weight decay: a step with zero gradients still moves."""
    trainer = nan_trainer(tiny_vit, cifar_like, tmp_path, bad=bad, max_nan_steps=1, ema_decay=0.9,
                          optim="sgd", optim_args="momentum=0.9,nesterov=True", weight_decay=0.01, max_grad_norm=0)
    snapshots = Snapshots(trainer)
    trainer.add_callback(snapshots)
    trainer.train()
    assert "non-finite loss or gradients at step 3: step skipped (1 of 1 allowed)" in caplog.text
    skipped = 2  # the third step begun
    assert snapshots.before[skipped]["step"] == 2 and same_state(snapshots.after[skipped], snapshots.before[skipped])
    assert same_state(snapshots.before[skipped + 1], snapshots.before[skipped])  # the next step starts from there
    assert not same_state(snapshots.after[skipped + 1], snapshots.before[skipped + 1])  # and is taken
    assert trainer.state.global_step == 5  # 6 batches, one of them not taken
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert logged and all(np.isfinite(logged))


def test_more_bad_steps_than_allowed_stop_the_run(tiny_vit, cifar_like, tmp_path):
    """Step 3 fails, is skipped, and the next batch (step 3 again: the first was not taken) fails too."""
    trainer = nan_trainer(tiny_vit, cifar_like, tmp_path, bad="loss", every=True, max_nan_steps=1)
    with pytest.raises(NonFiniteLossError, match=r"the training loss or gradient norm is nan at step 3 of 6 \(more "
                                                 r"than the 1 steps --max_nan_steps skips\)"):
        trainer.train()


def test_a_finite_loss_with_infinite_gradients_stops_the_run(tiny_vit, cifar_like, tmp_path):
    trainer = nan_trainer(tiny_vit, cifar_like, tmp_path, bad="gradients")
    with pytest.raises(NonFiniteLossError, match="the gradient norm is (nan|inf) at step 3 .*the last checkpoint is "
                                                 f"{tmp_path / 'checkpoint-2'}"):
        trainer.train()
    assert not (tmp_path / "checkpoint-4").exists()


def test_a_diverging_run_stops_with_one_line(tiny_vit, cifar_like, tmp_path):
    with pytest.raises(UserError, match=r"the training loss is (nan|inf|-inf) at step \d+"):
        run_finetune.main(["--model_name_or_path", tiny_vit, "--dataset_name", cifar_like, "--output_dir",
                           str(tmp_path / "o"), "--learning_rate", "1e30", "--optim", "sgd", "--max_grad_norm", "0",
                           "--num_train_epochs", "3", *quick_flags()])


# ---------------------------------------------------------------- bad data


def zero_size_png() -> bytes:
    data = bytearray(png_bytes(PIL.Image.new("RGB", (1, 1))))
    data[16:20] = struct.pack(">I", 0)  # IHDR width 0
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def broken_dataset(tmp_path) -> str:
    good = [{"bytes": png_bytes(image), "path": None} for image in random_images(12, seed=5)]
    broken = [{"bytes": good[0]["bytes"][:50], "path": None}, {"bytes": b"GIF89a not really", "path": None},
              {"bytes": zero_size_png(), "path": None}]
    features = Features({"image": Image(), "label": ClassLabel(names=["a", "b"])})
    train = Dataset.from_dict({"image": good[:8] + broken, "label": [i % 2 for i in range(11)]}, features=features)
    test = Dataset.from_dict({"image": good[8:] + broken[:1], "label": [0, 1, 0, 1, 0]}, features=features)
    DatasetDict(train=train, test=test).save_to_disk(str(tmp_path / "broken"))
    return str(tmp_path / "broken")


def test_zero_size_image_is_reported_as_corrupt(tmp_path):
    data = load_image_data(broken_dataset(tmp_path), validation_split=0.3)
    attach_transforms(data, "none", decode_once=False)  # images decoded when a batch asks for them
    rows = data.train.with_format(None)["__row__"]
    with pytest.raises(UserError, match="cannot decode the image in split 'train', row 10"):
        data.train[rows.index(10)]


def test_a_split_decoded_once_reports_its_broken_image_before_training(tmp_path):
    data = load_image_data(broken_dataset(tmp_path), validation_split=0.3)
    with pytest.raises(UserError, match=r"cannot decode the image in split 'train', row (8|9|10)"):
        attach_transforms(data, "none")


def test_corrupt_images_stop_the_run_naming_split_and_row(tiny_resnet, tmp_path):
    with pytest.raises(UserError, match=r"cannot decode the image in split '(train|test|validation)', row \d+"):
        run_finetune.main(["--model_name_or_path", tiny_resnet, "--dataset_name", broken_dataset(tmp_path),
                           "--output_dir", str(tmp_path / "o"), "--validation_split", "0.3", *quick_flags()])


@pytest.mark.slow
def test_corrupt_image_error_from_a_dataloader_worker_is_one_line(tiny_resnet, tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "run_finetune.py"), "--model_name_or_path", tiny_resnet,
                           "--dataset_name", broken_dataset(tmp_path), "--output_dir", str(tmp_path / "o"),
                           "--validation_split", "0.3", *quick_flags(), "--dataloader_num_workers", "1"],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: cannot decode the image in split '") and ", row " in last


def test_skip_corrupt_images_drops_and_counts_them(tiny_resnet, tmp_path):
    results = run_finetune.main(["--model_name_or_path", tiny_resnet, "--dataset_name", broken_dataset(tmp_path),
                                 "--output_dir", str(tmp_path / "o"), "--validation_split", "0.3",
                                 "--skip_corrupt_images", *quick_flags()])
    assert results["train_skipped_images"] + results["validation_skipped_images"] == 3
    assert results["test_skipped_images"] == 1 and results["test_samples"] == 4
    assert json.loads((tmp_path / "o" / "train_results.json").read_text())["test_skipped_images"] == 1


def test_labels_outside_the_class_range_are_refused_up_front(tmp_path):
    features = Features({"image": Image(), "label": Value("int64")})
    train = Dataset.from_dict({"image": random_images(4), "label": [0, 1, 0, 1]}, features=features)
    train = train.cast_column("label", ClassLabel(names=["a", "b"]))
    bad = Dataset.from_dict({"image": random_images(3), "label": [1, 5, -1]}, features=features)
    bad = bad.cast_column("label", ClassLabel(names=["a", "b"]))
    DatasetDict(train=train, test=bad).save_to_disk(str(tmp_path / "ds"))
    with pytest.raises(UserError, match=r"label 5 in split 'test', row 1 is outside 0..1 \(2 such rows\)"):
        load_image_data(str(tmp_path / "ds"))


# ---------------------------------------------------------------- bad flags (README, "Validated arguments")


def cli(main, argv, capsys) -> tuple[int, str]:
    """What the command line does with `argv`: exit code and stderr (in-process, to save start-up time)."""
    from hf_transfer.errors import run_cli

    try:
        code = run_cli(main, argv)
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    return code, capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [
    (["--learning_rate", "-1"], "--learning_rate must be > 0"),
    (["--per_device_train_batch_size", "0"], "--per_device_train_batch_size must be >= 1"),
    (["--validation_split", "0"], "--validation_split must be between 0 and 1"),
    (["--image_size", "-3"], "--image_size must be a positive number"),
    (["--crop_pct", "1.5"], "--crop_pct must be in (0, 1]"),
    (["--min_seen_images", "-1"], "--min_seen_images must be >= 0"),
    (["--unfreeze_schedule", "0:head,1:top"], "unknown stage 'top'"),
    (["--max_nan_steps", "-1"], "--max_nan_steps must be >= 0"),
    (["--augmentation", "wild"], "--augmentation: unknown preset 'wild'"),
    (["--learning_rate", "fast"], "invalid float value: 'fast'"),
])
def test_invalid_values_are_one_line_and_exit_2(flags, message, tmp_path, capsys):
    code, err = cli(run_finetune.main, ["--dataset_name", "x/y", "--output_dir", str(tmp_path / "o"), *flags], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


@pytest.mark.parametrize("flags, message", [
    (["--temperature", "-1"], "error: --temperature must be > 0, got -1.0"),
    (["--alpha", "2"], "error: --alpha must be in [0, 1], got 2.0"),
])
def test_distillation_values_are_one_line_and_exit_2(flags, message, tmp_path, capsys):
    code, err = cli(run_distill.main, ["--teacher_model_name_or_path", "t", "--output_dir", str(tmp_path / "o"),
                                       *flags], capsys)
    assert code == 2 and err.strip() == message


def test_image_size_the_model_cannot_take_is_refused(tiny_vit, cifar_like, tmp_path):
    with pytest.raises(UserError, match="--image_size 30 is not a multiple of the model's patch size 8"):
        run_finetune.main(["--model_name_or_path", tiny_vit, "--dataset_name", cifar_like, "--output_dir",
                           str(tmp_path / "o"), "--image_size", "30", *quick_flags()])


# ---------------------------------------------------------------- nothing unsafe loaded or leaked


def test_pickled_weights_are_refused_without_running_them(tiny_vit, tmp_path):
    evil = tmp_path / "evil"
    shutil.copytree(tiny_vit, evil)
    (evil / "model.safetensors").unlink()
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    import pickle

    (evil / "pytorch_model.bin").write_bytes(pickle.dumps({"vit.embeddings.cls_token": Payload()}))
    with pytest.raises(UserError, match="refusing to load the model .* use a safetensors checkpoint"):
        load_model(str(evil), ["a", "b"])
    assert not marker.exists()


def test_remote_code_is_not_run_unless_asked(tiny_vit, tmp_path):
    custom = tmp_path / "custom"
    shutil.copytree(tiny_vit, custom)
    marker = tmp_path / "ran"
    (custom / "configuration_custom.py").write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    config = json.loads((custom / "config.json").read_text())
    config.update(model_type="custom-vit", auto_map={"AutoConfig": "configuration_custom.CustomConfig"})
    (custom / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="could not load model config"):
        load_model(str(custom), ["a", "b"])
    assert not marker.exists()


@pytest.mark.parametrize("spelling", [["--hub_token", "{}"], ["--hub_token={}"], ["--hub-token", "{}"]])
def test_the_hub_token_is_written_nowhere(tiny_resnet, cifar_like, tmp_path, monkeypatch, capfd, spelling):
    token = "hf_FAKEtokenFORtests0123456789abcdef"
    monkeypatch.setenv("HF_TOKEN", token)
    out = tmp_path / "run"
    run_finetune.main(["--model_name_or_path", tiny_resnet, "--dataset_name", cifar_like, "--output_dir", str(out),
                       *(flag.format(token) for flag in spelling), "--max_steps", "2", "--save_steps", "1",
                       "--save_strategy", "steps", "--eval_strategy", "steps", "--eval_steps", "1", *quick_flags()])
    written = [p for p in out.rglob("*") if p.is_file()]
    assert any(p.name == "training_args.bin" for p in written) and any(p.name == "run_args.json" for p in written)
    assert [p for p in written if token.encode() in p.read_bytes()] == []
    captured = capfd.readouterr()
    assert token not in captured.out and token not in captured.err


# ---------------------------------------------------------------- run folders: an explicit checkpoint, another working folder


def short_run(model, data, out, *extra):
    """4 steps, a checkpoint and an evaluation every 2: checkpoint-2 is an earlier checkpoint of a finished run."""
    return ["--model_name_or_path", model, "--dataset_name", data, "--output_dir", str(out), "--max_steps", "4",
            "--save_strategy", "steps", "--save_steps", "2", "--eval_strategy", "steps", "--eval_steps", "2",
            "--learning_rate", "0.01", *extra, *quick_flags()]


def files_of(folder: Path) -> dict:
    return {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.mark.slow
def test_an_explicit_checkpoint_is_compared_like_an_automatic_resume(tiny_resnet, cifar_like, tmp_path):
    out = tmp_path / "run"
    run_finetune.main(short_run(tiny_resnet, cifar_like, out))
    finished, earlier = files_of(out), out / "checkpoint-2"
    # other settings from an earlier checkpoint of a finished run: refused, the finished run left as it was
    with pytest.raises(UserError, match=r"'.*checkpoint-2' was written by a run with other settings \(learning_rate "
                                        r"0.01 -> 0.5; max_steps 4 -> 6\): resume it with that run's settings, or "
                                        r"train a new run from its weights with --model_name_or_path"):
        run_finetune.main([*short_run(tiny_resnet, cifar_like, out, "--learning_rate", "0.5", "--max_steps", "6"),
                           "--resume_from_checkpoint", str(earlier)])
    # the same settings: still not over the finished run's results without --overwrite_output_dir
    with pytest.raises(UserError, match="holds a finished run: going on from --resume_from_checkpoint .* would "
                                        "replace its results"):
        run_finetune.main([*short_run(tiny_resnet, cifar_like, out), "--resume_from_checkpoint", str(earlier)])
    assert files_of(out) == finished

    # a checkpoint taken out of its run folder carries the settings that wrote it
    alone = tmp_path / "kept" / "step-2"
    shutil.copytree(earlier, alone)
    with pytest.raises(UserError, match=r"'.*step-2' was written by a run with other settings \(learning_rate "
                                        r"0.01 -> 0.5\)"):
        run_finetune.main([*short_run(tiny_resnet, cifar_like, tmp_path / "new", "--learning_rate", "0.5"),
                           "--resume_from_checkpoint", str(alone)])
    assert not (tmp_path / "new").exists()
    # ... and with the same settings goes on in a new folder as the run went on in its own
    elsewhere = tmp_path / "elsewhere"
    run_finetune.main([*short_run(tiny_resnet, cifar_like, elsewhere), "--resume_from_checkpoint", str(alone)])
    assert_identical(out, elsewhere)

    # an interrupted run goes on from an earlier checkpoint of its own; its newer one is not this continuation's
    for name in ("all_results.json", "model.safetensors"):
        (out / name).unlink()
    run_finetune.main([*short_run(tiny_resnet, cifar_like, out), "--resume_from_checkpoint", str(earlier)])
    assert (out / "superseded-checkpoint-4").is_dir() and (out / "checkpoint-4").is_dir()
    assert_identical(elsewhere, out)
    # --overwrite_output_dir replaces a finished run's results from one of its checkpoints, keeping that one
    run_finetune.main([*short_run(tiny_resnet, cifar_like, out), "--resume_from_checkpoint", str(earlier),
                       "--overwrite_output_dir"])
    assert not (out / "superseded-checkpoint-4").exists()
    assert_identical(elsewhere, out)


class Cut(Exception):
    pass


class CutAt(TrainerCallback):
    """Ends the run as a kill would: right after the checkpoint of a step, or in the final evaluation (after the
    training's results are written)."""

    def __init__(self, step: int | None = None):
        self.step, self.trained = step, False

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise Cut

    def on_train_end(self, args, state, control, **kwargs):
        self.trained = True

    def on_evaluate(self, args, state, control, **kwargs):
        if self.step is None and self.trained:
            raise Cut


@pytest.mark.slow
@pytest.mark.parametrize("step", [2, None], ids=["after-a-checkpoint", "in-the-final-evaluation"])
def test_a_run_over_an_overwritten_one_is_not_taken_for_it_when_cut_short(tiny_resnet, cifar_like, tmp_path, caplog,
                                                                          step):
    """--overwrite_output_dir with other settings, killed before its end: the same command then resumes it, and
    does not report the earlier run's results as its own."""
    out = tmp_path / "run"
    run_finetune.main(short_run(tiny_resnet, cifar_like, out))
    earlier = ["test_results.json", "eval_results.json", "README.md", "onnx/model.onnx"]
    (out / "onnx").mkdir()
    (out / "onnx" / "model.onnx").write_bytes(b"an export of the earlier run")
    assert all((out / name).is_file() for name in earlier)
    other = short_run(tiny_resnet, cifar_like, out, "--seed", "3")
    handler = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Cut):
        run_finetune.main([*other, "--overwrite_output_dir"], callbacks=[CutAt(step)])
    # nothing of the earlier run is left to be read as this one's (`report`, a push)
    assert not [name for name in earlier if (out / name).exists()] and not (out / "onnx").exists()
    signal.signal(signal.SIGTERM, handler)  # (the run's own handler, left installed by the cut)
    with caplog.at_level(logging.WARNING):
        run_finetune.main(other)
    assert "resuming from checkpoint" in caplog.text and "is complete" not in caplog.text


def test_overwrite_output_dir_removes_the_earlier_runs_diagnostics(tmp_path):
    """The earlier run's calibration, data check and label errors went on being read (`report`) as the new run's
    when the new run does not write them again (--data_check false, a streamed split, never label-errors), or is
    cut short before its calibration."""
    from hf_transfer.run.output_dir import _clear_earlier_run

    out = tmp_path / "run"
    earlier = ["calibration.json", "data_check.json", "data_check.html", "label_errors.json", "all_results.json",
               "test_results.json"]
    for name in earlier:
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text("{}")
    (out / "label-errors").mkdir()
    (out / "label-errors" / "folds.json").write_text("{}")
    (out / "notes.txt").write_text("the user's")
    _clear_earlier_run(out, keep=None)
    assert [name for name in earlier if (out / name).exists()] == []
    assert not (out / "label-errors").exists() and (out / "notes.txt").is_file()


def class_folders(root: Path, seed: int) -> None:
    """root/data/{train,test}/{red,green,blue}/*.png"""
    from helpers import colour_dataset

    for split, part in colour_dataset(n_per_class=6, seed=seed).items():
        for i, row in enumerate(part):
            folder = root / "data" / split / part.features["label"].names[row["label"]]
            folder.mkdir(parents=True, exist_ok=True)
            row["img"].save(folder / f"{i}.png")


@pytest.mark.slow
def test_a_run_records_its_folders_whole_and_is_the_same_run_from_any_working_folder(
        tiny_resnet, tmp_path, monkeypatch, caplog):
    first, second = tmp_path / "first", tmp_path / "second"
    class_folders(first, seed=0)
    class_folders(second, seed=1)  # the same relative paths, other images
    flags = ["--model_name_or_path", tiny_resnet, "--train_dir", "data/train", "--test_dir", "data/test",
             "--max_steps", "2", *quick_flags()]
    monkeypatch.chdir(first)
    results = run_finetune.main([*flags, "--output_dir", "runs/x"])
    saved = json.loads((first / "runs" / "x" / "run_args.json").read_text())
    assert saved["working_dir"] == str(first.resolve())
    assert saved["shaping"]["data.train_dir"] == str((first / "data" / "train").resolve())
    assert saved["shaping"]["model.model_name_or_path"] == str(Path(tiny_resnet).resolve())

    monkeypatch.chdir(second)
    run = str(first / "runs" / "x")
    # the same words from another folder name other data: not this run
    with pytest.raises(UserError, match=r"holds a finished run with other settings \(test_dir .*first/data/test -> "
                                        r".*second/data/test; train_dir .*first/data/train -> .*second/data/train\)"):
        run_finetune.main([*flags, "--output_dir", run])
    # the run's own folders named from here: the same run, reported as it is
    ours = [str(first / "data" / "train") if f == "data/train" else str(first / "data" / "test") if f == "data/test"
            else f for f in flags]
    with caplog.at_level(logging.WARNING):
        assert run_finetune.main([*ours, "--output_dir", run]) == json.loads((Path(run) / "all_results.json").read_text())
    assert "is complete" in caplog.text and results["test_accuracy"] is not None


@pytest.mark.slow
def test_a_run_recorded_before_folders_were_whole_is_compared_as_it_was(tiny_resnet, tmp_path, monkeypatch):
    """An older run_args.json (no working_dir, folders as typed, a setting of a later version missing) of a finished
    run: its own command, from its own folder, is still that run."""
    class_folders(tmp_path, seed=0)
    monkeypatch.chdir(tmp_path)
    flags = ["--model_name_or_path", tiny_resnet, "--train_dir", "data/train", "--output_dir", "runs/x",
             "--max_steps", "2", *quick_flags()]
    first = run_finetune.main(flags)
    path = tmp_path / "runs" / "x" / "run_args.json"
    saved = json.loads(path.read_text())
    saved.pop("working_dir")
    saved["shaping"]["data.train_dir"] = "data/train"
    saved["shaping"]["model.model_name_or_path"] = os.path.relpath(tiny_resnet, tmp_path)
    path.write_text(json.dumps(saved))
    assert run_finetune.main(flags) == first
    del saved["shaping"]["training.seed"]  # a setting the version that wrote the run did not have
    path.write_text(json.dumps(saved))
    with pytest.raises(UserError, match=r"seed \(not recorded by the version that wrote the run\) -> 42"):
        run_finetune.main(flags)


@pytest.mark.slow
def test_a_resumed_run_finds_its_best_checkpoint_from_another_working_folder(tiny_resnet, cifar_like, tmp_path,
                                                                             monkeypatch):
    """A run whose --output_dir was relative names its best checkpoint relative to where it was started; resumed
    from elsewhere at its last checkpoint (cut short after it), in its own folder or continued in another one, it
    still ends with its best weights."""
    from safetensors.torch import load_file

    monkeypatch.chdir(tmp_path)
    flags = ["--model_name_or_path", tiny_resnet, "--dataset_name", cifar_like, "--num_train_epochs", "1",
             "--save_strategy", "steps", "--save_steps", "2", "--eval_strategy", "steps", "--eval_steps", "2",
             "--save_total_limit", "5", "--calibrate", "false", *quick_flags()]  # the weights as chosen, not rescaled
    run_finetune.main([*flags, "--output_dir", "run"])
    for name in ("all_results.json", "model.safetensors"):
        (tmp_path / "run" / name).unlink()
    last = Path(last_complete_checkpoint(tmp_path / "run"))  # the end of the epoch: nothing is left to train
    state = json.loads((last / "trainer_state.json").read_text())
    assert state["best_model_checkpoint"] == f"run/checkpoint-{state['best_global_step']}"  # relative
    # the state of a run whose evaluation at step 2 was its best (which step is best depends on the numbers)
    state.update(best_global_step=2, best_model_checkpoint="run/checkpoint-2")
    (last / "trainer_state.json").write_text(json.dumps(state))
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    best = load_file(tmp_path / "run" / "checkpoint-2" / "model.safetensors")
    run_finetune.main([*flags, "--output_dir", str(tmp_path / "continued"), "--resume_from_checkpoint", str(last)])
    run_finetune.main([*flags, "--output_dir", str(tmp_path / "run")])
    for folder in ("continued", "run"):
        final = load_file(tmp_path / folder / "model.safetensors")
        assert all(torch.equal(final[k], best[k]) for k in best), folder


# ---------------------------------------------------------------- soak


@pytest.mark.slow
def test_back_to_back_runs_do_not_leak(tiny_resnet, cifar_teacher, cifar_like, tmp_path):
    process = psutil.Process()
    memory = []
    for i in range(3):
        run_distill.main(["--teacher_model_name_or_path", cifar_teacher, "--student_model_name_or_path", tiny_resnet,
                          "--dataset_name", cifar_like, "--output_dir", str(tmp_path / f"run{i}"),
                          "--num_train_epochs", "1", *quick_flags()])
        gc.collect()
        memory.append(process.memory_info().rss)
        assert not [o for o in gc.get_objects() if isinstance(o, TransferTrainer)]  # nothing keeps a trainer alive
    assert memory[2] - memory[1] < 40 * 2**20, [m / 2**20 for m in memory]


def test_resume_and_best_model_load_every_layer_of_a_vit(tiny_vit, cifar_like, tmp_path):
    """transformers 5 saves ViT weights under their original names; the Trainer's own loaders would skip them."""
    from safetensors import safe_open

    data = load_image_data(cifar_like)
    attach_transforms(data, "none")
    best = load_model(tiny_vit, data.label_names).model
    with torch.no_grad():
        for p in best.parameters():
            p.add_(torch.randn_like(p))
    best.save_pretrained(tmp_path / "checkpoint-1")
    with safe_open(str(tmp_path / "checkpoint-1" / "model.safetensors"), "pt") as f:
        assert set(f.keys()) != set(best.state_dict())  # saved under other names than the model's

    loaded = load_model(tiny_vit, data.label_names)
    args = TransferConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True,
                                     dataloader_num_workers=0)
    trainer = TransferTrainer(**trainer_kwargs(args, data, loaded))
    trainer.state.best_model_checkpoint = str(tmp_path / "checkpoint-1")
    trainer._load_best_model()
    expected = best.state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in trainer.model.state_dict().items())


@pytest.mark.slow
@pytest.mark.parametrize("extra", [
    ("--layer_decay", "0.8", "--lr_step_size", "1", "--label_smoothing_factor", "0.1", "--mixup", "0.4",
     "--cutmix", "1.0"),
    ("--freeze_backbone", "--backbone_lr_scale", "0.1"),
    ("--drop_path_rate", "0.2", "--augmentation", "basic", "--random_erasing", "0"),
], ids=["layer-decay-step-decay-smoothing-mixup-cutmix", "linear-probe-backbone-scale", "drop-path-crop-flip"])
def test_sigkill_with_the_transfer_strategies_resumes_bit_identical(tiny_resnet, cifar_like, tmp_path, extra):
    """docs/strategies.md: every strategy survives a kill and resume bit for bit (the rest are in the tests above).
    Stochastic depth and mixing draw from the RNG every step: the resumed run must restore it exactly; crops and
    flips are drawn from each image's (seed, epoch, row) and applied batched on the device."""
    reference = tmp_path / "reference"
    done = start(run_flags(tiny_resnet, cifar_like, reference, *extra), log=tmp_path / "reference.log")  # alongside
    out = tmp_path / "run"
    flags = run_flags(tiny_resnet, cifar_like, out, *extra)
    process = start(flags, sleep=0.3)
    wait_for(out / "checkpoint-4", process)
    process.kill()
    process.wait()
    assert done.wait(timeout=300) == 0, (tmp_path / "reference.log").read_text()[-3000:]
    again = start(flags)
    _, err = again.communicate(timeout=300)
    assert again.returncode == 0, err[-3000:]
    assert "resuming from checkpoint" in err
    assert_identical(reference, out)


@pytest.mark.slow
def test_a_run_never_writes_over_the_model_it_loads(tiny_resnet, cifar_like, tmp_path):
    """The refusal without --overwrite_output_dir said to pass it, and with it the weights, checkpoints and results
    the run was about to load were deleted first. Now refused in one line before anything is touched."""
    out = tmp_path / "run"
    run_finetune.main(short_run(tiny_resnet, cifar_like, out))
    before = files_of(out)
    cases = [(run_finetune.main, ["--model_name_or_path", str(out), "--do_train", "false"]),
             (run_finetune.main, ["--model_name_or_path", str(out / "checkpoint-2")]),
             (run_distill.main, ["--teacher_model_name_or_path", str(out), "--student_model_name_or_path", tiny_resnet])]
    for main, flags in cases:
        with pytest.raises(UserError, match=r"^--output_dir '.*run' holds the model the run loads \(--"):
            main([*flags, "--dataset_name", cifar_like, "--output_dir", str(out), "--overwrite_output_dir",
                  *quick_flags()])
        assert files_of(out) == before
