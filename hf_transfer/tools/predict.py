"""Predict: the exported ONNX model on image files, each prepared as the run prepared its evaluation images.

`python -m hf_transfer predict EXPORT_DIR IMAGE_OR_FOLDER... [--top_k K] [--precision fp32|int8|fp16]` reads the
model `export` wrote (`EXPORT_DIR/model.onnx`, or `model.int8.onnx` / `model.fp16.onnx`) and takes everything else
from that file's own metadata: the label names, single- or multi-label, and the saved image processor (resize,
centre crop, mean and std), so the deployed model sees the pixels the trained one saw. In Python:

    from hf_transfer.tools.predict import Predictor
    Predictor("runs/resnet18-digits/onnx").predict(["a.png", "b.jpg"], top_k=3)

Each answer is `{"image", "predictions": [{"label", "score"}, ...]}`, best first (softmax probabilities; for a model
with several labels per image, sigmoid scores, plus `labels`: those at or above the threshold it was saved with).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np

from ..errors import UserError

FILES = {"fp32": "model.onnx", "int8": "model.int8.onnx", "fp16": "model.fp16.onnx"}  # as export names them
TOP_K = 5  # pipeline's default
BATCH = 32  # images per onnxruntime call
MULTI_LABEL = "multi_label_classification"


def model_path(export_dir: str | Path, precision: str = "fp32") -> Path:
    """The ONNX file of `precision` in an export folder (a run's folder works too: export writes RUN_DIR/onnx/)."""
    folder = Path(export_dir)
    if precision not in FILES:
        raise UserError(f"unknown precision '{precision}': choose from {', '.join(FILES)}")
    if not (folder / FILES["fp32"]).is_file() and (folder / "onnx" / FILES["fp32"]).is_file():
        folder = folder / "onnx"
    if not (folder / FILES["fp32"]).is_file():  # export always writes the fp32 file: without it, no export
        raise UserError(f"'{export_dir}' holds no exported model (model.onnx): run `python -m hf_transfer export "
                        "RUN_DIR --format onnx` first and pass its output folder (RUN_DIR/onnx)")
    path = folder / FILES[precision]
    if not path.is_file():
        present = [name for name, file in FILES.items() if (folder / file).is_file()]
        raise UserError(f"'{folder}' has no {precision} model ({FILES[precision]}); exported: {', '.join(present)} "
                        f"(export again with {'--quantize int8' if precision == 'int8' else '--precision fp16'})")
    results = folder / "export_results.json"  # absent beside a file copied alone: nothing to say against it
    figures = json.loads(results.read_text()).get("precisions", {}).get(precision, {}) if results.is_file() else {}
    if figures.get("refused"):  # export kept it for inspection only
        raise UserError(f"export refused {path}, it must not be served ({figures['refused']}); export the run again")
    return path


def image_files(paths: list[str | Path]) -> list[Path]:
    """The images to predict: each path a file, or a folder whose image files are taken (sorted, all levels down,
    hidden files and folders left out: a notebook's checkpoints are not pictures)."""
    from ..data.sources import IMAGE_EXTENSIONS

    files = []
    for given in map(Path, paths):
        if given.is_dir():
            found = sorted(p for p in given.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
                           and not any(part.startswith(".") for part in p.relative_to(given).parts))
            if not found:
                raise UserError(f"folder '{given}' holds no image files")
            files += found
        elif given.is_file():
            files.append(given)
        else:
            raise UserError(f"image '{given}' does not exist")
    return files


class Predictor:
    """An exported model in onnxruntime, with the label names and the image processor its file carries."""

    def __init__(self, export_dir: str | Path, precision: str = "fp32"):
        import onnxruntime

        self.path = model_path(export_dir, precision)
        self.session = onnxruntime.InferenceSession(str(self.path), providers=["CPUExecutionProvider"])
        facts = self.session.get_modelmeta().custom_metadata_map
        if "image_processor" not in facts or "id2label" not in facts:
            raise UserError(f"'{self.path}' carries no preprocessing metadata (not written by hf_transfer export): "
                            "export the run again with `python -m hf_transfer export RUN_DIR`")
        self.labels = {int(k): v for k, v in json.loads(facts["id2label"]).items()}
        self.multi_label = facts.get("problem_type") == MULTI_LABEL
        self.threshold = _threshold(self.path, facts) if self.multi_label else None
        self.processor = _processor(facts["image_processor"])
        self.input = self.session.get_inputs()[0]

    def predict(self, images, top_k: int = TOP_K) -> list[dict]:
        """The top `top_k` labels of each image (a path or a PIL image; one, or a list), best first, with their
        scores."""
        if isinstance(images, (str, Path)) or not isinstance(images, (list, tuple)):
            images = [images]  # one image, not the characters of its path
        if top_k < 1:
            raise UserError(f"top_k must be >= 1, not {top_k}")
        scores = self.scores(images)
        answers = []
        for image, row in zip(images, scores):
            best = np.argsort(-row, kind="stable")[:top_k]
            answer = {"image": str(image) if isinstance(image, (str, Path)) else None,
                      "predictions": [{"label": self.labels[i], "score": float(row[i])} for i in best]}
            if self.multi_label:  # the model's own decision, every class at its threshold (not only the top k)
                answer["labels"] = [self.labels[i] for i in np.flatnonzero(row >= self.threshold)]
                answer["threshold"] = self.threshold
            answers.append(answer)
        return answers

    def scores(self, images: list) -> np.ndarray:
        """Probabilities (N x classes): softmax of the logits, or sigmoid for several labels per image."""
        logits = np.concatenate([self.logits(images[i:i + BATCH]) for i in range(0, len(images), BATCH)] or
                                [np.zeros((0, len(self.labels)), np.float32)]).astype(np.float64)
        if self.multi_label:
            return 1.0 / (1.0 + np.exp(-logits))
        shifted = np.exp(logits - logits.max(-1, keepdims=True))  # shifted by the largest: exp cannot overflow
        return shifted / shifted.sum(-1, keepdims=True)

    def logits(self, images: list) -> np.ndarray:
        pixel_values = self.processor(images=[_decoded(i) for i in images], return_tensors="np")["pixel_values"]
        expected = tuple(self.input.shape[1:])
        if tuple(pixel_values.shape[1:]) != expected:  # the exported graph has one input size, its batch is free
            raise UserError(f"the image processor of '{self.path}' makes {tuple(pixel_values.shape[1:])} inputs, the "
                            f"model takes {expected}")
        return self.session.run(None, {self.input.name: pixel_values.astype(np.float32)})[0]


def _decoded(image):
    """An RGB PIL image decoded as training decoded it (data/decoding.py: alpha composited on white, palette and
    grayscale to RGB, 16-bit images scaled rather than clipped)."""
    import PIL.Image

    from ..data.decoding import decode_rgb

    try:
        pixels = decode_rgb(image if isinstance(image, PIL.Image.Image) else {"path": str(image), "bytes": None})
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read image '{image}': {str(exc).strip().splitlines()[0]}") from exc
    return PIL.Image.fromarray(pixels.permute(1, 2, 0).numpy())


def _processor(saved: str):
    """The image processor the file's metadata holds, loaded by AutoImageProcessor as `pipeline` and export load
    the run's preprocessor_config.json (the same class, so the same resize and crop arithmetic)."""
    from transformers import AutoImageProcessor

    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "preprocessor_config.json").write_text(saved)
        return AutoImageProcessor.from_pretrained(folder)


