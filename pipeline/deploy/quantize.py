"""Precision conversions of an FP32 ONNX model (used by `stages/export.py`).

TensorRT 10.12+/11 builds strongly typed networks, so precision lives in the ONNX graph:

    fp16 = to_fp16(onnx.load("model_fp32.onnx"))                 # float16 weights/compute, float32 I/O
    images = calibration_images(datasets.train, 256, seed=0)     # TRAINING images only
    quantize_int8(Path("model_fp32.onnx"), Path("model_int8.onnx"), images)
    assert not unquantized_nodes(onnx.load("model_int8.onnx"))   # Q/DQ in front of every Conv/Gemm

FP16 uses onnxconverter-common (already a dependency; pure Python, runs anywhere ONNX does). INT8 is
ONNX Runtime's static post-training quantization in QDQ format: per-channel symmetric int8 weights,
symmetric int8 activations (zero point 0, as TensorRT requires), MinMax calibration, biases kept in
float (TensorRT's dequantize layers take 8-bit inputs, not ORT's int32 biases; it fuses the bias itself),
and the classifier's output (the logits) left in float rather than rounded to 256 levels.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from onnxconverter_common import float16
from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process

from pipeline.training.data import ImageSet

QUANTIZED_OPS = ("Conv", "Gemm")
CALIBRATION_BATCH = 32


def to_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """Float16 initializers and compute; the graph's input and output stay float32 (Casts added)."""
    return float16.convert_float_to_float16(model, keep_io_types=True)


def calibration_images(train: ImageSet, count: int, seed: int) -> ImageSet:
    """`count` training images (all if fewer), drawn with a fixed seed: the same set on every run."""
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))
    return train.subset(order[:min(count, len(train))].sort().values)


class _Reader(CalibrationDataReader):
    """Feeds normalised, un-augmented batches of one ImageSet to the calibrator."""

    def __init__(self, images: ImageSet, input_name: str):
        self._batches: Iterator = images.batches(CALIBRATION_BATCH)
        self._name = input_name

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._batches, None)
        return None if batch is None else {self._name: batch[0].numpy()}


def quantize_int8(fp32_path: Path, out_path: Path, images: ImageSet, input_name: str = "input",
                  symmetric_activations: bool = True) -> None:
    """Static INT8 Q/DQ quantization of `fp32_path` into `out_path`, calibrated on `images`.

    `symmetric_activations=False` gives asymmetric uint8 activations instead: ONNX Runtime's fastest
    x86 CPU form (every Conv fuses with its Relu into QLinearConv), which TensorRT does not accept."""
    with tempfile.TemporaryDirectory(prefix="one-quant-") as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(fp32_path), str(prepared))  # shape inference + ORT's basic graph clean-up
        quantize_static(
            str(prepared), str(out_path), _Reader(images, input_name),
            quant_format=QuantFormat.QDQ, per_channel=True,
            activation_type=QuantType.QInt8 if symmetric_activations else QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            op_types_to_quantize=None, calibrate_method=CalibrationMethod.MinMax,
            extra_options={"ActivationSymmetric": symmetric_activations, "WeightSymmetric": True, "QuantizeBias": False,
                           "OpTypesToExcludeOutputQuantization": ["Gemm"]},  # logits stay float
            # no CalibMaxIntermediateOutputs: ORT 1.31 drops (does not merge) the batches it flushes;
            # MinMax keeps only each tensor's min and max per batch, so holding every batch is cheap
        )


def unquantized_nodes(model: onnx.ModelProto) -> list[str]:
    """Conv/Gemm nodes whose data input (fed by Q -> DQ) or weight (fed by DQ) is not quantized.
    Empty for a well-formed Q/DQ model; also lists the problem if the model has no Conv/Gemm at all."""
    producers = {out: node for node in model.graph.node for out in node.output}

    def from_dq(name: str, need_q: bool) -> bool:
        dq = producers.get(name)
        if dq is None or dq.op_type != "DequantizeLinear":
            return False
        return not need_q or getattr(producers.get(dq.input[0]), "op_type", None) == "QuantizeLinear"

    nodes = [n for n in model.graph.node if n.op_type in QUANTIZED_OPS]
    if not nodes:
        return ["(no Conv or Gemm node in the graph)"]
    return [f"{n.op_type} {n.name or n.output[0]}" for n in nodes
            if not (from_dq(n.input[0], need_q=True) and from_dq(n.input[1], need_q=False))]


def nonzero_zero_points(model: onnx.ModelProto) -> list[str]:
    """Q/DQ nodes whose zero point is not 0 (TensorRT takes symmetric quantization only)."""
    initializers = {i.name: i for i in model.graph.initializer}
    bad = []
    for node in model.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear") and len(node.input) > 2:
            zero = initializers.get(node.input[2])
            if zero is None or np.any(numpy_helper.to_array(zero) != 0):
                bad.append(node.name or node.output[0])
    return bad
