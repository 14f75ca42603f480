"""Export: a saved model to ONNX, checked against PyTorch on the run's own test images.

`python -m hf_transfer export RUN_DIR --format onnx` writes `RUN_DIR/onnx/`: `model.onnx` (torch's
exporter; input `pixel_values` of any batch size, output `logits`), the run's `config.json` and
`preprocessor_config.json` beside it, the same facts in the ONNX file's own metadata (labels, input
size, resize, mean and std, so that a server without transformers can prepare an image), and
`export_results.json`. The export is then run with onnxruntime on the images of the run's test
split (validation when it has none), prepared by the saved image processor as `pipeline` prepares
them, and compared with PyTorch: each image's largest logit difference must be at most `TOLERANCE` times the size
of its logits (its largest |logit|, at least 1) and the top-1 class the same on every image, else the command fails.
`--openvino` converts the checked file to OpenVINO's format beside it and checks that the same way
(`tools/openvino_ir.py`). `--quantize int8` / `--precision fp16` write smaller files (`tools/quantize.py`), judged
against the fp32 file by the answers they keep and the test score they lose (`tools/checks.py`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError
from ..run import record as run_args
from ..tasks.classification import task_of
from . import checks, openvino_ir, quantize
from .deployment import forget, latency_table, update_card

logger = logging.getLogger(__name__)

TOLERANCE = 1e-4  # largest |logit difference| allowed between onnxruntime and PyTorch, per unit of the image's logits


BATCH = 32  # images per comparison batch
SINGLE_FILE_LIMIT = 1_800_000_000  # bytes of weights above which they go to a side file (protobuf's 2 GB limit)
# The most test accuracy a smaller precision may lose against fp32 before export refuses it (a fraction; docs/export.md
# gives the measurements it was chosen from).
MAX_ACCURACY_DROP = 0.01
CALIBRATION_IMAGES = 256  # training images that calibrate int8 activation ranges
LATENCY_REPEATS = 20  # timed calls per latency figure
LATENCY_BATCH = 32  # the throughput batch of the latency table


class _Logits(torch.nn.Module):
    """The model as a function of its input tensor alone, returning the logits tensor (not a ModelOutput)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, pixel_values):
        return self.model(pixel_values=pixel_values).logits


@dataclass(frozen=True)
class Precision:
    """What to write besides the fp32 model, and how it is checked and timed."""

    quantize: str | None = None  # "int8": model.int8.onnx
    precision: str = "fp32"  # "fp16": model.fp16.onnx as well
    max_accuracy_drop: float = MAX_ACCURACY_DROP  # refusal above this fall of test accuracy (micro-F1 with several
    # labels per image), a fraction
    calibration_images: int = CALIBRATION_IMAGES  # training images that calibrate int8 activations
    latency_repeats: int = LATENCY_REPEATS  # timed calls per figure; 0: no latency table
    latency_batch: int = LATENCY_BATCH  # the throughput batch (besides batch 1)
    openvino: bool = False  # openvino/model.xml|.bin as well, converted from the fp32 model.onnx

    def reduced(self) -> list[str]:
        return [p for p in (self.quantize, None if self.precision == "fp32" else self.precision) if p]


