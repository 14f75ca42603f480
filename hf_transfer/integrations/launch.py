"""The launch: checks of the process count, devices and mixed precision, and of accelerate config files.

accelerate (torch DDP, FSDP, DeepSpeed underneath) is the distributed engine; this module
only refuses launches that would silently do the wrong thing, before any training starts.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path

import torch

from ..errors import UserError
from .compat import accelerate_launch_keys

CPU_COMMAND = "accelerate launch --config_file accelerate_configs/cpu.yaml run_finetune.py --use_cpu ..."


def check_launch(args, environ=os.environ, cuda_devices: int | None = None,
                 launcher: list[str] | None = None) -> None:
    """Refuse launches whose processes would not form the run the user asked for. `launcher`: the command line
    of the process that started this one (default: read from the system)."""
    cuda_devices = torch.cuda.device_count() if cuda_devices is None else cuda_devices
    started = int(environ.get("WORLD_SIZE", "1"))
    requested = requested_processes(launcher if launcher is not None else _parent_command_line())
    if started == 1 and requested and requested > 1:
        # accelerate's plain launcher starts one process whatever --num_processes says unless it is told how
        # to start several (--multi_gpu, a config file): without a GPU the user would get one quiet process.
        raise UserError(f"accelerate launch was asked for {requested} processes but started one; "
                        + (f"on a machine without a GPU use {CPU_COMMAND}" if not cuda_devices else
                           "add --multi_gpu (or use accelerate_configs/multi_gpu.yaml)"))
    local = int(environ.get("LOCAL_WORLD_SIZE", str(started)))
    on_cpu = args.use_cpu or environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    if cuda_devices and not on_cpu and local > cuda_devices:
        raise UserError(f"{local} processes were started on this machine but it has {cuda_devices} GPU(s); "
                        f"set num_processes to at most {cuda_devices} per machine")
    if started > 1 and args.world_size == 1:
        if asked_sharding(args, environ) == "FSDP":
            raise sharding_on_cpu("FSDP", f"{started} unrelated processes")
        raise UserError(
            f"{started} processes were started but they do not form one distributed run (no GPU, and CPU "
            f"processes were not requested), so each would train alone; on a machine without a GPU add "
            f"--use_cpu (or set ACCELERATE_USE_CPU=1): {CPU_COMMAND}"
        )
    mixed = environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if (args.fp16 or mixed == "fp16") and (on_cpu or not cuda_devices):
        raise UserError("fp16 mixed precision needs a GPU; on the CPU use --bf16 (or bf16.yaml), or no mixed precision")


def asked_sharding(args, environ=os.environ) -> str | None:
    """"FSDP" or "DeepSpeed" when the launch (accelerate's environment, or the Trainer's own flags) asks for it."""
    if environ.get("ACCELERATE_USE_FSDP", "").lower() == "true" or args.fsdp:
        return "FSDP"
    if environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true" or args.deepspeed:
        return "DeepSpeed"
    return None


def sharding_on_cpu(name: str, got: str) -> UserError:
    if name == "DeepSpeed":  # DeepSpeed has a CPU accelerator, which the processes use when told to
        return UserError(f"the launch asks for DeepSpeed but {got} would run instead: on a machine without a GPU "
                         f"add --use_cpu (DeepSpeed's CPU accelerator), or use {CPU_COMMAND}")
    return UserError(f"the launch asks for FSDP but {got} would run instead: accelerate runs FSDP on GPUs only; "
                     f"run it where each process has a GPU, or for CPU processes use {CPU_COMMAND}")


def check_sharding(args, fsdp: bool, deepspeed: bool, processes: int, environ=os.environ) -> None:
    """Refuse a run whose accelerator did not set up the FSDP or DeepSpeed its launch asked for (`fsdp`, `deepspeed`,
    `processes`: what the Trainer's accelerator has). accelerate 1.x selects both for GPUs (and other accelerators)
    only: on the CPU an FSDP launch would train as plain DDP, with nothing said."""
    name = asked_sharding(args, environ)
    if name is not None and not (fsdp if name == "FSDP" else deepspeed):
        raise sharding_on_cpu(name, "plain DDP" if processes > 1 else "one process alone")
    if fsdp and args.ema_decay:
        raise UserError("--ema_decay does not work with FSDP (the average of sharded weights is not supported): "
                        "drop --ema_decay, or use DDP or DeepSpeed ZeRO-2, whose processes hold the whole weights")


def requested_processes(command: list[str]) -> int | None:
    """The process count an `accelerate launch` command line asks for (its --num_processes, or its config
    file's), or None when `command` is not one."""
    if not command:
        return None
    words = [Path(w).name for w in command]
    if "accelerate.commands.launch" in words:
        start = words.index("accelerate.commands.launch") + 1
    elif "launch" in words and any(w.startswith("accelerate") for w in words[:words.index("launch")]):
        start = words.index("launch") + 1
    else:
        return None
    from accelerate.commands.config.config_args import default_config_file, load_config_from_file
    from accelerate.commands.launch import launch_command_parser

    try:
        launch, _ = launch_command_parser().parse_known_args(command[start:])
        if launch.num_processes is not None:
            return int(launch.num_processes)
        config = launch.config_file or (default_config_file if Path(default_config_file).is_file() else None)
        return int(load_config_from_file(config).num_processes) if config else None
    except (SystemExit, ValueError, TypeError, OSError):  # not a command we can read: no opinion
        return None


def _parent_command_line() -> list[str]:
    try:  # Linux; elsewhere no opinion
        raw = Path(f"/proc/{os.getppid()}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def _check_settings(path: Path) -> None:
    """What accelerate's loader meets with a traceback or a hint to upgrade: a file that is not YAML (or JSON), one
    that is not a mapping of settings, a misspelt setting (said with the closest one)."""
    import yaml
    from accelerate.commands.config.config_args import ClusterConfig

    try:
        settings = yaml.safe_load(path.read_text())  # JSON is YAML too
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise UserError(f"accelerate config '{path}' is not valid YAML: {' '.join(str(exc).split())}") from exc
    if not isinstance(settings, dict):
        held = "nothing" if settings is None else f"a {type(settings).__name__}"
        raise UserError(f"accelerate config '{path}' holds {held}, not settings (key: value lines, as in "
                        "accelerate_configs/)")
    if str(settings.get("compute_environment", "")).upper() == "AMAZON_SAGEMAKER":
        return  # another set of settings, which accelerate checks itself
    known = set(ClusterConfig.__dataclass_fields__)
    for key in sorted(set(settings) - known):
        close = difflib.get_close_matches(str(key), known, n=1, cutoff=0.75)
        raise UserError(f"accelerate config '{path}': unknown setting '{key}'" +
                        (f"; did you mean '{close[0]}'?" if close else ""))


def check_config_file(path: str | Path, cuda_devices: int | None = None) -> dict:
    """Load an accelerate config with accelerate's own loader and check what it leaves unchecked.

    Returns a summary. Raises UserError for a missing file, an unknown key (top-level or inside
    fsdp_config/deepspeed_config, which accelerate would silently ignore), more processes per
    machine than GPUs, or fp16 without a GPU.
    """
    from accelerate.commands.config.config_args import load_config_from_file

    path = Path(path)
    if path.is_dir():
        raise UserError(f"accelerate config '{path}' is a folder; pass one of its .yaml files")
    if not path.is_file():
        raise UserError(f"accelerate config '{path}' does not exist; the project's configs are in accelerate_configs/")
    _check_settings(path)
    try:
        config = load_config_from_file(str(path))
    except (ValueError, TypeError) as exc:
        raise UserError(f"accelerate config '{path}': {str(exc).splitlines()[0]}") from exc
    known = accelerate_launch_keys()
    for section in ("fsdp_config", "deepspeed_config"):
        unknown = sorted(set(getattr(config, section) or {}) - known)
        if unknown:
            raise UserError(f"accelerate config '{path}': unknown keys in {section}: {', '.join(unknown)}")
    cuda_devices = torch.cuda.device_count() if cuda_devices is None else cuda_devices
    distributed = str(config.distributed_type).split(".")[-1]
    per_machine = max(1, config.num_processes // max(1, config.num_machines))
    if cuda_devices and per_machine > cuda_devices:
        raise UserError(f"accelerate config '{path}' starts {per_machine} processes per machine but this machine has "
                        f"{cuda_devices} GPU(s); lower num_processes")
    if config.mixed_precision == "fp16" and not cuda_devices:
        raise UserError(f"accelerate config '{path}' asks for fp16, which needs a GPU; this machine has none")
    summary = {"file": str(path), "distributed_type": distributed, "num_processes": config.num_processes,
               "num_machines": config.num_machines, "mixed_precision": config.mixed_precision}
    # GPU ids, FSDP and DeepSpeed mean GPUs; cpu.yaml is MULTI_GPU for torchrun's sake but names none.
    wants_gpu = distributed in ("FSDP", "DEEPSPEED") or getattr(config, "gpu_ids", None) not in (None, "")
    if distributed == "DEEPSPEED" and not cuda_devices:
        summary["note"] = ("this machine has no GPU: add --use_cpu to the script's flags and DeepSpeed runs on its "
                           "CPU accelerator (fp32 or bf16)")
    elif wants_gpu and not cuda_devices and not getattr(config, "use_cpu", False):
        # Checking a cluster's config on a laptop is fine; launching it here is not.
        summary["note"] = (f"this machine has no GPU: the config runs where each process has one; here use "
                           f"{CPU_COMMAND.split(' run_finetune')[0]}")
    return summary
