"""`python -m hf_transfer <command>`: tools around the training scripts.

  check-config FILE...   check accelerate config files before launching with them
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from .errors import run_cli


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m hf_transfer", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser("check-config", help="check accelerate config files (keys, devices, precision)")
    check.add_argument("files", nargs="+")
    args = parser.parse_args(argv)

    if args.command == "check-config":
        from .distributed import check_config_file

        for path in args.files:
            print(json.dumps(check_config_file(path)))


if __name__ == "__main__":
    sys.exit(run_cli(main))
