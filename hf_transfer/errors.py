"""User-facing errors: one readable line and a non-zero exit, never a traceback.

Everything a user can get wrong (a flag, a path, a data set, the network) is raised as
`UserError` with a message that says what is wrong and what to do. The entry scripts
run `main` through `run_cli`, which prints that message and exits with status 2.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable, Sequence


class UserError(Exception):
    """A mistake in the input (flags, data, paths, network) that the user can fix."""


class CorruptImageError(UserError):
    """An image (or label) that cannot be used; the message names the split and the row."""


class Preempted(Exception):
    """The run was told to stop (SIGTERM) and saved a checkpoint to resume from."""


def offline_hint() -> str:
    return (
        "to run offline use a local directory, a filled cache with HF_HUB_OFFLINE=1, "
        "or --dataset_name digits / --from_scratch"
    )


def wrap_load_error(what: str, name: str, exc: BaseException) -> UserError:
    """Turn a loader's exception (network, missing repo, missing file) into one line."""
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return UserError(f"could not load {what} '{name}': {reason} ({offline_hint()})")


def one_line(exc: BaseException) -> str:
    """The message of `exc` on one line; for an error re-raised from a DataLoader worker (whose
    message carries the worker's traceback), the original message, which is its last line."""
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    if len(lines) > 1 and "Original Traceback" in str(exc):
        return re.sub(r"^[\w.]+: ", "", lines[-1])  # "module.SomeError: message" -> "message"
    return " ".join(lines)


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
        print("interrupted", file=sys.stderr)
        return 130
    return 0
