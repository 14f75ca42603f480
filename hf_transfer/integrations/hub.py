"""Pushing an output directory to the Hugging Face Hub, at the end of a run or later.

What goes up (docs/hub-tracking-report.md has it as a table, which the tests check):

- The final push (`push_output_dir`: the end of every run with --push_to_hub, whatever its
  --hub_strategy, and `python -m hf_transfer push`): the output directory as the run left it, the
  model (safetensors, config with the label names), the image processor, the model card, the
  result files and the TensorBoard logs; never the checkpoint folders, the teacher-logit cache,
  any torch or pickle file, or run_args.json (the command line and the machine's folders; the card
  says what shaped the model) (`IGNORE`).
- The pushes during training (`push_checkpoint`, at every save): with --hub_strategy
  every_save, checkpoint and all_checkpoints the checkpoint's model files to the repository's
  root; with checkpoint and all_checkpoints also the checkpoint itself, to resume from, under
  `last-checkpoint/` or `checkpoint-N/`: its optimizer, schedule and random-number states
  (optimizer.pt, scheduler.pt, rng_state*.pth) and trainer_state.json with the model, never
  the pickled training arguments (training_args.bin) or the checkpoint's copy of run_args.json.

The run saves everything locally first. A push that cannot work (offline, no token, token
refused) is refused before training; one that fails at the end says so in one line with the
command that pushes the saved directory.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from huggingface_hub import HfApi, constants, get_token, is_offline_mode

from ..errors import UserError
from .compat import go_offline

logger = logging.getLogger(__name__)
_reachability_known = False

# The final push: checkpoints (and those moved aside: incomplete-, superseded-checkpoint-N), files private to the
# run ("_*": the teacher-logit cache; run_args.json: the command line and this machine's folders), torch files and
# pickles stay local. TensorBoard logs (runs/) go up: the Hub shows them in its metrics tab.
# The data check's files and the label-error list name the data's files and show its pictures (data_check.html):
# they stay with the data, like run_args.json, since a model repository may be public.
IGNORE = ["*checkpoint-*", "_*", "run_args.json*", "*.bin", "*.pt", "*.pth", ".write-test-*", "data_check.*",
          "label_errors.json", "label-errors/*"]
MODEL_FILES = ["config.json", "model.safetensors", "model.safetensors.index.json", "model-*.safetensors",
               "preprocessor_config.json"]
# A checkpoint pushed to resume from: all of it but the pickled arguments and its copy of the run's record.
CHECKPOINT_IGNORE = ["*.bin", "run_args.json*"]


def check_hub_reachable(timeout: float = 3.0) -> None:
    """Called before a download from the Hub: the first time, ask the Hub once, with a short timeout (through
    the proxies huggingface_hub itself uses). When it cannot be reached, work from cached files only, as
    HF_HUB_OFFLINE=1 does, and say so in one line: otherwise every file request retries for half a minute
    before the same conclusion."""
    global _reachability_known
    if _reachability_known or is_offline_mode():
        return
    _reachability_known = True
    from huggingface_hub.utils import get_session

    try:
        get_session().head(constants.ENDPOINT, timeout=timeout)
    except Exception as exc:  # httpx's connect, timeout and proxy errors, among others: unreachable either way
        go_offline()
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        logger.warning("the Hugging Face Hub (%s) cannot be reached (%s): using cached files only, as with "
                       "HF_HUB_OFFLINE=1", constants.ENDPOINT, reason)


def later_command(output_dir: str, repo_id: str) -> str:
    return f"python -m hf_transfer push {output_dir} --hub_model_id {repo_id}"


def resolve_repo_id(args) -> str:
    return args.hub_model_id or Path(args.output_dir).name


def check_push_possible(args) -> None:
    """Refuse, before any training, a push that cannot work."""
    if args.push_to_hub:
        check_hub_access(f"train without --push_to_hub and push later with: "
                         f"{later_command(args.output_dir, resolve_repo_id(args))}", flag="--push_to_hub")


def check_hub_access(instead: str, flag: str = "push") -> None:
    """Offline mode, no token, or a token the Hub refuses: one line each, with what to do `instead`."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        raise UserError(f"{flag} cannot work with HF_HUB_OFFLINE set; {instead}")
    token = get_token()
    if not token:
        raise UserError(f"{flag} needs a Hugging Face token with write access: set HF_TOKEN or run `hf auth login`")
    try:
        HfApi().whoami(token=token)
    except Exception as exc:  # HTTP errors, connection errors: either way the push would fail
        raise UserError(f"{flag}: the Hub refused the token or cannot be reached ({_first_line(exc)})") from exc


