"""Latency of a model on the machine that runs this: PyTorch eager and onnxruntime, timed the same way.

Each figure is one call on a whole batch, timed `repeats` times after `warmup` untimed calls (allocations, kernel
choice); the median and the 90th percentile are reported, per call and per image. Both runtimes get the same number
of threads (`threads`, by default PyTorch's: `OMP_NUM_THREADS` or the machine's cores), so that the table compares
the runtimes and not their thread defaults (onnxruntime's default is the physical cores, PyTorch's may differ).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

WARMUP = 2  # untimed calls before timing: the first call allocates and chooses kernels


def timed_ms(call: Callable[[], object], repeats: int, warmup: int = WARMUP) -> tuple[float, float]:
    """(median, 90th percentile) in milliseconds of `repeats` timed calls of `call` after `warmup` untimed ones."""
    for _ in range(warmup):
        call()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        times.append((time.perf_counter() - started) * 1000)
    return float(np.median(times)), float(np.percentile(times, 90))


def default_threads() -> int:
    return torch.get_num_threads()


def onnx_session(path: str | Path, threads: int | None = None, providers: list[str] | None = None):
    """An onnxruntime session on `path` with `threads` intra-op threads (one inter-op thread: one graph at a time)."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return onnxruntime.InferenceSession(str(path), options, providers=providers or ["CPUExecutionProvider"])


def pytorch_call(model, pixel_values: torch.Tensor) -> Callable[[], object]:
    """One forward pass of a transformers image classifier, as `pipeline` runs it (no autograd)."""
    def call():
        with torch.inference_mode():
            return model(pixel_values=pixel_values).logits
    return call


def onnx_call(session, pixel_values: torch.Tensor) -> Callable[[], object]:
    feed = {session.get_inputs()[0].name: pixel_values.numpy()}
    return lambda: session.run(None, feed)


def batch_of(example: torch.Tensor, size: int) -> torch.Tensor:
    """`size` images for timing, made from the images of `example` (their values do not change the time)."""
    repeats = -(-size // len(example))
    return example.repeat(repeats, 1, 1, 1)[:size].contiguous()


def measure(calls: Callable[[torch.Tensor], Callable[[], object]], example: torch.Tensor, batches: list[int],
            repeats: int, threads: int) -> dict:
    """{"batch_<n>": {median_ms, p90_ms, ms_per_image, images_per_s}} of `calls(batch)` for each batch size, with
    PyTorch held to `threads` threads while it is timed."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        rows = {}
        for size in batches:
            median, p90 = timed_ms(calls(batch_of(example, size)), repeats)
            rows[f"batch_{size}"] = {"median_ms": round(median, 3), "p90_ms": round(p90, 3),
                                     "ms_per_image": round(median / size, 3),
                                     "images_per_s": round(1000 * size / median, 1)}
        return rows
    finally:
        torch.set_num_threads(before)
