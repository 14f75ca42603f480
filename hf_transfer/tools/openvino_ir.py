"""OpenVINO for Intel CPUs: the exported fp32 `model.onnx` converted to OpenVINO's format and checked like it.

`python -m hf_transfer export RUN_DIR --openvino` converts the checked `model.onnx` with `openvino.convert_model` and
writes `openvino/model.xml` (the graph) and `openvino/model.bin` (the weights, fp32) beside it, with the run's
`config.json` and `preprocessor_config.json`. The model is then compiled for OpenVINO's CPU plugin and run on the same
prepared images as the ONNX check (`checks.against_pytorch`): its logits must be within `TOLERANCE` of PyTorch's, per
unit of each image's logits, and its top-1 the same on every image, else the export is refused (the files kept for
inspection).

OpenVINO's CPU plugin computes in bf16 by default on CPUs that have bf16 instructions (AVX512-BF16, AMX): a file
written as fp32 would run with about three significant digits. Every compilation here asks for f32 arithmetic
(`INFERENCE_PRECISION_HINT`), so the check and the latency table measure the fp32 model the files hold.
"""

from __future__ import annotations

import importlib.util
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import torch

from ..errors import UserError
from . import checks

TOLERANCE = 1e-4  # largest |logit difference| allowed between OpenVINO's CPU plugin and PyTorch: the ONNX check's
FOLDER = "openvino"  # beside model.onnx
FILES = ("model.xml", "model.bin", "config.json", "preprocessor_config.json")
RUNTIME = "OpenVINO fp32"  # its row in the latency table


def check_installed() -> None:
    if importlib.util.find_spec("openvino") is None:
        raise UserError("--openvino needs the openvino package: pip install 'hf-vision-transfer[openvino]' "
                        "(or pip install openvino)")


def version() -> str | None:
    if importlib.util.find_spec("openvino") is None:
        return None
    import openvino

    return openvino.__version__.split("-")[0]


def remove(out: Path) -> None:
    """An earlier export's OpenVINO files (perhaps of another model) must not stay beside this one's model.onnx."""
    folder = out / FOLDER
    for name in FILES:
        (folder / name).unlink(missing_ok=True)
    if folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()


def convert(onnx_path: Path) -> Path:
    """Write `openvino/model.xml|.bin` (fp32 weights) from `onnx_path`, with the run's configs copied beside them."""
    import openvino

    folder = onnx_path.parent / FOLDER
    folder.mkdir(exist_ok=True)
    try:
        model = openvino.convert_model(str(onnx_path))
    except Exception as exc:  # the converter's messages run to many lines: the first says which
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"OpenVINO cannot convert {onnx_path}: {first}") from exc
    path = folder / "model.xml"
    openvino.save_model(model, str(path), compress_to_fp16=False)  # its default would halve the weights to fp16
    for name in ("config.json", "preprocessor_config.json"):
        shutil.copy(onnx_path.parent / name, folder / name)
    return path


def compiled(path: str | Path, threads: int | None = None):
    """The model at `path` compiled for OpenVINO's CPU plugin in f32 arithmetic, on `threads` threads (None: its
    default)."""
    import openvino
    import openvino.properties as properties
    import openvino.properties.hint as hints

    config = {hints.inference_precision: openvino.Type.f32}
    if threads:
        config[properties.inference_num_threads] = threads
    return openvino.Core().compile_model(str(path), "CPU", config)


def call(model, pixel_values: torch.Tensor) -> Callable[[], object]:
    """One inference of the compiled `model` on a batch (through the compiled model's own infer request)."""
    feed = pixel_values.numpy()
    return lambda: model(feed)[0]


def check(onnx_path: Path, model, batches: list[torch.Tensor], labels, source: str, task) -> dict:
    """Convert `onnx_path`, run the result on `batches` and compare its logits with PyTorch's `model`; the figures, with
    `refused` saying why it must not be served (None: within TOLERANCE, the same top-1 on every image)."""
    started = time.perf_counter()
    path = convert(onnx_path)
    seconds = time.perf_counter() - started
    runnable = compiled(path)
    match = checks.against_pytorch(model, batches, lambda pixel_values: runnable(pixel_values)[0])
    figures = {"model": str(path), "bytes": sum((path.parent / n).stat().st_size for n in ("model.xml", "model.bin")),
               "openvino": version(), "inference_precision": "f32", "convert_seconds": round(seconds, 2),
               "max_abs_logit_diff": match.max_abs_logit_diff, "max_relative_logit_diff": match.max_relative_logit_diff,
               "top1_disagreements": match.top1_disagreements, "tolerance": TOLERANCE,
               **checks.score(match.logits, labels, task), "refused": None}
    refused = match.refusal("OpenVINO", source, TOLERANCE)
    if refused:
        figures["refused"] = f"{refused}; {path} is kept for inspection, do not serve it"
    return figures
