"""run_finetune / run_distill / `python -m hf_transfer search` as a subprocess would run them, with test
instruments: `instrumented.py finetune|distill|search ARGS...`.

- Each rank records which training rows every step used (rows-rank<R>.json in $TEST_ROWS_DIR, when set).
- TEST_STEP_SLEEP=<seconds> slows every training step, so a test can interrupt a run mid-epoch.
- TEST_FAKE_HUB=<path> replaces the Hub client (helpers.FakeHub) and writes what each rank uploaded to
  <path>.rank<R>.json when the process ends.
- TEST_FSDP_ON_CPU=1 lets accelerate's FSDP2 path run in CPU processes (gloo), so that the project's FSDP code
  executes without a GPU: accelerate 1.15 selects FSDP for accelerator devices only, and an FSDP launch on the CPU
  would be plain DDP (the scripts refuse that). torch's `fully_shard` works over gloo; the patch only chooses it.
"""

import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hf_transfer.trainers.transfer_trainer import TransferTrainer  # noqa: E402

seen: list[list[int]] = []
_prepare = TransferTrainer._prepare_inputs
_sleep = float(os.environ.get("TEST_STEP_SLEEP", "0"))


def _instrumented(self, inputs):
    if self.model.training:
        seen.append(inputs["row_index"].tolist())
        time.sleep(_sleep)
    return _prepare(self, inputs)


TransferTrainer._prepare_inputs = _instrumented


def _fsdp_on_cpu() -> None:
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType

    init_state = AcceleratorState.__init__

    def state(self, *args, fsdp_plugin=None, **kwargs):
        init_state(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        plugin = fsdp_plugin or getattr(self, "fsdp_plugin", None)  # (each new state object re-reads the CPU type)
        if self.distributed_type == DistributedType.MULTI_CPU and plugin is not None:
            if getattr(self, "fsdp_plugin", None) is None and self.mixed_precision != "no":  # as accelerate does on GPUs
                plugin.set_mixed_precision(self._mixed_precision)
            self.distributed_type, self.fsdp_plugin = DistributedType.FSDP, plugin

    AcceleratorState.__init__ = state


if os.environ.get("TEST_FSDP_ON_CPU") == "1":
    _fsdp_on_cpu()

if os.environ.get("TEST_FAKE_HUB"):
    import atexit

    import pytest
    from helpers import FakeHub

    _hub = FakeHub(pytest.MonkeyPatch())
    _record = Path(f"{os.environ['TEST_FAKE_HUB']}.rank{os.environ.get('RANK', '0')}.json")
    atexit.register(lambda: _record.write_text(json.dumps(_hub.uploads)))

if __name__ == "__main__":
    import logging

    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.INFO)
    script, argv = sys.argv[1], sys.argv[2:]
    if script == "finetune":
        from hf_transfer.cli.finetune import main
    elif script == "search":
        from hf_transfer.cli.tools import main as tools

        def main(argv):
            return tools(["search", *argv])
    else:
        from hf_transfer.cli.distill import main
    from hf_transfer.errors import run_cli

    code = run_cli(main, argv)
    if os.environ.get("TEST_ROWS_DIR"):
        rows = Path(os.environ["TEST_ROWS_DIR"])
        rows.mkdir(parents=True, exist_ok=True)
        (rows / f"rows-rank{os.environ.get('RANK', '0')}.json").write_text(json.dumps(seen))
    sys.exit(code)
