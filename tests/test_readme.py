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
def test_readme_walkthrough_as_written(tmp_path, monkeypatch, capsys):
    """The README's figures within a margin only machine-to-machine rounding explains: measured with 1, 2 and 4
    threads, fine-tuning 0.975-0.989 on the digits' test split, the distilled student 0.981-0.994 agreeing with
    its teacher on 0.969-0.986, the student with 100 labels and the rest unlabeled 0.978-0.986, the same student
    trained alone on the 100 within the range the README states (360 test images: one image is 0.003)."""
    monkeypatch.chdir(tmp_path)  # the commands write runs/ and reports/ where they are run
    results = [run(argv) for argv in walkthrough()]
    finetune, distill, few_labels, alone = results[:4]
    assert finetune["test_accuracy"] >= 0.965
    assert distill["test_accuracy"] >= 0.975 and distill["test_agreement"] >= 0.96
    assert few_labels["train_unlabeled_samples"] == 1193 and few_labels["test_accuracy"] >= 0.97
    low, high = stated_range("the same student trained alone on the 100 reaches")
    assert alone["train_samples"] == 100 and low - 0.01 <= alone["test_accuracy"] <= high + 0.01
    # the report compares exactly these runs, with their own numbers
    report = json.loads(next(tmp_path.glob("reports/*/summary.json")).read_text())
    assert [round(row["test_accuracy"], 4) for row in report] == [round(r["test_accuracy"], 4)
                                                                   for r in (finetune, distill, few_labels, alone)]


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