def _threshold(path: Path, facts: dict) -> float:
    """The decision threshold of a model with several labels per image: in the file's metadata, else (an export made
    before it was written there) in the config.json export copies beside it."""
    if "multi_label_threshold" in facts:
        return float(facts["multi_label_threshold"])
    config = path.parent / "config.json"
    threshold = json.loads(config.read_text()).get("multi_label_threshold") if config.is_file() else None
    if threshold is None:
        raise UserError(f"'{path}' has several labels per image but records no decision threshold "
                        "(multi_label_threshold): export the run again")
    return float(threshold)


def predict(export_dir: str, images: list[str], top_k: int = TOP_K, precision: str = "fp32",
            output: str | None = None) -> list[dict]:
    """The command: every path checked before the model is loaded, then the answers (written to `output` as JSON)."""
    model_path(export_dir, precision)
    files = image_files(images)
    if output:
        _check_output(Path(output), files)
    answers = Predictor(export_dir, precision).predict(files, top_k)
    if output:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        Path(output).write_text(json.dumps(answers, indent=2) + "\n")
    return answers


def _check_output(output: Path, files: list[Path]) -> None:
    """--output refused before any prediction: a folder, an input image (it would be overwritten), a path under a
    file."""
    from ..data.sources import IMAGE_EXTENSIONS

    if output.is_dir():
        raise UserError(f"--output '{output}' is a folder: name a file, e.g. {output / 'predictions.json'}")
    if output.exists() and (output.suffix.lower() in IMAGE_EXTENSIONS
                            or output.resolve() in {f.resolve() for f in files}):
        raise UserError(f"--output '{output}' is an image: it would be overwritten; name a .json file")
    parent = output.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise UserError(f"--output '{output}' cannot be written: '{parent}' is a file")


def line(answer: dict) -> str:
    """One image's answer as the command prints it."""
    best = ", ".join(f"{p['label']} {p['score']:.4f}" for p in answer["predictions"])
    chosen = (f"; labels at threshold {answer['threshold']:g}: {', '.join(answer['labels']) or 'none'}"
              if "labels" in answer else "")
    return f"{answer['image']}: {best}{chosen}"
