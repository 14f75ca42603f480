"""`python -m hf_transfer predict EXPORT_DIR IMAGES...`: the exported ONNX model on image files of any size and mode,
prepared from the file's own metadata, answers as the trained PyTorch model does through `pipeline`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import PIL.Image
import pytest
from helpers import make_checkpoint, random_images
from transformers import pipeline

from hf_transfer.cli.tools import main as tools
from hf_transfer.errors import UserError, run_cli
from hf_transfer.tools.predict import Predictor, line

# (width, height, mode) of the images predicted: upscaled 8x8 digits, none at the model's 32 px, some not square, in
# every mode a user's folder holds (RGBA with a half-transparent background, which training composites on white)
SHAPES = [(8, 8, "RGB"), (40, 40, "RGB"), (64, 48, "L"), (29, 57, "RGBA"), (100, 33, "P"), (200, 200, "RGB"),
          (33, 33, "L"), (57, 29, "RGBA"), (17, 90, "RGB"), (120, 64, "P"), (45, 45, "RGBA"), (96, 96, "L")]


def digit_images(folder: Path, repeat: int = 2) -> list[Path]:
    """Real sklearn digits (not the ones the run's data set shows at 8 px) saved at SHAPES' sizes and modes."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    folder.mkdir(parents=True)
    paths = []
    for i, (width, height, mode) in enumerate(SHAPES * repeat):
        pixels = np.round(digits.images[-1 - i] * (255 / 16)).astype(np.uint8)
        image = PIL.Image.fromarray(pixels).resize((width, height), PIL.Image.NEAREST)
        if mode == "RGBA":  # the strokes opaque, the background half transparent
            image = image.convert("RGBA")
            image.putalpha(PIL.Image.fromarray(np.where(np.asarray(image.convert("L")) > 60, 255, 120).astype(np.uint8)))
        else:
            image = image.convert(mode)
        paths.append(folder / f"{i:02d}-{width}x{height}-{mode}.png")
        image.save(paths[-1])
    return paths


def as_trained(path: Path) -> PIL.Image.Image:
    """The picture as training decodes it, written out with PIL alone: alpha composited on white, then RGB
    (`pipeline` given a path would drop the alpha instead)."""
    image = PIL.Image.open(path)
    if image.mode == "RGBA":
        image = PIL.Image.alpha_composite(PIL.Image.new("RGBA", image.size, "white"), image)
    return image.convert("RGB")


def by_label(predictions: list[dict]) -> dict[str, float]:
    return {p["label"]: p["score"] for p in predictions}


@pytest.fixture(scope="module")
def exported(digits_run, tmp_path_factory):
    """The digits run exported in fp32 and int8 (no fp16), and mixed-size digits to predict."""
    run_dir, _ = digits_run
    out = tmp_path_factory.mktemp("export") / "onnx"
    tools(["export", str(run_dir), "--output", str(out), "--quantize", "int8", "--max_images", "64",
           "--calibration_images", "128", "--latency_repeats", "0"])
    return run_dir, out, digit_images(tmp_path_factory.mktemp("images") / "digits")


@pytest.mark.slow
def test_onnx_answers_as_pytorch_on_mixed_size_images_in_fp32_and_int8(exported):
    run_dir, out, images = exported
    classes = 10
    reference = pipeline("image-classification", model=str(run_dir))([as_trained(p) for p in images], top_k=classes)
    fp32 = Predictor(out).predict(images, top_k=classes)
    assert [a["image"] for a in fp32] == [str(p) for p in images]
    worst = max(abs(by_label(r)[k] - v) for r, a in zip(reference, fp32) for k, v in by_label(a["predictions"]).items())
    assert worst <= 1e-4, worst
    assert [a["predictions"][0]["label"] for a in fp32] == [r[0]["label"] for r in reference]
    assert all(abs(sum(by_label(a["predictions"]).values()) - 1) < 1e-6 for a in fp32)  # softmax, not sigmoid

    int8 = Predictor(out, "int8").predict(images, top_k=1)
    agreement = np.mean([a["predictions"][0]["label"] == r[0]["label"] for a, r in zip(int8, reference)])
    assert agreement >= 0.95, agreement
    with pytest.raises(UserError, match=r"no fp16 model \(model.fp16.onnx\); exported: fp32, int8"):
        Predictor(out, "fp16")


@pytest.mark.slow
def test_a_folder_single_files_a_second_call_and_a_lone_onnx_file_give_the_same_answers(exported, tmp_path, capsys):
    _, out, images = exported
    predictor = Predictor(out)
    first = predictor.predict(images, top_k=3)
    assert predictor.predict(images, top_k=3) == first  # a second call: nothing kept from the first
    assert Predictor(out).predict([PIL.Image.open(p) for p in images[:3]], top_k=3)[0]["predictions"] == \
        first[0]["predictions"]  # PIL images as well as paths

    # the command on the folder (sorted, all of it) and on single files; --output holds what it printed
    tools(["predict", str(out), str(images[0].parent), "--top_k", "3", "--output", str(tmp_path / "folder.json")])
    printed = capsys.readouterr().out.strip().splitlines()
    tools(["predict", str(out), *map(str, images[:2]), "--top_k", "3", "--output", str(tmp_path / "files.json")])
    folder = json.loads((tmp_path / "folder.json").read_text())
    assert folder == first and json.loads((tmp_path / "files.json").read_text()) == first[:2]
    assert printed[:len(images)] == [line(a) for a in first] and printed[-1] == f"written to {tmp_path / 'folder.json'}"

    # the run's folder is taken for its onnx/ folder; a model.onnx copied alone carries its own preprocessing
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(out / "model.onnx", alone / "model.onnx")
    assert Predictor(alone).predict(images, top_k=3) == first
    assert Predictor(out.parent).path == out / "model.onnx"


@pytest.fixture(scope="module")
def multi_label(tmp_path_factory):
    """A model with several labels per image (random weights: the arithmetic is what is tested) exported in fp32
    without a run, and the images it was checked on (any sizes, RGB and RGBA)."""
    root = tmp_path_factory.mktemp("multi-label")
    model = Path(make_checkpoint("hf-resnet", root / "model", num_labels=4))
    config = json.loads((model / "config.json").read_text())
    config.update(problem_type="multi_label_classification", multi_label_threshold=0.5)
    (model / "config.json").write_text(json.dumps(config))
    (root / "images").mkdir()
    for i, image in enumerate(random_images(4, size=20) + random_images(2, size=50, mode="RGBA", seed=1)):
        image.save(root / "images" / f"{i}.png")
    tools(["export", str(model), "--output", str(root / "onnx"), "--images", str(root / "images"),
           "--latency_repeats", "0"])
    return model, root / "onnx", sorted((root / "images").iterdir())


def test_several_labels_per_image_get_sigmoid_scores_and_the_saved_threshold(multi_label):
    model, out, files = multi_label
    metadata = {p.key: p.value for p in onnx.load(str(out / "model.onnx")).metadata_props}
    assert metadata["multi_label_threshold"] == "0.5"  # the decision travels with the file

    answers = Predictor(out).predict(files, top_k=4)
    reference = pipeline("image-classification", model=str(model))([as_trained(p) for p in files], top_k=4)
    for answer, expected in zip(answers, reference):
        scores = by_label(answer["predictions"])
        assert max(abs(scores[k] - v) for k, v in by_label(expected).items()) <= 1e-4
        assert answer["threshold"] == 0.5
        assert answer["labels"] == [f"old{i}" for i in range(4) if scores[f"old{i}"] >= 0.5]  # every class's decision
    assert any(answer["labels"] for answer in answers) and sum(len(a["labels"]) for a in answers) < 4 * len(answers)
    assert "; labels at threshold 0.5: " in line(answers[0])


def refusal(argv: list[str], capsys) -> str:
    try:
        code = run_cli(tools, ["predict", *argv])
    except SystemExit as exc:  # argparse's own refusals
        code = exc.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, (argv, code, err)
    return err[0]


def test_bad_input_is_refused_in_one_line_before_any_work(multi_label, tmp_path, capsys):
    _, out, images = multi_label
    answers = tmp_path / "answers.json"
    empty = tmp_path / "empty"
    empty.mkdir()
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    assert "run `python -m hf_transfer export" in refusal([str(empty), str(images[0])], capsys)
    assert "'nope.png' does not exist" in refusal([str(out), str(images[0]), "nope.png"], capsys)
    assert f"folder '{empty}' holds no image files" in refusal([str(out), str(empty)], capsys)
    assert f"cannot read image '{broken}'" in refusal([str(out), str(images[0]), str(broken),
                                                       "--output", str(answers)], capsys)
    assert "invalid choice: 'bf16'" in refusal([str(out), str(images[0]), "--precision", "bf16"], capsys)
    message = refusal([str(out), str(images[0]), "--precision", "fp16"], capsys)
    assert "no fp16 model (model.fp16.onnx); exported: fp32" in message and "--precision fp16" in message
    assert "--top_k must be >= 1" in refusal([str(out), str(images[0]), "--top_k", "0"], capsys)
    assert not answers.exists()
    with pytest.raises(UserError, match="unknown precision 'int4': choose from fp32, int8, fp16"):
        Predictor(out, "int4")  # the Python API refuses as the command does
    # --output: a folder, an input image (it would be overwritten), a path under a file; before any prediction
    assert "is a folder: name a file" in refusal([str(out), str(images[0]), "--output", str(tmp_path)], capsys)
    victim = tmp_path / "victim.png"
    shutil.copy(images[0], victim)
    assert "is an image: it would be overwritten" in refusal([str(out), str(victim), "--output", str(victim)], capsys)
    assert victim.read_bytes() == images[0].read_bytes()
    assert "cannot be written" in refusal([str(out), str(images[0]), "--output", str(victim / "a.json")], capsys)
    # the Python API: one path is one image (not its characters); top_k below 1 refused
    assert len(Predictor(out).predict(str(images[0]))) == 1
    with pytest.raises(UserError, match="top_k must be >= 1"):
        Predictor(out).predict(images, top_k=0)


def test_a_file_export_refused_is_not_served(multi_label, tmp_path, capsys):
    """export keeps a refused file for inspection ("do not serve it"); predict must not serve it either."""
    _, out, images = multi_label
    copy = tmp_path / "onnx"
    shutil.copytree(out, copy)
    results = json.loads((copy / "export_results.json").read_text())
    assert results["precisions"]["fp32"]["refused"] is None  # what export wrote for the file it passed
    assert Predictor(copy).predict(images[:1])  # served
    results["precisions"]["fp32"]["refused"] = "the ONNX model differs from PyTorch"
    (copy / "export_results.json").write_text(json.dumps(results))
    assert f"export refused {copy / 'model.onnx'}, it must not be served" in refusal([str(copy), str(images[0])],
                                                                                      capsys)