def require_finished_run(output_dir: str | Path) -> Path:
    output_dir = Path(output_dir)
    for required in ("config.json", "model.safetensors", "preprocessor_config.json"):
        if not (output_dir / required).exists():
            raise UserError(f"'{output_dir}' is not a finished run (no {required}); nothing to push")
    return output_dir


def push_output_dir(output_dir: str | Path, repo_id: str, private: bool | None = None, token: str | None = None,
                    revision: str | None = None,
                    commit_message: str = "Upload model trained with hf-vision-transfer") -> str:
    """Create the repo (and the branch `revision`) if needed and upload the directory; returns the repo URL."""
    output_dir = require_finished_run(output_dir)
    api = HfApi(token=token)
    url = api.create_repo(repo_id, private=private, exist_ok=True)
    repo_id = str(getattr(url, "repo_id", repo_id))
    if revision:
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    api.upload_folder(repo_id=repo_id, folder_path=str(output_dir), ignore_patterns=IGNORE,
                      commit_message=commit_message, revision=revision)
    return str(url)


def push_at_end(args, repo_id: str | None, revision: str | None = None) -> str:
    """The end-of-run push: a failure keeps the local run and says how to push it later."""
    repo_id = repo_id or resolve_repo_id(args)
    try:
        return push_output_dir(args.output_dir, repo_id, private=args.hub_private_repo, revision=revision)
    except Exception as exc:
        raise UserError(f"the push to {repo_id} failed ({_first_line(exc)}); the run is saved in {args.output_dir}; "
                        f"push it later with: {later_command(args.output_dir, repo_id)}") from exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def push_checkpoint(checkpoint_folder: str | Path, repo_id: str, strategy: str, message: str,
                    revision: str | None = None) -> list:
    """A push during training (--hub_strategy every_save/checkpoint/all_checkpoints), in the background.

    The checkpoint's model files go to the repository's root (the latest model is always
    there); with `checkpoint` / `all_checkpoints` the checkpoint itself goes to `last-checkpoint/` /
    `checkpoint-N/`, to resume from: the model (safetensors), trainer_state.json, and the optimizer,
    schedule and random-number states (optimizer.pt, scheduler.pt, rng_state*.pth: torch files, which
    the Trainer reads back with `weights_only=True`: tensors, numbers and plain containers, nothing
    that runs code). Not the pickled training arguments (training_args.bin, which only a full unpickle
    reads; `CHECKPOINT_IGNORE`) and no card of the Trainer's: the run's own card comes with the final
    push. Returns the upload futures.
    """
    api, folder = HfApi(), Path(checkpoint_folder)
    jobs = [api.upload_folder(repo_id=repo_id, folder_path=str(folder), allow_patterns=MODEL_FILES,
                              commit_message=message, revision=revision, run_as_future=True)]
    if strategy in ("checkpoint", "all_checkpoints"):
        path_in_repo = "last-checkpoint" if strategy == "checkpoint" else folder.name
        jobs.append(api.upload_folder(repo_id=repo_id, folder_path=str(folder), path_in_repo=path_in_repo,
                                      ignore_patterns=CHECKPOINT_IGNORE, commit_message=f"{message}, checkpoint",
                                      revision=revision, run_as_future=True))
    return jobs
