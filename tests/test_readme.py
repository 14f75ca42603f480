"""The README's offline walkthrough, run exactly as written: the commands are read from the README.

The first thing a newcomer runs is the number they judge the project by; it once ended at 0.625
test accuracy (and the distilled student at 0.17) because nothing ran it with its defaults.
"""

import json
import re
import shlex
import sys
from pathlib import Path

import pytest

import run_distill
import run_finetune
from hf_transfer.cli.tools import main as tools_main

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MARKER = "<!-- offline walkthrough"
REAL_WEIGHTS = "<!-- offline real weights"
sys.path.insert(0, str(ROOT / "benchmarks"))


def walkthrough(marker: str = MARKER) -> list[list[str]]:
    """The commands of the fenced block after the marker, split as a shell would (comments dropped)."""
    text = README.read_text()
    block = text[text.index(marker):]
    block = block[block.index("```bash") + len("```bash"):]
    block = block[:block.index("```")]
    return [argv for line in block.splitlines() if (argv := shlex.split(line, comments=True))]


def run(argv: list[str]):
    if argv[:2] == ["python", "benchmarks/real_weights.py"]:
        from real_weights import write_timm_folder

        return write_timm_folder(*argv[2:])
    if argv[:2] == ["pip", "install"]:
        return None  # the test extra installs the package; the test runs where it is installed
    if argv[:2] == ["python", "run_finetune.py"]:
        return run_finetune.main(argv[2:])
    if argv[:2] == ["python", "run_distill.py"]:
        return run_distill.main(argv[2:])
    if argv[:3] == ["python", "-m", "hf_transfer"]:
        return tools_main(argv[3:])
    pytest.fail(f"the README's walkthrough has a command this test cannot run: {shlex.join(argv)}")


def test_the_walkthrough_is_the_commands_a_newcomer_needs():
    commands = [shlex.join(argv[:3]) for argv in walkthrough()]
    assert commands[:2] == ["python run_finetune.py --dataset_name", "python run_distill.py --dataset_name"]
    assert "python -m hf_transfer" in commands


def stated_range(what: str) -> tuple[float, float]:
    """The range the README's walkthrough states after `what` ("0.853-0.869")."""
    found = re.search(re.escape(what) + r" (\d\.\d+)-(\d\.\d+)", " ".join(README.read_text().split()))
    assert found, f"the README no longer states a range after {what!r}"
    return float(found.group(1)), float(found.group(2))


@pytest.mark.slow
@pytest.mark.timeout(1200)  # six whole commands: 263-330 s on 2 quiet cores, more on a shared machine
def test_readme_walkthrough_as_written(tmp_path, monkeypatch, capsys):
    """The README's figures within a margin only machine-to-machine rounding explains (360 test images: one image is
    0.003): the ranges the README states are what 1, 2 and 4 threads gave. The student is smaller than its teacher
    (MobileNetV3-Small, 1.5 M parameters, against ResNet-18's 11.2 M), and its export puts its size and latency
    beside the teacher's in its card and in the report."""
    monkeypatch.chdir(tmp_path)  # the commands write runs/ and reports/ where they are run
    results = [run(argv) for argv in walkthrough()]
    finetune, distill, few_labels, alone = results[:4]
    for result, what in ((finetune, "ResNet-18 teacher (test accuracy"), (distill, "fewer parameters (test accuracy"),
                         (few_labels, "without labels (test accuracy"),
                         (alone, "the same student trained alone on the 100 reaches")):
        low, high = stated_range(what)
        assert low - 0.01 <= result["test_accuracy"] <= high + 0.01, (what, result["test_accuracy"])
    low, high = stated_range("agreeing with its teacher on")
    assert low - 0.01 <= distill["test_agreement"] <= high + 0.01
    assert few_labels["train_unlabeled_samples"] == 1193 and alone["train_samples"] == 100
    # the export: int8 within the threshold of fp32, the student's size beside the teacher's
    student = next(tmp_path.glob("runs/*-distilled"))
    exported = json.loads((student / "onnx" / "export_results.json").read_text())
    assert exported["precisions"]["int8"]["refused"] is None
    rows = {(row["model"], row["runtime"]): row for row in exported["latency"]["rows"]}
    own, teacher = rows[("this model", "ONNX fp32")], rows[("teacher (resnet18-digits)", "ONNX fp32")]
    assert own["parameters"] * 7 < teacher["parameters"] and own["bytes"] * 6 < teacher["bytes"]
    assert "| teacher (resnet18-digits) | ONNX fp32 |" in (student / "README.md").read_text()
    # the report compares exactly these runs, with their own numbers, and shows the student's deployment table
    report = json.loads(next(tmp_path.glob("reports/*/summary.json")).read_text())
    assert [round(row["test_accuracy"], 4) for row in report] == [round(r["test_accuracy"], 4)
                                                                   for r in (finetune, distill, few_labels, alone)]
    report_md = next(tmp_path.glob("reports/*/report.md")).read_text()
    assert f"## Deployment of {student.relative_to(tmp_path)}: latency and size" in report_md


@pytest.mark.slow
def test_readme_real_weights_route_as_written(tmp_path, monkeypatch):
    """The offline route to real pretrained weights: 10 digits per class from Google's EfficientNet-Lite0 weights
    reached 0.89-0.96 over seeds 0-2 (benchmarks/precise-bn-cpu-2core.json, digits-10); from scratch 0.87-0.93."""
    monkeypatch.chdir(tmp_path)
    commands = walkthrough(REAL_WEIGHTS)
    assert [argv[:2] for argv in commands] == [["pip", "install"], ["python", "benchmarks/real_weights.py"],
                                               ["python", "run_finetune.py"]]
    results = [run(argv) for argv in commands]
    assert (tmp_path / "checkpoints" / "efficientnet-lite0" / "model.safetensors").is_file()
    assert results[-1]["test_accuracy"] >= 0.85