def export_onnx(run_dir: str, output: str | None = None, max_images: int | None = None,
                images: str | None = None, opset: int | None = None, precision: Precision = Precision()) -> dict:
    """Export the model saved in `run_dir`, verify it on images, and return what was measured."""
    run, out = Path(run_dir), Path(output) if output else Path(run_dir) / "onnx"
    if out.exists() and not out.is_dir():
        raise UserError(f"--output '{out}' is a file: pass a folder (it is created if missing)")
    _check_installed()
    if precision.openvino:
        openvino_ir.check_installed()
    _check_saved_model(run)
    _check_threshold(run)
    pictures, labels, source, data = _verification_images(run, images, max_images)  # before the model: quick refusal
    calibration = _calibration_images(run, data, precision.calibration_images) if precision.quantize else None
    model, processor = _load(run)
    pixel_values = _prepared(processor, pictures)

    task = task_of(model.config).of_model(model.config)  # its answers: the top-1, or decisions at its threshold

    out.mkdir(parents=True, exist_ok=True)
    forget(run, out)  # the table of an earlier export to this folder describes files about to be replaced
    for name in (quantize.INT8, quantize.FP16):
        # an earlier export's smaller model (perhaps of another model) must not stay beside this one's fp32 file: not
        # one that is not asked for this time, nor one that is but then cannot be made
        (out / f"model.{name}.onnx").unlink(missing_ok=True)
    openvino_ir.remove(out)  # an earlier export's, written again below only from this model.onnx once it has passed
    path = out / "model.onnx"
    started = time.perf_counter()
    to_onnx(model, pixel_values[0][:1].repeat(2, 1, 1, 1), path, opset)  # batch 2: a batch of 1 would fix the size
    _check_opset(path, opset)
    _add_metadata(path, model.config, processor)
    for name in ("config.json", "preprocessor_config.json"):
        shutil.copy(run / name, out / name)
    seconds = time.perf_counter() - started

    match = checks.against_pytorch(model, pixel_values, _onnx_runner(path))
    results = {"format": "onnx", "model": str(path), "images": len(pictures), "image_source": source,
               "max_abs_logit_diff": match.max_abs_logit_diff, "max_relative_logit_diff": match.max_relative_logit_diff,
               "top1_disagreements": match.top1_disagreements, "tolerance": TOLERANCE,
               "export_seconds": round(seconds, 2), "onnx_bytes": _size(path),
               **{f"onnx_{k}": v for k, v in checks.score(match.logits, labels, task).items()}}
    refused = match.refusal("ONNX", source, TOLERANCE)
    results["precisions"] = {"fp32": {"model": str(path), "bytes": _size(path), "check": "logits within tolerance",
                                      **{k: results[k] for k in ("max_abs_logit_diff", "top1_disagreements")},
                                      "refused": refused}}  # predict reads it: a refused file is not served
    _write(out, results)
    if refused:
        raise UserError(f"{refused}; {path} is kept for inspection, do not serve it")
    if precision.openvino:
        results["openvino"] = openvino_ir.check(path, model, pixel_values, labels, source, task)
        _write(out, results)
        if results["openvino"]["refused"]:
            raise UserError(results["openvino"]["refused"])

    refused = []
    for name in precision.reduced():
        figures = _reduced(name, path, out, model.config, processor, pixel_values, match.logits, labels, calibration,
                           precision, task)
        results["precisions"][name] = figures
        if figures["refused"]:
            refused.append(f"{name} {figures['model']}: {figures['refused']}")
    _write(out, results)
    if refused:  # the figures are in export_results.json; the files are kept for inspection
        raise UserError(f"{'; '.join(refused)} on {source}; the file is kept for inspection, do not serve it "
                        "(a larger --max_accuracy_drop would accept it)")
    if precision.latency_repeats:
        results["latency"] = latency_table(run, model, task, results, pixel_values[0], precision, pictures)
        _write(out, results)
        # the card and the report show the table of the run's own test split; one of other images stays in the results
        results["card"] = update_card(run, results["latency"]) if images is None else None
        _write(out, results)
    return results


def _write(out: Path, results: dict) -> None:
    (out / "export_results.json").write_text(json.dumps(results, indent=2) + "\n")


def _prepared(processor, pictures: list) -> list[torch.Tensor]:
    """Batches of pixel_values, prepared by the saved image processor as `pipeline` prepares an image."""
    return [processor(images=pictures[i:i + BATCH], return_tensors="pt")["pixel_values"]
            for i in range(0, len(pictures), BATCH)]


def _reduced(name: str, fp32: Path, out: Path, config, processor, pixel_values, reference, labels, calibration,
             precision: Precision, task) -> dict:
    """Write the `name` precision of the fp32 model beside it, run it on the check's images and compare its answers
    with the fp32 file's (`reference`: its logits); `refused` says why it must not be served (None: within
    --max_accuracy_drop)."""
    from .latency import onnx_session

    path = out / f"model.{name}.onnx"
    if name == quantize.INT8:
        made = quantize.quantize_int8(fp32, path, _prepared(processor, calibration[0]) if calibration else None)
        if calibration:
            made["calibration_source"] = calibration[1]
    else:
        made = quantize.to_fp16(fp32, path)
    _add_metadata(path, config, processor, precision=name)
    try:
        logits = checks.logits_of(onnx_session(path), pixel_values)
    except Exception as exc:  # an operator onnxruntime has no kernel for in this precision: its message is long
        path.unlink(missing_ok=True)  # a file onnxruntime cannot run is not kept to be served
        raise UserError(f"onnxruntime cannot run the {name} model of this {config.model_type} model: "
                        f"{quantize.first_line(exc)}") from exc
    figures = checks.against_fp32(logits, reference, labels, task)
    lost, what = checks.drop_of(figures)
    refused = None
    if lost > precision.max_accuracy_drop:
        refused = (f"{what} {lost:.4f} ({checks.summary(figures)}), above --max_accuracy_drop "
                   f"{precision.max_accuracy_drop:g}")
    return {"model": str(path), "bytes": _size(path), **made, **figures,
            "max_accuracy_drop": precision.max_accuracy_drop, "refused": refused}


