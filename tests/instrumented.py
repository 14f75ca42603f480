"""run_finetune / run_distill / `python -m hf_transfer search` as a subprocess would run them, with test
instruments: `instrumented.py finetune|distill|search ARGS...`.

- Each rank records which training rows every step used (rows-rank<R>.json in $TEST_ROWS_DIR, when set).
- TEST_STEP_SLEEP=<seconds> slows every training step, so a test can interrupt a run mid-epoch.
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

if __name__ == "__main__":
    import logging

    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.INFO)
    script, argv = sys.argv[1], sys.argv[2:]
    if script == "finetune":
        from hf_transfer.commands.finetune import main
    elif script == "search":
        from hf_transfer.commands.tools import main as tools

        def main(argv):
            return tools(["search", *argv])
    else:
        from hf_transfer.commands.distill import main
    from hf_transfer.errors import run_cli

    code = run_cli(main, argv)
    if os.environ.get("TEST_ROWS_DIR"):
        rows = Path(os.environ["TEST_ROWS_DIR"])
        rows.mkdir(parents=True, exist_ok=True)
        (rows / f"rows-rank{os.environ.get('RANK', '0')}.json").write_text(json.dumps(seen))
    sys.exit(code)
