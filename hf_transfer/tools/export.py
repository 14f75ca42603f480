"""Export: a saved model to ONNX, checked against PyTorch on the run's own test images.

`python -m hf_transfer export RUN_DIR --format onnx` writes `RUN_DIR/onnx/`: `model.onnx` (torch's
exporter; input `pixel_values` of any batch size, output `logits`), the run's `config.json` and
`preprocessor_config.json` beside it, the same facts in the ONNX file's own metadata (labels, input
size, resize, mean and std, so that a server without transformers can prepare an image), and
`export_results.json`. The export is then run with onnxruntime on the images of the run's test
split (validation when it has none), prepared by the saved image processor as `pipeline` prepares
them, and compared with PyTorch: the largest logit difference must be at most `TOLERANCE` and the
top-1 class the same on every image, else the command fails.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError
from ..run import record as run_args

logger = logging.getLogger(__name__)

TOLERANCE = 1e-4  # largest |logit difference| allowed between onnxruntime and PyTorch
BATCH = 32  # images per comparison batch
SINGLE_FILE_LIMIT = 1_800_000_000  # bytes of weights above which they go to a side file (protobuf's 2 GB limit)


class _Logits(torch.nn.Module):
    """The model as a function of its input tensor alone, returning the logits tensor (not a ModelOutput)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, pixel_values):
        return self.model(pixel_values=pixel_values).logits


def export_onnx(run_dir: str, output: str | None = None, max_images: int | None = None,
                images: str | None = None, opset: int | None = None) -> dict:
    """Export the model saved in `run_dir`, verify it on images, and return what was measured."""
    run, out = Path(run_dir), Path(output) if output else Path(run_dir) / "onnx"
    _check_installed()
    _check_saved_model(run)
    pictures, labels, source = _verification_images(run, images, max_images)  # before the model: a refusal is quick
    model, processor = _load(run)
    pixel_values = [processor(images=pictures[i:i + BATCH], return_tensors="pt")["pixel_values"]
                    for i in range(0, len(pictures), BATCH)]

    out.mkdir(parents=True, exist_ok=True)
    path = out / "model.onnx"
    started = time.perf_counter()
    to_onnx(model, pixel_values[0][:1].repeat(2, 1, 1, 1), path, opset)  # batch 2: a batch of 1 would fix the size
    _add_metadata(path, model.config, processor)
    for name in ("config.json", "preprocessor_config.json"):
        shutil.copy(run / name, out / name)
    seconds = time.perf_counter() - started

    worst, disagree, predicted = _compare(model, path, pixel_values)
    results = {"format": "onnx", "model": str(path), "images": len(pictures), "image_source": source,
               "max_abs_logit_diff": worst, "top1_disagreements": disagree, "tolerance": TOLERANCE,
               "export_seconds": round(seconds, 2), "onnx_bytes": _size(path)}
    if labels is not None and not isinstance(labels[0], list):  # one class per image: the exported model's score
        results["onnx_accuracy"] = float((predicted == np.asarray(labels)).mean())
    (out / "export_results.json").write_text(json.dumps(results, indent=2) + "\n")
    if worst > TOLERANCE or disagree:
        raise UserError(f"the ONNX model differs from PyTorch on {source}: largest logit difference {worst:.2e} "
                        f"(allowed {TOLERANCE:g}), top-1 different on {disagree} of {len(pictures)} images; "
                        f"{path} is kept for inspection, do not serve it")
    return results


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

    from ..models.loading import _from_pretrained

    model = _from_pretrained("model", str(run)).eval().float()
    return model, AutoImageProcessor.from_pretrained(str(run))


def _verification_images(run: Path, folder: str | None, max_images: int | None) -> tuple[list, list | None, str]:
    """(images, their labels or None, what they are) to compare on: the image files under `folder`, or the test
    split (else validation) of the data set the run was trained on, as its run_args.json records it (a
    checkpoint-N folder's is its run's)."""
    import PIL.Image

    from ..data.decoding import decode_rgb
    from ..data.sources import IMAGE_EXTENSIONS

    if folder is not None:
        files = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)[:max_images]
        if not files:
            raise UserError(f"--images '{folder}' holds no image files")
        cells, labels, source = [{"path": str(p), "bytes": None} for p in files], None, f"{len(files)} images of {folder}"
    else:
        saved = run_args.read(run) or run_args.read(run.parent)
        if saved is None:
            raise UserError(f"'{run}' has no run_args.json (not a run of this project) to find its test images; "
                            "pass --images DIR with images to compare on")
        split, stored, data = _run_split(saved)
        stored = stored.select(range(min(max_images or len(stored), len(stored))))
        cells, labels = stored[data.image_column], stored[data.label_column]
        source = f"{len(stored)} images of the run's {split} split"
    pictures = []
    for cell in cells:
        try:
            pictures.append(PIL.Image.fromarray(decode_rgb(cell).permute(1, 2, 0).numpy()))
        except (OSError, ValueError) as exc:
            raise UserError(f"cannot decode {cell.get('path') or 'an image'} of {source}: {exc}") from exc
    return pictures, labels, source


def _run_split(saved: dict):
    """(split name, its rows, the data set) of the run's own data: the data flags as the run recorded them (its
    folders whole: from any working folder), the same seed, the same split."""
    from ..config.flags import data_arguments
    from ..run.assembly import load_data

    data_args = data_arguments(saved, instead="pass --images DIR with images to compare on")
    data = load_data(data_args, saved["shaping"].get("training.seed", 42))
    split, rows = ("test", data.test) if data.test is not None else ("validation", data.validation)
    return split, rows.with_format(None), data


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


def _add_metadata(path: Path, config, processor) -> None:
    """The facts a server needs to prepare an image and name the class, in the ONNX file itself."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    facts = {
        "id2label": json.dumps({int(k): v for k, v in config.id2label.items()}),
        "problem_type": config.problem_type or "single_label_classification",
        "image_processor": processor.to_json_string(),
        "producer": "hf_transfer export",
    }
    del proto.metadata_props[:]
    for key, value in facts.items():
        proto.metadata_props.add(key=key, value=value)
    onnx.save(proto, str(path))


def _compare(model, path: Path, batches: list[torch.Tensor]) -> tuple[float, int, np.ndarray]:
    """(largest |logit difference|, images whose top-1 differs, onnxruntime's top-1) against PyTorch."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    worst, disagree, predicted = 0.0, 0, []
    for pixel_values in batches:
        with torch.no_grad():
            expected = model(pixel_values=pixel_values).logits.numpy()
        got = session.run(["logits"], {"pixel_values": pixel_values.numpy()})[0]
        worst = max(worst, float(np.abs(got - expected).max()))
        disagree += int((got.argmax(-1) != expected.argmax(-1)).sum())
        predicted.append(got.argmax(-1))
    return worst, disagree, np.concatenate(predicted)


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.parent.glob(path.name + "*"))