def _check_installed() -> None:
    import importlib.util

    missing = [name for name in ("onnx", "onnxscript", "onnxruntime") if importlib.util.find_spec(name) is None]
    if missing:
        raise UserError(f"ONNX export needs {', '.join(missing)}: pip install 'hf-vision-transfer[export]'")


def _check_saved_model(run: Path) -> None:
    if not run.is_dir():
        raise UserError(f"'{run}' is not a directory; pass a run's output directory or one of its checkpoint-N folders")
    if not (run / "config.json").is_file() or not (run / "preprocessor_config.json").is_file():
        raise UserError(f"'{run}' holds no saved model (config.json and preprocessor_config.json); pass a finished "
                        "run's output directory or one of its checkpoint-N folders")


def _load(run: Path):
    from transformers import AutoImageProcessor
    from transformers.utils import logging as transformers_logging

    from ..models.loading import _from_pretrained

    transformers_logging.disable_progress_bar()  # the weights' loading bar: a command's output is its results
    model = _from_pretrained("model", str(run)).eval().float()
    return model, AutoImageProcessor.from_pretrained(str(run))


def _verification_images(run: Path, folder: str | None, max_images: int | None) -> tuple[list, list | None, str, object]:
    """(images, their labels or None, what they are, the run's data or None) to compare on: the image files under
    `folder`, or the test split (else validation) of the data set the run was trained on, as its run_args.json
    records it (a checkpoint-N folder's is its run's)."""
    from ..data.sources import IMAGE_EXTENSIONS

    data = None
    if folder is not None:
        files = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)[:max_images]
        if not files:
            raise UserError(f"--images '{folder}' holds no image files")
        cells, labels, source = [{"path": str(p), "bytes": None} for p in files], None, f"{len(files)} images of {folder}"
    else:
        saved = _saved(run)
        if saved is None:
            raise UserError(f"'{run}' has no run_args.json (not a run of this project) to find its test images; "
                            "pass --images DIR with images to compare on")
        data = _run_data(saved)
        split, stored = ("test", data.test) if data.test is not None else ("validation", data.validation)
        stored = stored.with_format(None)
        stored = stored.select(range(min(max_images or len(stored), len(stored))))
        with _quiet_datasets():  # reading a column of a selection rewrites its indices with a progress bar
            cells, labels = stored[data.image_column], stored[data.label_column]
        source = f"{len(stored)} images of the run's {split} split"
    return _decoded(cells, source), labels, source, data


def _calibration_images(run: Path, data, count: int) -> tuple[list, str] | None:
    """(`count` images drawn from the run's training split with the run's seed, what they are), or None for a model
    without a run: the images int8 activations are calibrated on, never the ones that check the model."""
    import itertools

    saved = _saved(run)
    if saved is None:
        return None
    data = data or _run_data(saved)
    train = data.train
    if hasattr(train, "__len__"):
        seed = saved["shaping"].get("training.seed", 42)
        rows = sorted(np.random.default_rng(seed).permutation(len(train))[:count].tolist())
        train = train.with_format(None)
        cells = [train[i][data.image_column] for i in rows]  # row by row: a select would rewrite the indices
    else:  # a streamed data set: its first images (the stream is already shuffled by the loader)
        cells = [row[data.image_column] for row in itertools.islice(train, count)]
    source = f"{len(cells)} images of the run's training split"
    return _decoded(cells, source), source


