"""`python -m hf_transfer push|report|check-config|export|predict|search`: see `cli/tools.py`."""

from .cli.tools import cli

if __name__ == "__main__":
    cli()
