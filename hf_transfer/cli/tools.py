"""`python -m hf_transfer <command>`: tools around the training scripts.

  push OUTPUT_DIR --hub_model_id USER/NAME   push a finished run to the Hugging Face Hub
  report RUN_DIR... [--output DIR]           compare finished runs: report.html (pictures, offline) and report.md
  check-config FILE...                       check accelerate config files before launching
  export RUN_DIR --format onnx               export a saved model to ONNX, checked against PyTorch on the test images
                                             [--quantize int8] [--precision fp16]: smaller models, checked and timed
                                             [--openvino]: OpenVINO (Intel CPUs) beside it, checked and timed
  search [run_finetune.py flags] --n_trials N  hyperparameter search (optuna); the best trial trained as a run
  check-data [data flags] --output_dir DIR   check a data set: leaks, duplicates, unreadable and hidden files, classes
  label-errors RUN_DIR [--folds K]           the training and validation images whose label the model disputes
  predict EXPORT_DIR IMAGE_OR_FOLDER...      the exported model's top labels for image files, prepared as in training
                                             [--top_k K] [--precision fp32|int8|fp16] [--output FILE.json]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path

from ..errors import OneLineArgumentParser, run_cli


def main(argv: Sequence[str] | None = None) -> None:
    from . import before_running

    argv = list(sys.argv[1:] if argv is None else argv)
    parser, tools = tools_parser()
    if argv[:1] == ["search"]:  # run_finetune.py's flags and search's: a typo in either before the libraries load
        from .command_line import check_command_line, spec_of

        check_command_line("finetune", argv[1:], more=spec_of(tools["search"]))
    args, rest = parser.parse_known_args(argv)
    if rest and args.command not in ("search", "check-data"):
        tools[args.command].error(f"unrecognized arguments: {' '.join(rest)}")
    if args.command == "export":
        # --max_accuracy_drop may be negative: a smaller precision must then beat fp32 (the refusal's tests use it)
        for flag, least in (("max_images", 1), ("calibration_images", 1), ("latency_repeats", 0), ("latency_batch", 1)):
            if getattr(args, flag) is not None and getattr(args, flag) < least:
                tools["export"].error(f"--{flag} must be >= {least}")
        if args.max_accuracy_drop is not None and not math.isfinite(args.max_accuracy_drop):
            tools["export"].error(f"--max_accuracy_drop must be a finite fraction (0.01: one point), not "
                                  f"{args.max_accuracy_drop}")
    if args.command == "report" and Path(args.output).exists() and not Path(args.output).is_dir():
        tools["report"].error(f"--output '{args.output}' is a file: pass a folder for report.html, report.md and the "
                              "plots (it is created if missing)")
    if args.command == "predict" and args.top_k < 1:
        tools["predict"].error("--top_k must be >= 1")
    if args.command == "check-data":  # its flags (the run's data flags) refused before any data is read
        from ..tools.check_data import parse

        parse(rest)
    before_running(trains=args.command in ("search", "label-errors"))

    if args.command == "push":
        from ..errors import UserError
        from ..integrations.hub import check_hub_access, push_output_dir, require_finished_run

        require_finished_run(args.output_dir)
        check_hub_access("push from a machine that can reach the Hub")
        render_card_for(args.output_dir, args.hub_model_id)
        try:
            print(push_output_dir(args.output_dir, args.hub_model_id, private=args.private or None,
                                  revision=args.revision))
        except UserError:
            raise
        except Exception as exc:  # network, permissions, ...: one line, not a traceback
            raise UserError(f"the push to {args.hub_model_id} failed: {str(exc).strip().splitlines()[0]}") from exc
    elif args.command == "report":
        from ..tools.report import build_report

        print(build_report(args.runs, args.output))
        print(f"\nwritten to {args.output}/ (report.html: open it in a browser; report.md, summary.json, curves.png, confusion_matrices.png)")
    elif args.command == "check-config":
        from ..integrations.launch import check_config_file

        for path in args.files:
            print(json.dumps(check_config_file(path)))
    elif args.command == "search":
        from ..tools.search import closing_line, run_search

        print(closing_line(run_search(rest, args.n_trials, args.backend)))
    elif args.command == "check-data":
        from ..tools.check_data import check_data

        check_data(rest)
    elif args.command == "export":
        from ..tools.checks import summary
        from ..tools.deployment import markdown
        from ..tools.export import Precision, export_onnx

        chosen = {k: getattr(args, k) for k in ("max_accuracy_drop", "calibration_images", "latency_repeats",
                                                "latency_batch") if getattr(args, k) is not None}
        results = export_onnx(args.run_dir, args.output, args.max_images, args.images, args.opset,
                              Precision(quantize=args.quantize, precision=args.precision, openvino=args.openvino,
                                        **chosen))
        if "latency" in results:
            print(markdown(results["latency"]) + "\n")
        print(f"{results['model']}: onnxruntime matches PyTorch on {results['image_source']} (largest logit "
              f"difference {results['max_abs_logit_diff']:.1e}, same top-1 on all)")
        if "openvino" in results:
            print(f"{results['openvino']['model']}: OpenVINO matches PyTorch (largest logit difference "
                  f"{results['openvino']['max_abs_logit_diff']:.1e}, same top-1 on all)")
        for name, figures in results["precisions"].items():
            if name != "fp32":
                print(f"{figures['model']}: {summary(figures)}")
        print(f"\nfigures in {Path(results['model']).parent / 'export_results.json'}"
              + (f", the table in the model card {results['card']}" if results.get("card") else ""))
    elif args.command == "label-errors":
        from ..tools.label_errors import find_label_errors, summary_line

        print(summary_line(find_label_errors(args.run_dir, args.folds, args.keep_fold_runs), args.run_dir))
    elif args.command == "predict":
        from ..tools.predict import line, predict

        for answer in predict(args.export_dir, args.images, args.top_k, args.precision, args.output):
            print(line(answer))
        if args.output:
            print(f"\nwritten to {args.output}")


def tools_parser() -> tuple[OneLineArgumentParser, dict[str, OneLineArgumentParser]]:
    """The tools' parser and each tool's; their refusals are one line with a "did you mean" (flags, choices, the
    tool's name). As in the training scripts: flags spelled out (no abbreviations), with underscores or dashes."""
    parser = OneLineArgumentParser(prog="python -m hf_transfer", description=__doc__, allow_abbrev=False,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    push = commands.add_parser("push", help="push a finished run (model, processor, card, results) to the Hub",
                               allow_abbrev=False)
    push.add_argument("output_dir")
    push.add_argument("--hub_model_id", "--hub-model-id", required=True, help="USER/NAME of the model repository")
    push.add_argument("--private", action="store_true", help="create the repository as private")
    push.add_argument("--revision", default=None, help="branch to push to (created if needed; default main)")
    report = commands.add_parser("report", help="compare finished runs", allow_abbrev=False)
    report.add_argument("runs", nargs="+")
    report.add_argument("--output", default="reports/comparison", help="folder for report.html, report.md and the plots")
    check = commands.add_parser("check-config", help="check accelerate config files (keys, devices, precision)",
                                allow_abbrev=False)
    check.add_argument("files", nargs="+")
    export = commands.add_parser("export", help="export a saved model (a run or a checkpoint-N folder) to ONNX and "
                                 "check it against PyTorch on the run's test images", allow_abbrev=False)
    export.add_argument("run_dir")
    export.add_argument("--format", choices=["onnx"], default="onnx", help="the export format")
    export.add_argument("--output", default=None, help="folder for model.onnx and its files (default RUN_DIR/onnx)")
    export.add_argument("--max_images", "--max-images", type=int, default=None,
                        help="compare on at most this many test images (default: all of them)")
    export.add_argument("--images", default=None,
                        help="compare on the image files under this folder instead of the run's test split")
    export.add_argument("--opset", type=int, default=None, help="ONNX opset (default: the exporter's)")
    export.add_argument("--quantize", choices=["int8"], default=None,
                        help="also write model.int8.onnx: onnxruntime static quantization (QDQ, per-channel int8 "
                             "weights, activations calibrated on the run's training images), checked on the test "
                             "images against fp32 (docs/export.md)")
    export.add_argument("--precision", choices=["fp32", "fp16"], default="fp32",
                        help="fp16: also write model.fp16.onnx (half-precision weights and arithmetic, for GPUs), "
                             "checked like int8")
    export.add_argument("--openvino", action="store_true",
                        help="also write openvino/model.xml and model.bin (fp32), converted from model.onnx for "
                             "OpenVINO's CPU plugin (Intel CPUs), checked against PyTorch like model.onnx and timed "
                             "in the latency table; needs pip install 'hf-vision-transfer[openvino]'")
    export.add_argument("--max_accuracy_drop", "--max-accuracy-drop", type=float, default=None,
                        help="refuse (exit 2, file kept) an int8/fp16 model whose test accuracy falls by more than "
                             "this fraction below fp32's (default 0.01: one point)")
    export.add_argument("--calibration_images", "--calibration-images", type=int, default=None,
                        help="training images that calibrate int8 activation ranges (default 256)")
    export.add_argument("--latency_repeats", "--latency-repeats", type=int, default=None,
                        help="timed calls per latency figure (default 20); 0: no latency table")
    export.add_argument("--latency_batch", "--latency-batch", type=int, default=None,
                        help="the throughput batch of the latency table, beside batch 1 (default 32)")
    search = commands.add_parser("search", help="hyperparameter search: every run_finetune.py flag, plus these; the "
                                 "study continues where it stopped when the command is run again", allow_abbrev=False,
                                 description="Takes every run_finetune.py flag (python run_finetune.py --help) and "
                                             "these; docs/search.md.")
    search.add_argument("--n_trials", "--n-trials", type=int, required=True,
                        help="trials the study should have in all (finished ones of an earlier call count)")
    search.add_argument("--backend", choices=["optuna", "ray"], default="optuna",
                        help="optuna: trials one after another here; ray: trials in parallel on a Ray cluster "
                             "(RAY_ADDRESS; docs/search.md)")
    commands.add_parser("check-data", help="check a data set before training (leaks, duplicates, unreadable and "
                        "hidden files, class counts): the run's data flags, plus --output_dir", add_help=False,
                        allow_abbrev=False)
    errors = commands.add_parser("label-errors", help="the training and validation images whose given label a "
                                 "finished run's recipe most disputes, scored out of sample (K-fold runs); "
                                 "docs/label-errors.md", allow_abbrev=False)
    errors.add_argument("run_dir")
    errors.add_argument("--folds", type=int, default=None,
                        help="folds of the training split, each scored by a run of the recipe trained on the others "
                             "(default 3: docs/label-errors.md weighs precision and recall against cost)")
    errors.add_argument("--keep_fold_runs", "--keep-fold-runs", action="store_true",
                        help="keep the fold runs' weights and checkpoints in RUN_DIR/label-errors (default: only "
                             "what each fold measured is kept, which a second call reuses)")
    predict = commands.add_parser("predict", help="the exported model's top labels for image files, each prepared "
                                  "as the run prepared its evaluation images (docs/export.md)", allow_abbrev=False)
    predict.add_argument("export_dir", help="the folder export wrote (RUN_DIR/onnx, or its --output)")
    predict.add_argument("images", nargs="+", help="image files, or folders whose image files are all taken")
    predict.add_argument("--top_k", "--top-k", type=int, default=5, help="labels per image, best first (default 5)")
    predict.add_argument("--precision", choices=["fp32", "int8", "fp16"], default="fp32",
                         help="which exported file: model.onnx (fp32), model.int8.onnx or model.fp16.onnx")
    predict.add_argument("--output", default=None, help="also write the answers to this JSON file")
    return parser, commands.choices


def render_card_for(output_dir: str, repo_id: str) -> None:
    """The model card names the repository it lives in (its title, model-index and usage snippet): render it
    again for `repo_id` from the facts the run saved and its results."""
    from pathlib import Path

    from ..run.card import CardInfo, write_model_card
    from ..run.record import read_card

    facts = read_card(output_dir)
    if facts is None:  # a run saved before run_args.json had the card: leave its card as it is
        return
    out = Path(output_dir)

    def results(split):
        path = out / f"{split}_results.json"
        return json.loads(path.read_text()) if path.is_file() else None

    write_model_card(out, CardInfo(**{**facts, "model_name": repo_id}), results("test"), results("eval"))


def cli() -> None:
    sys.exit(run_cli(main))
