"""User-facing errors: one readable line and a non-zero exit, never a traceback.

Everything a user can get wrong (a flag, a path, a data set, the network) is raised as
`UserError` with a message that says what is wrong and what to do. The entry scripts
run `main` through `run_cli`, which prints that message and exits with status 2.
"""

from __future__ import annotations

import argparse
import difflib
import logging
import os
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path


class UserError(Exception):
    """A mistake in the input (flags, data, paths, network) that the user can fix."""


class CorruptImageError(UserError):
    """An image (or label) that cannot be used; the message names the split and the row."""


class Preempted(Exception):
    """The run was told to stop (SIGTERM) and saved a checkpoint to resume from."""


# What to do offline, for each thing that can fail to download: only what is missing is named.
OFFLINE_HINTS = {
    "data set": "offline, use a local directory, --dataset_name digits, or HF_HUB_OFFLINE=1 with the data set cached",
    "model": "offline, use a local checkpoint directory, --from_scratch (a preset's architecture needs no download), "
             "or HF_HUB_OFFLINE=1 with the weights cached",
    "teacher": "offline, use a local directory (an output of run_finetune.py), or HF_HUB_OFFLINE=1 with the "
               "teacher cached",
}
OFFLINE_HINTS["model config"] = OFFLINE_HINTS["model"]
OFFLINE_HINTS["teacher config"] = OFFLINE_HINTS["teacher"]


def wrap_load_error(what: str, name: str, exc: BaseException) -> UserError:
    """Turn a loader's exception (network, missing repo, missing file) into one line."""
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    hint = OFFLINE_HINTS.get(what)
    return UserError(f"could not load {what} '{name}': {reason}" + (f" ({hint})" if hint else ""))


def check_local_path(flag: str, name: str) -> None:
    """A name the user means as a local path must be a directory, refused before any Hub call.

    Local-looking: it starts like a path (./ ../ / ~), or its first component is a folder here
    (`runs/nope` where `runs/` exists). Anything else may be a Hub id (`user/name`).
    """
    path = Path(name).expanduser()
    parts = Path(name).parts
    local = name.startswith((".", "/", "~")) or (len(parts) > 1 and Path(parts[0]).is_dir())
    if local and not path.is_dir():
        raise UserError(f"{flag} '{name}' is not a directory" + (" (it is a file)" if path.exists() else ""))


def one_line(exc: BaseException) -> str:
    """The message of `exc` on one line; for an error re-raised from a DataLoader worker (whose
    message carries the worker's traceback), the original message, which is its last line."""
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    if len(lines) > 1 and "Original Traceback" in str(exc):
        return re.sub(r"^[\w.]+: ", "", lines[-1])  # "module.SomeError: message" -> "message"
    return " ".join(lines)


class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse whose refusals are one line, `error: ... (see --help)` and exit 2 (argparse prints its whole usage
    first), with a "did you mean" for a mistyped flag, choice or subcommand. The training scripts' parser
    (config/flags.py) and the tools' (cli/tools.py) are this one."""

    def error(self, message: str):
        self.exit(2, f"error: {did_you_mean(message, self._actions)} (see --help)\n")


def did_you_mean(message: str, actions: Sequence[argparse.Action]) -> str:
    """argparse's `message` with the closest name `actions` know for what it refuses: an unrecognized flag, or
    the value of an invalid choice (a subcommand is one)."""
    if message.startswith("unrecognized arguments"):
        options = [o for action in actions for o in action.option_strings if o.startswith("--")]
        for word in message.split():
            close = difflib.get_close_matches(word.split("=")[0], options, n=1, cutoff=0.75) if word[:2] == "--" else []
            if close:
                return f"{message}; did you mean {close[0]}?"
    # "argument --backend: invalid choice: 'optunaa' (choose from ...)": the value is repr()'d by argparse
    choice = re.match(r"argument (\S+): invalid choice: (['\"])(.*?)\2", message)
    if choice:
        name, value = choice.group(1), choice.group(3)
        choices = [str(c) for action in actions if action.choices and name in _names(action) for c in action.choices]
        close = difflib.get_close_matches(value, choices, n=1, cutoff=0.75)
        if close:
            return f"{message}; did you mean {close[0]}?"
    return message


def _names(action: argparse.Action) -> set[str]:
    """The names argparse gives an action in its messages: its flags joined by '/', its metavar or its dest."""
    return {"/".join(action.option_strings), str(action.metavar), str(action.dest)}


def setup_logging() -> None:
    """INFO lines from the main process only: every process of a multi-process run logs the same steps. Each
    line once: huggingface_hub prints its own through its own handler, so it does not also pass them on."""
    from huggingface_hub.utils import logging as hub_logging

    main_process = int(os.environ.get("RANK", "0")) == 0
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        level=logging.INFO if main_process else logging.WARNING)
    hub_logging.disable_propagation()


def run_cli(main: Callable[[Sequence[str] | None], object], argv: Sequence[str] | None = None) -> int:
    """Run `main(argv)`; a `UserError` becomes `error: <message>` on stderr and exit code 2."""
    try:
        main(argv)
    except UserError as exc:
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return 2
    except Preempted as exc:
        print(f"stopped: {exc}", file=sys.stderr)
        return 143  # 128 + SIGTERM, as a process ended by the signal would report
    except KeyboardInterrupt:
        print("interrupted: run the same command again to resume from the newest checkpoint", file=sys.stderr)
        return 130
    return 0
