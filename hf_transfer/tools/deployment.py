"""The latency and size table of an export, measured on the machine that exports, and its section of the model card.

Rows: the model in PyTorch (fp32, eager), each ONNX file export wrote (fp32, int8, fp16) and its OpenVINO fp32 model
(`--openvino`: OpenVINO's CPU plugin, f32 arithmetic, `INFERENCE_NUM_THREADS` the table's thread count), timed by
`tools/latency.py` at batch 1 and a throughput batch with one thread count for all; and for a distilled student
whose teacher's folder still exists, the teacher in PyTorch and in ONNX fp32 (exported to a temporary folder), with
its test accuracy and its agreement with the student as the run measured them (test_results.json).
"""

from __future__ import annotations

import json
import logging
import os
import platform
import tempfile
from pathlib import Path

import torch

from . import checks, openvino_ir
from .latency import default_threads, measure, onnx_call, onnx_session, pytorch_call

logger = logging.getLogger(__name__)

SECTION = "export-latency"  # the card section's marker: a second export replaces it
_RUNTIMES = {"fp32": "ONNX fp32", "int8": "ONNX int8", "fp16": "ONNX fp16"}


def latency_table(run: Path, model, task, results: dict, example: torch.Tensor, precision, pictures: list) -> dict:
    """The table (export_results.json's "latency"): each row's runtime, size, parameters, accuracy, agreement and
    timings; `example`: a batch of the check's prepared images (timing inputs are made of them)."""
    threads = default_threads()
    batches = sorted({1, precision.latency_batch})
    time_it = lambda calls, x=example: measure(calls, x, batches, precision.latency_repeats, threads)  # noqa: E731
    parameters = sum(p.numel() for p in model.parameters())
    own = {"model": "this model", "parameters": parameters}
    key = "f1" if task.multi_label else "accuracy"  # several labels per image: micro-F1 at the threshold
    rows = [{**own, "runtime": "PyTorch fp32", "bytes": _weights_bytes(run), "accuracy": results.get(f"onnx_{key}"),
             **time_it(lambda x: pytorch_call(model, x))}]
    for name, figures in results["precisions"].items():
        session = onnx_session(figures["model"], threads)
        score = results.get(f"onnx_{key}") if name == "fp32" else figures.get(key)
        rows.append({**own, "runtime": _RUNTIMES[name], "bytes": figures["bytes"], "accuracy": score,
                     "agreement": None if name == "fp32" else checks.agreement(figures),
                     **time_it(lambda x, s=session: onnx_call(s, x))})
    if "openvino" in results:
        figures, compiled = results["openvino"], openvino_ir.compiled(results["openvino"]["model"], threads)
        rows.append({**own, "runtime": openvino_ir.RUNTIME, "bytes": figures["bytes"],
                     "accuracy": figures.get(key), "agreement": None,
                     **time_it(lambda x: openvino_ir.call(compiled, x))})
    rows += _teacher_rows(run, pictures, time_it, threads, task)
    score = f"micro-F1 at threshold {task.threshold:g}" if task.multi_label else "accuracy"
    return {"threads": threads, "batches": batches, "repeats": precision.latency_repeats, "warmup": 2,
            "images": results["image_source"], "score": score,
            "files": str(Path(results["model"]).parent.resolve()), "machine": _machine(), "rows": rows}


def _teacher_rows(run: Path, pictures: list, time_it, threads: int, task) -> list[dict]:
    """The teacher of a distilled run, when its folder is still there: PyTorch and ONNX fp32 at its own input size,
    with its test score and its agreement with the student as the run measured them (several labels per image: its
    micro-F1; the run's agreement counts whole label sets, not the table's per-class decisions, so it is left out)."""
    from transformers import AutoImageProcessor

    from ..models.loading import _from_pretrained
    from ..run import record
    from .export import to_onnx

    saved = record.read(run) or record.read(run.parent) or {}
    teacher = (saved.get("shaping") or {}).get("training.teacher_model_name_or_path")
    if not teacher:
        return []
    if not (Path(teacher) / "config.json").is_file():
        logger.warning("the teacher's folder %s is no longer there: the table leaves its rows out", teacher)
        return []
    test_path = run / "test_results.json"
    test = json.loads(test_path.read_text()) if test_path.is_file() else {}
    model = _from_pretrained("teacher", teacher).eval().float()
    example = AutoImageProcessor.from_pretrained(teacher)(images=pictures[:8], return_tensors="pt")["pixel_values"]
    score, agreement = (("test_teacher_f1", None) if task.multi_label
                        else ("test_teacher_accuracy", test.get("test_agreement")))
    own = {"model": f"teacher ({Path(teacher).name})", "parameters": sum(p.numel() for p in model.parameters()),
           "accuracy": test.get(score), "agreement": agreement}
    rows = [{**own, "runtime": "PyTorch fp32", "bytes": _weights_bytes(Path(teacher)),
             **time_it(lambda x: pytorch_call(model, x), example)}]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "teacher.onnx"
        to_onnx(model, example[:1].repeat(2, 1, 1, 1), path)
        session = onnx_session(path, threads)
        rows.append({**own, "runtime": "ONNX fp32", "bytes": sum(p.stat().st_size for p in Path(tmp).iterdir()),
                     **time_it(lambda x: onnx_call(session, x), example)})
    return rows


