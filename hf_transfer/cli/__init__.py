"""The commands, one `main(argv)` each, read top to bottom: run_finetune.py, run_distill.py, `python -m hf_transfer`.

This package's own module imports nothing heavy: `cli` checks the command line before torch and transformers
are imported (command_line.py), so that a mistyped flag is refused at once.
"""

from __future__ import annotations

import importlib
import sys


def cli(command: str) -> None:
    """run_finetune.py (`finetune`) and run_distill.py (`distill`): the flags checked, then the command's `main`,
    its errors one line (errors.run_cli)."""
    from ..errors import run_cli, setup_logging
    from .command_line import check_command_line

    check_command_line(command, sys.argv[1:])
    main = importlib.import_module(f"{__name__}.{command}").main
    setup_logging()
    before_running(trains=True)
    sys.exit(run_cli(main))


def before_running(trains: bool) -> None:
    """Once per command, after its flags were checked: the one line about library versions the workarounds were
    not checked with (main process only), and, for a command that `trains`, no DeepSpeed line in runs without
    DeepSpeed (compat.py)."""
    from ..integrations.compat import tell_deepspeed_the_accelerator, warn_untested_versions

    warn_untested_versions()
    if trains:
        tell_deepspeed_the_accelerator()