@contextlib.contextmanager
def _quiet_datasets():
    import datasets

    shown = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if shown:
            datasets.enable_progress_bars()


def _decoded(cells: list, source: str) -> list:
    import PIL.Image

    from ..data.decoding import decode_rgb

    pictures = []
    for cell in cells:
        try:
            pictures.append(PIL.Image.fromarray(decode_rgb(cell).permute(1, 2, 0).numpy()))
        except (OSError, ValueError) as exc:
            raise UserError(f"cannot decode {cell.get('path') or 'an image'} of {source}: {exc}") from exc
    return pictures


def _saved(run: Path) -> dict | None:
    return run_args.read(run) or run_args.read(run.parent)


def _run_data(saved: dict):
    """The run's own data: the data flags as the run recorded them (its folders whole: from any working folder), the
    same seed, the same splits."""
    from ..config.flags import data_arguments
    from ..run.assembly import load_data

    data_args = data_arguments(saved, instead="pass --images DIR with images to compare on")
    with _quiet_datasets():  # its splits are rewritten (held-out rows, subsets) with progress bars
        return load_data(data_args, saved["shaping"].get("training.seed", 42))


def to_onnx(model, example: torch.Tensor, path: Path, opset: int | None = None) -> None:
    """Write `model` (a transformers image classifier) as ONNX: input `pixel_values` (any batch size), output
    `logits`; `example` is a batch of its input."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    try:
        torch.onnx.export(_Logits(model).eval(), (example,), str(path), dynamo=True, opset_version=opset,
                          input_names=["pixel_values"], output_names=["logits"],
                          dynamic_shapes={"pixel_values": {0: torch.export.Dim("batch")}},
                          external_data=weights > SINGLE_FILE_LIMIT, verbose=False)
    except Exception as exc:  # the exporter's failures are many and long: the first line says which
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"torch's ONNX exporter cannot export this {model.config.model_type} model: {first}") from exc


def _check_threshold(run: Path) -> None:
    """A model with several labels per image answers with its decisions at the threshold its run chose on validation;
    without one (a checkpoint-N folder: the run chooses it at the end) predict could not serve the file, and a smaller
    precision would be judged at a threshold the model was never given."""
    config = json.loads((run / "config.json").read_text())
    if config.get("problem_type") == "multi_label_classification" and config.get("multi_label_threshold") is None:
        raise UserError(f"'{run}' has several labels per image but no decision threshold (multi_label_threshold in its "
                        "config.json; a checkpoint-N folder has none, the run chooses it on validation at the end): "
                        "export the run's output directory, or add the threshold to its config.json")


def _check_opset(path: Path, opset: int | None) -> None:
    """torch's exporter writes opset 18 and converts to an older one when asked; when it cannot, it keeps 18 and only
    logs it: a file of another opset than --opset asks for is refused."""
    import onnx

    if opset is None:
        return
    written = next(o.version for o in onnx.load(str(path), load_external_data=False).opset_import if o.domain in ("", "ai.onnx"))
    if written != opset:
        path.unlink(missing_ok=True)
        raise UserError(f"torch's ONNX exporter cannot write this model in opset {opset} (it wrote {written}): pass "
                        "--opset 18 or later, or leave it out")


def _add_metadata(path: Path, config, processor, precision: str = "fp32") -> None:
    """The facts a server needs to prepare an image and name the class, in the ONNX file itself."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    facts = {
        "id2label": json.dumps({int(k): v for k, v in config.id2label.items()}),
        "problem_type": config.problem_type or "single_label_classification",
        "image_processor": processor.to_json_string(),
        "producer": "hf_transfer export",
        "precision": precision,
    }
    if getattr(config, "multi_label_threshold", None) is not None:  # several labels per image: the decision
        facts["multi_label_threshold"] = str(config.multi_label_threshold)
    del proto.metadata_props[:]
    for key, value in facts.items():
        proto.metadata_props.add(key=key, value=value)
    onnx.save(proto, str(path))


def _onnx_runner(path: Path):
    """onnxruntime's CPU session on `path` (`latency.onnx_session`, its default threads) as a call: pixel_values
    array -> logits array."""
    from .latency import onnx_session

    session = onnx_session(path)
    return lambda pixel_values: session.run(["logits"], {"pixel_values": pixel_values})[0]


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.parent.glob(path.name + "*"))