def _weights_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors")) or \
        sum(p.stat().st_size for p in folder.glob("*.bin"))


def _machine() -> dict:
    import onnxruntime

    machine = {"cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
               "load_average": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
               "platform": platform.platform(), "torch": torch.__version__, "onnxruntime": onnxruntime.__version__}
    if openvino_ir.version():
        machine["openvino"] = openvino_ir.version()
    return machine


def cells(table: dict) -> tuple[list[str], list[list[str]], str]:
    """(column titles, each row's cells, the note saying how it was measured): the table as the card, the command and
    the report show it."""
    large = max(table["batches"])
    score = table.get("score", "accuracy")
    titles = ["model", "runtime", "size (MB)", "parameters (M)", f"test {score}", "agreement",
              "batch 1 median / p90 (ms)", f"batch {large} median / p90 (ms)", f"batch {large} images/s"]
    rows = []
    for row in table["rows"]:
        one, many = row["batch_1"], row[f"batch_{large}"]
        rows.append([row["model"], row["runtime"], f"{row['bytes'] / 1e6:.2f}", f"{row['parameters'] / 1e6:.3f}",
                     _fraction(row.get("accuracy")), _fraction(row.get("agreement")),
                     f"{one['median_ms']:.2f} / {one['p90_ms']:.2f}", f"{many['median_ms']:.2f} / {many['p90_ms']:.2f}",
                     f"{many['images_per_s']:.0f}"])
    machine = table["machine"]
    openvino = (f", openvino {machine['openvino']}" if machine.get("openvino")
                and any(row["runtime"] == openvino_ir.RUNTIME for row in table["rows"]) else "")
    note = (f"Measured by `python -m hf_transfer export` on {machine['cpu']} ({machine['cpu_count']} cores), "
            f"{table['threads']} thread(s) for every runtime, median and 90th percentile of {table['repeats']} calls "
            f"after {table['warmup']} warm-up calls (torch {machine['torch']}, onnxruntime {machine['onnxruntime']}{openvino}). "
            f"Test {score} on {table['images']}; agreement: with this model in fp32 (a smaller precision: "
            f"{'the same top-1' if score == 'accuracy' else 'the same decision per class'}) or with this student "
            "(the teacher, as the run measured it).")
    load = machine.get("load_average")
    if load is not None and machine.get("cpu_count") and load > machine["cpu_count"]:
        note += (f" The machine was busy (load average {load:g} on {machine['cpu_count']} cores): the times are slower "
                 "than a quiet machine's.")
    return titles, rows, note


def markdown(table: dict) -> str:
    """The table as the card and the command show it."""
    titles, rows, note = cells(table)
    lines = ["| " + " | ".join(titles) + " |", "|" + "---|" * len(titles)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines + ["", note])


def _fraction(value) -> str:
    return "-" if value is None else f"{value:.4f}"


RECORD = "deployment.json"  # in the run's folder: its latest export's table, which the report shows


def forget(run: Path, out: Path) -> None:
    """Remove the run's table (card section and deployment.json) when it describes the files of `out`, which an export
    is about to replace: if this export then writes no table (--latency_repeats 0, a refusal), none describes files
    that are gone. A table of files elsewhere still describes them and stays."""
    from ..run.card import remove_section

    table = exported_table(run)
    if table is None or Path(table.get("files", run / "onnx")).resolve() != out.resolve():
        return
    (run / RECORD).unlink()
    if (run / "README.md").is_file():
        remove_section(run / "README.md", SECTION)


def exported_table(run: Path) -> dict | None:
    """The latency table of the run's latest export (wherever its files went), None when it was never exported."""
    path = run / RECORD
    return json.loads(path.read_text()) if path.is_file() else None


def update_card(run: Path, table: dict) -> str | None:
    """Write the table into the run's model card (README.md), replacing the section an earlier export wrote, and
    beside it as deployment.json for the report; None when the folder has no card (a checkpoint-N folder, a model
    without a run)."""
    from ..run.card import replace_section

    card = run / "README.md"
    if not card.is_file():
        return None
    replace_section(card, SECTION, "## Deployment: latency and size\n\n" + markdown(table))
    (run / RECORD).write_text(json.dumps(table, indent=2) + "\n")
    return str(card)
