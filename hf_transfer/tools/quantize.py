"""Smaller precisions of an exported ONNX model: int8 (onnxruntime's quantization) and fp16 (for GPUs).

int8 is static quantization (onnxruntime `quantize_static`): QDQ format (QuantizeLinear/DequantizeLinear pairs
around each quantized operator, which every execution provider reads, TensorRT's included), int8 weights with one
scale per output channel (a convolution's channels differ in range by orders of magnitude; one scale per tensor
crushes the small ones), and int8 activations whose ranges are calibrated on images prepared exactly as the model
sees them at evaluation. Static quantization needs those images; a model exported without a run (`--images DIR`, no
training images) gets dynamic quantization instead: int8 weights, activations quantized at run time from each
batch's own range (onnxruntime quantizes MatMul/Gemm and convolutions so), since calibrating on the images that then
check it would grade the model on its own answers.

fp16 is onnxruntime's own float16 converter (`onnxruntime.transformers.float16`, shipped with onnxruntime): weights
and arithmetic in half precision, input and output kept float32 so that a caller feeds the same arrays.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from ..errors import UserError

INT8, FP16 = "int8", "fp16"
CALIBRATION_BATCH = 16  # images per calibration call (the ranges are the min/max over all of them)


class _Batches:
    """onnxruntime's CalibrationDataReader protocol: one input feed per call to `get_next`, None when done."""

    def __init__(self, batches: list[torch.Tensor], input_name: str = "pixel_values"):
        self._feeds = iter([{input_name: b.numpy()} for b in batches])

    def get_next(self):
        return next(self._feeds, None)


def quantize_int8(fp32: Path, out: Path, calibration: list[torch.Tensor] | None, preprocess: bool = True) -> dict:
    """Write the int8 model of `fp32` to `out`: static, calibrated on `calibration` (batches of pixel_values), or
    dynamic when there are none. Returns how it was made."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static

    with tempfile.TemporaryDirectory() as tmp:
        source = fp32
        try:
            if preprocess:  # shape inference, graph fusions (Conv+BatchNorm, ...): fewer tensors to quantize
                from onnxruntime.quantization.shape_inference import quant_pre_process

                source = Path(tmp) / "preprocessed.onnx"
                quant_pre_process(str(fp32), str(source), skip_symbolic_shape=False)
            if calibration:
                quantize_static(str(source), str(out), _Batches(calibration), quant_format=QuantFormat.QDQ,
                                per_channel=True, activation_type=QuantType.QInt8, weight_type=QuantType.QInt8)
                how = {"method": "static", "format": "QDQ", "weights": "int8, per output channel",
                       "activations": "int8, ranges calibrated (min/max)",
                       "calibration_images": sum(len(b) for b in calibration)}
            else:
                quantize_dynamic(str(source), str(out), per_channel=True, weight_type=QuantType.QInt8)
                how = {"method": "dynamic", "weights": "int8, per output channel",
                       "activations": "quantized at run time from each batch's range",
                       "why_dynamic": "no training images to calibrate on (a model without a run)"}
        except Exception as exc:  # onnxruntime's failures are long: the first line says which
            out.unlink(missing_ok=True)
            raise UserError(f"onnxruntime cannot quantize this model to int8: {first_line(exc)}") from exc
    how["preprocessed"] = preprocess
    return how


def to_fp16(fp32: Path, out: Path) -> dict:
    """Write the float16 model of `fp32` to `out` (input and output stay float32)."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(fp32))
    try:
        converted = convert_float_to_float16(model, keep_io_types=True)
    except Exception as exc:
        raise UserError(f"onnxruntime's float16 converter cannot convert this model: {first_line(exc)}") from exc
    onnx.save(converted, str(out))
    return {"method": "onnxruntime.transformers.float16", "weights": "float16", "input_output": "float32"}


def first_line(exc: Exception) -> str:
    """The first line of an error (onnxruntime's run to pages; the first says which operator and why)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
