"""Run run_finetune.py or run_distill.py (as `accelerate launch` starts it), recording per rank
which training rows each step used: `record_rows.py finetune|distill ARGS...`."""

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hf_transfer.trainer import TransferTrainer  # noqa: E402

seen: list[list[int]] = []
_prepare = TransferTrainer._prepare_inputs


def _recording(self, inputs):
    if self.model.training:
        seen.append(inputs["row_index"].tolist())
    return _prepare(self, inputs)


TransferTrainer._prepare_inputs = _recording

if __name__ == "__main__":
    script, argv = sys.argv[1], sys.argv[2:]
    if script == "finetune":
        from hf_transfer.finetune import main
    else:
        from hf_transfer.distill import main
    from hf_transfer.errors import run_cli

    code = run_cli(main, argv)
    output_dir = Path(argv[argv.index("--output_dir") + 1])
    (output_dir / f"rows-rank{os.environ.get('RANK', '0')}.json").write_text(json.dumps(seen))
    sys.exit(code)
