"""A newcomer's first hour: every message says what to do, --help tells the truth, output is polished.

(The README's walkthrough runs in test_readme.py; reruns of finished and partial runs in
test_finetune.py.)
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import quick_flags

import run_distill
import run_finetune
from hf_transfer.cli.tools import main as tools
from hf_transfer.config.flags import (
    ArgumentParser,
    DataArguments,
    DistillationDataArguments,
    ModelArguments,
    StudentArguments,
)
from hf_transfer.errors import UserError, run_cli
from hf_transfer.integrations.launch import check_config_file
from hf_transfer.trainers.distillation_config import DistillationConfig
from hf_transfer.trainers.transfer_config import TransferConfig

ROOT = Path(__file__).resolve().parents[1]


def cli(main, argv, capsys) -> tuple[int, list[str]]:
    try:
        code = run_cli(main, argv)
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    return code, capsys.readouterr().err.strip().splitlines()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the message is for machines without a GPU")
def test_the_readme_headline_on_a_machine_without_a_gpu_names_the_fix(tmp_path, capsys):
    code, err = cli(run_finetune.main, ["--model", "resnet50", "--bf16", "--output_dir", str(tmp_path / "o")], capsys)
    assert code == 2 and err == ["error: --bf16 needs a GPU and this machine has none: add --use_cpu for bfloat16 "
                                 "autocast on the CPU, or drop --bf16"]
    assert not (tmp_path / "o").exists()


def test_a_mistyped_local_path_is_not_sent_to_the_hub(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()  # runs/ exists, runs/nope does not: a typo, not a Hub id
    monkeypatch.setattr("transformers.AutoConfig.from_pretrained",
                        lambda *a, **k: pytest.fail("asked the Hub for a local path"))
    code, err = cli(run_distill.main, ["--dataset_name", "digits", "--teacher_model_name_or_path", "runs/nope"],
                    capsys)
    assert code == 2 and err == ["error: --teacher_model_name_or_path 'runs/nope' is not a directory"]
    code, err = cli(run_finetune.main, ["--dataset_name", "digits", "--model_name_or_path", "./missing"], capsys)
    assert code == 2 and err == ["error: --model_name_or_path './missing' is not a directory"]


def test_the_offline_hint_names_only_what_is_missing(tmp_path):
    with pytest.raises(UserError) as data_error:
        run_finetune.main(["--dataset_name", "someone/not-cached", "--model", "resnet18", "--from_scratch",
                           "--output_dir", str(tmp_path / "a")])
    assert "--dataset_name digits" in str(data_error.value) and "--from_scratch" not in str(data_error.value)
    with pytest.raises(UserError) as model_error:
        run_finetune.main(["--dataset_name", "digits", "--model", "resnet18", "--output_dir", str(tmp_path / "b")])
    assert "--from_scratch" in str(model_error.value) and "--dataset_name digits" not in str(model_error.value)


def test_a_refused_start_leaves_no_directory_behind(tmp_path):
    with pytest.raises(UserError, match="--image_column 'pixels' does not exist"):
        run_finetune.main(["--dataset_name", "digits", "--model", "resnet18", "--from_scratch", "--image_column",
                           "pixels", "--output_dir", str(tmp_path / "deep" / "o")])
    assert not (tmp_path / "deep").exists()


def test_push_without_a_token_says_so(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    out.mkdir()
    for name in ("config.json", "model.safetensors", "preprocessor_config.json"):
        (out / name).write_text("{}")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr("hf_transfer.integrations.hub.get_token", lambda: None)
    code, err = cli(tools, ["push", str(out), "--hub_model_id", "me/run"], capsys)
    assert code == 2 and err == ["error: push needs a Hugging Face token with write access: set HF_TOKEN or run "
                                 "`hf auth login`"]


def test_ctrl_c_says_the_same_command_resumes(capsys):
    def interrupted(argv):
        raise KeyboardInterrupt

    assert run_cli(interrupted, []) == 130
    assert capsys.readouterr().err.strip() == ("interrupted: run the same command again to resume from the newest "
                                               "checkpoint")


def test_a_mistyped_flag_gets_the_closest_one(capsys):
    code, err = cli(run_finetune.main, ["--lerning_rate", "0.1"], capsys)
    assert code == 2 and err == ["error: unrecognized arguments: --lerning_rate 0.1; did you mean --learning_rate? "
                                 "(see --help)"]


def test_help_shows_the_defaults_a_run_really_uses():
    finetune = ArgumentParser((ModelArguments, DataArguments, TransferConfig)).format_help()
    flat = " ".join(finetune.split())
    for text in ("(default: 0.01 for CNNs, 5e-05 for ViTs)", "(default: sgd for CNNs, adamw_torch for ViTs)",
                 "(default: cosine for CNNs, cosine for ViTs)", "at most a tenth of the training set",
                 "(default runs/<model>-<data set>)"):
        assert text in flat, text
    assert "galore" not in flat  # only the optimizers the project can build are offered

    distill = " ".join(ArgumentParser((StudentArguments, DataArguments, DistillationConfig)).format_help().split())
    assert "resnet18: timm/resnet18.a1_in1k" in distill and "vit-tiny" in distill  # the student presets
    assert "(default runs/<student>-<data set>-distilled)" in distill
    usage = distill[:distill.index("options:")]
    assert "--teacher_model_name_or_path TEACHER_MODEL_NAME_OR_PATH" in usage
    assert "[--teacher_model_name_or_path" not in usage  # required, not optional


def test_card_optimizer_row_and_enough_loss_points_for_a_short_run(tiny_resnet, cifar_like, tmp_path):
    """Logging by fraction of the run (0.02) draws a curve even for 18 steps; the card names the optimizer plainly."""
    flags = [f for f in quick_flags() if f not in ("--logging_steps", "5")]
    out = tmp_path / "o"
    run_finetune.main(["--model_name_or_path", tiny_resnet, "--dataset_name", cifar_like, "--output_dir", str(out),
                       "--num_train_epochs", "4", *flags])
    losses = [h for h in json.loads((out / "trainer_state.json").read_text())["log_history"] if "loss" in h]
    assert len(losses) >= 10
    assert "| optimizer | sgd (momentum=0.9,nesterov=True) |" in (out / "README.md").read_text()


def test_ddp_does_not_search_for_unused_parameters_unless_some_are_frozen():
    assert TransferConfig(output_dir="x").ddp_find_unused_parameters is False
    assert TransferConfig(output_dir="x", freeze_backbone=True).ddp_find_unused_parameters is True
    assert TransferConfig(output_dir="x", ddp_find_unused_parameters=True).ddp_find_unused_parameters is True


def test_only_the_main_process_logs_info():
    code = ("from hf_transfer.errors import setup_logging; import logging; setup_logging(); "
            "print(logging.getLogger().getEffectiveLevel())")
    levels = [subprocess.run([sys.executable, "-c", code], env={"RANK": rank, "PYTHONPATH": str(ROOT)},
                             capture_output=True, text=True, check=True).stdout.strip() for rank in ("0", "1")]
    assert levels == ["20", "30"]  # INFO on rank 0, WARNING elsewhere


def test_check_config_says_when_the_machine_lacks_the_gpus_it_needs():
    assert "no GPU" in check_config_file(ROOT / "accelerate_configs" / "multi_gpu.yaml", cuda_devices=0)["note"]
    assert "note" not in check_config_file(ROOT / "accelerate_configs" / "cpu.yaml", cuda_devices=0)
    # FSDP needs GPUs through accelerate; DeepSpeed also runs on the CPU (tests/test_scale_out.py), with --use_cpu
    assert "cpu.yaml" in check_config_file(ROOT / "accelerate_configs" / "fsdp.yaml", cuda_devices=0)["note"]
    assert "add --use_cpu" in check_config_file(ROOT / "accelerate_configs" / "deepspeed_zero2.yaml", cuda_devices=0)["note"]
    assert "note" not in check_config_file(ROOT / "accelerate_configs" / "multi_gpu.yaml", cuda_devices=8)


def test_reports_are_not_committed_by_accident():
    assert "reports/" in (ROOT / ".gitignore").read_text().split()


@pytest.fixture
def unreachable_hub(monkeypatch):
    """A machine where the Hub cannot be reached and HF_HUB_OFFLINE is not set (what a laptop on a train has)."""
    import datasets.config
    import huggingface_hub.utils
    from huggingface_hub import constants

    from hf_transfer.integrations import hub

    class NoRoute:
        def head(self, *args, **kwargs):
            raise OSError("[Errno -2] Name or service not known")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # restored by monkeypatch after go_offline() sets it
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", False)
    monkeypatch.setattr(hub, "_reachability_known", False)
    monkeypatch.setattr(huggingface_hub.utils, "get_session", lambda: NoRoute())


@pytest.mark.parametrize("flag", ["--model_name_or_path", "--teacher_model_name_or_path"])
def test_an_unreachable_hub_is_one_line_within_seconds_not_a_retry_storm(unreachable_hub, flag, tmp_path, caplog):
    import logging
    import time

    script = run_finetune if flag == "--model_name_or_path" else run_distill
    extra = [] if script is run_finetune else ["--student", "resnet18", "--from_scratch"]
    start = time.perf_counter()
    with caplog.at_level(logging.INFO), pytest.raises(UserError, match="could not load .*'someone/no-such-model'"):
        script.main([flag, "someone/no-such-model", "--dataset_name", "digits", "--output_dir", str(tmp_path / "o"),
                     *extra])
    assert time.perf_counter() - start < 20  # the retries alone took 31 s
    told = [r.message for r in caplog.records if "cannot be reached" in r.message]
    assert len(told) == 1 and "using cached files only, as with HF_HUB_OFFLINE=1" in told[0]
    assert not any("Retrying" in r.message for r in caplog.records)


def test_huggingface_hub_lines_are_printed_once():
    import logging

    from hf_transfer.errors import setup_logging

    setup_logging()
    assert logging.getLogger("huggingface_hub").propagate is False  # its own handler prints them; not root's too


@pytest.mark.slow
def test_a_two_process_launch_that_starts_one_is_refused_and_accelerate_q_adds_no_traceback(tmp_path):
    def launch(*flags):
        return subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "-q", *flags,
                               str(ROOT / "run_finetune.py"), "--dataset_name", "digits", "--model", "resnet18",
                               "--from_scratch", "--max_steps", "1", "--output_dir", str(tmp_path / "o")],
                              capture_output=True, text=True, timeout=300, cwd=tmp_path,
                              env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})

    proc = launch("--num_processes", "2")
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: accelerate launch was asked for 2 processes but started one; on a machine without a GPU use "
        "accelerate launch --config_file accelerate_configs/cpu.yaml run_finetune.py --use_cpu ...")
    assert "Traceback" not in proc.stderr and not (tmp_path / "o").exists()


# ---------------------------------------------------------------- the command line, checked before the heavy imports

HEAVY = {"torch", "transformers", "datasets", "timm", "accelerate"}
DISTILL_TYPES = (StudentArguments, DistillationConfig, DistillationDataArguments)  # parse_arguments' order


def own_flags(command: str) -> set[str]:
    """The flags the project's dataclasses define (the rest are transformers' TrainingArguments)."""
    import dataclasses

    from transformers import TrainingArguments

    types = (ModelArguments, DataArguments, TransferConfig) if command == "finetune" else DISTILL_TYPES
    theirs = {f.name for f in dataclasses.fields(TrainingArguments)}
    return {f"--{f.name}" for kind in types for f in dataclasses.fields(kind) if f.name not in theirs}


def test_the_flags_checked_before_the_imports_are_the_parsers_own():
    """command_line_flags.py is generated from the real parsers: stale, it would refuse a flag they take."""
    from hf_transfer.cli import command_line
    from hf_transfer.cli import command_line_flags as stored

    if stored.TRANSFORMERS == command_line._installed("transformers"):
        assert (ROOT / "hf_transfer" / "cli" / "command_line_flags.py").read_text() == command_line.generate(), (
            "stale: run python -m hf_transfer.cli.command_line")
    for command in command_line.COMMANDS:  # with any transformers: the project's own flags
        own = own_flags(command)
        listed = [repr(f) for f in [*stored.COMMON, *stored.ONLY[command]] if f[0][0] in own]
        real = [repr(f) for f in command_line.spec_of(command_line.real_parser(command)) if f[0][0] in own]
        assert sorted(listed) == sorted(real) and len(real) > 30, command


@pytest.mark.parametrize("command, argv", [
    ("finetune", ["--lerning_rate", "0.1"]),
    ("finetune", ["--dataset_name", "digits", "--per_device_train_bat", "8"]),
    ("finetune", ["--optim", "sgdd"]),
    ("finetune", ["--lr_scheduler_type=cosin"]),
    ("finetune", ["--max_steps", "ten"]),
    ("finetune", ["--learning_rate"]),
    ("distill", ["--teacher_model_name_or_path", "t", "--alpah", "0.5"]),
    ("distill", ["--student", "resnet18"]),
])
def test_the_early_check_refuses_exactly_what_the_parser_refuses(command, argv, capsys):
    from hf_transfer.cli.command_line import check_command_line
    from hf_transfer.config.run_config import parse_arguments

    with pytest.raises(SystemExit) as early:
        check_command_line(command, argv)
    early_err = capsys.readouterr().err
    with pytest.raises(SystemExit) as late:
        parse_arguments(argv, *(() if command == "finetune" else DISTILL_TYPES))
    assert early.value.code == late.value.code == 2
    assert early_err == capsys.readouterr().err and early_err.count("\n") == 1 and early_err.startswith("error: ")


def test_the_early_check_lets_every_documented_command_through():
    from test_readme import REAL_WEIGHTS, walkthrough

    from hf_transfer.cli.command_line import check_command_line
    from hf_transfer.config.run_config import parse_arguments

    commands = [argv for argv in walkthrough() + walkthrough(REAL_WEIGHTS) if argv[1].startswith("run_")]
    assert len(commands) >= 4
    for argv in commands:
        check_command_line(argv[1].removeprefix("run_").removesuffix(".py"), argv[2:])
    more = [("finetune", ["--dataset_name", "digits", *quick_flags(), "--do_train=false", "--no_load_best_model_at_end",
                          "--report_to", "none", "--lr_scheduler_kwargs", '{"min_lr": 0.1}', "--max_steps", "-1"]),
            ("distill", ["--teacher_model_name_or_path", "t", "--student", "resnet18", "--alpha", "0.9"])]
    for command, argv in more:
        check_command_line(command, argv)
        parse_arguments(argv, *(() if command == "finetune" else DISTILL_TYPES))  # which the parser takes too


def fast_root(tmp_path: Path) -> Path:
    """The project, with its flag list for the transformers installed (a copy, regenerated, when it was read from
    another one: then the commands read the flags from the parser, after the imports, by design)."""
    import shutil

    from hf_transfer.cli import command_line
    from hf_transfer.cli import command_line_flags as stored

    if stored.TRANSFORMERS == command_line._installed("transformers"):
        return ROOT
    shutil.copytree(ROOT / "hf_transfer", tmp_path / "hf_transfer")
    (tmp_path / "hf_transfer" / "cli" / "command_line_flags.py").write_text(command_line.generate())
    for script in ("run_finetune.py", "run_distill.py"):
        shutil.copy(ROOT / script, tmp_path / script)
    return tmp_path


@pytest.mark.parametrize("argv, message", [
    (["run_finetune.py", "--learning_rat", "0.1"], "did you mean --learning_rate?"),
    (["run_finetune.py", "--lr_scheduler_type", "cosin"], "did you mean cosine?"),
    (["run_distill.py", "--teacher_model_name_or_path", "t", "--alpah", "0.5"], "did you mean --alpha?"),
    (["-m", "hf_transfer", "search", "--n_trial", "3"], "did you mean --n_trials?"),
])
def test_a_typo_is_refused_before_torch_is_imported(argv, message, tmp_path):
    root = fast_root(tmp_path)
    proc = subprocess.run([sys.executable, "-X", "importtime", *argv], cwd=root, capture_output=True, text=True,
                          timeout=120, env={**__import__("os").environ, "PYTHONPATH": str(root)})
    imported = {line.split("|")[-1].strip().split(".")[0] for line in proc.stderr.splitlines()
                if line.startswith("import time:")}
    said = [line for line in proc.stderr.splitlines() if not line.startswith("import time:")]
    assert proc.returncode == 2 and len(said) == 1 and said[0].startswith("error: ") and message in said[0], said
    assert not HEAVY & imported, HEAVY & imported


@pytest.mark.slow
def test_a_command_says_once_which_library_versions_were_not_checked(tmp_path):
    """The line comes once, after the flags were checked (a typo alone gives only its error), never per import."""
    code = ("import runpy, sys; from importlib.metadata import version; from hf_transfer.integrations import compat; "
            "compat.version = lambda name: '99.0' if name == 'accelerate' else version(name); "
            "sys.argv = ['run_finetune.py', *sys.argv[1:]]; runpy.run_path('run_finetune.py', run_name='__main__')")
    env = {k: v for k, v in __import__("os").environ.items() if k != "HF_TRANSFER_NO_VERSION_WARNING"}

    def stderr(*flags):
        proc = subprocess.run([sys.executable, "-c", code, *flags], cwd=ROOT, capture_output=True, text=True,
                              timeout=300, env={**env, "PYTHONPATH": str(ROOT)})
        assert proc.returncode == 2
        return proc.stderr.strip().splitlines()

    assert stderr("--learning_rat", "0.1") == [
        "error: unrecognized arguments: --learning_rat 0.1; did you mean --learning_rate? (see --help)"]
    lines = stderr("--dataset_name", "digits", "--model_name_or_path", "./missing", "--output_dir", str(tmp_path))
    assert len(lines) == 2 and lines[1] == "error: --model_name_or_path './missing' is not a directory", lines
    assert "WARNING hf_transfer.integrations.compat: library versions the project's workarounds were not checked with: " in lines[0]
    assert "accelerate 99.0 (checked 1.2 to " in lines[0] and lines[0].endswith(
        "python -m pytest tests/test_compat.py says which workaround no longer holds")


# ---------------------------------------------------------------- what a run prints


def test_a_new_head_is_one_line_and_a_timm_checkpoint_loads_without_the_libraries_warnings(tiny_resnet, tmp_path,
                                                                                          caplog):
    """No weight table for the head a run replaces anyway (the project's line says it), no "torchvision backend is
    not available" for a timm folder without a processor; a table for weights that really did not load."""
    import logging
    import shutil

    from safetensors.torch import load_file, save_file

    from hf_transfer.models.loading import load_model

    logging.Logger.warning_once.cache_clear()  # transformers says some things once per process
    said = []
    handler = logging.Handler()
    handler.emit = lambda record: said.append(record.getMessage())
    logging.getLogger("transformers").addHandler(handler)
    try:
        with caplog.at_level(logging.INFO, logger="hf_transfer"):
            load_model(tiny_resnet, ["a", "b", "c", "d", "e"])
        assert said == [] and "new classification head for 5 labels (checkpoint had 3)" in caplog.text
        broken = Path(shutil.copytree(tiny_resnet, tmp_path / "broken"))
        weights = load_file(broken / "model.safetensors")
        del weights[next(k for k in weights if "layer1" in k)]  # a backbone weight the checkpoint lacks
        save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
        load_model(str(broken), ["a", "b", "c", "d", "e"])
        assert len(said) == 1 and "LOAD REPORT" in said[0] and "MISSING" in said[0]
    finally:
        logging.getLogger("transformers").removeHandler(handler)


@pytest.mark.slow
def test_a_run_from_a_timm_checkpoint_prints_none_of_the_libraries_noise(tiny_resnet, tmp_path):
    """What a run on a machine without a GPU printed besides its own lines: DeepSpeed's accelerator guess (accelerate
    imports deepspeed in every Trainer), transformers' backend fallback and its table of the replaced head."""
    proc = subprocess.run([sys.executable, str(ROOT / "run_finetune.py"), "--model_name_or_path", tiny_resnet,
                           "--dataset_name", "digits", "--max_train_samples", "40", "--max_eval_samples", "20",
                           "--max_steps", "2", "--output_dir", str(tmp_path / "o"), *quick_flags()],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    printed = proc.stdout + proc.stderr
    assert proc.returncode == 0, printed[-3000:]
    assert "new classification head for 10 labels (checkpoint had 3)" in printed
    for noise in ("Setting accelerator to CPU", "backend is not available", "LOAD REPORT", "Traceback"):
        assert noise not in printed, noise
