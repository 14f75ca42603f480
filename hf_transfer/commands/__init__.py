"""The commands, one `main(argv)` each, read top to bottom: run_finetune.py, run_distill.py, `python -m hf_transfer`."""
