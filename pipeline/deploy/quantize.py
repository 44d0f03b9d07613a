"""Precision conversions of an FP32 ONNX model (used by `stages/export.py`).

TensorRT 10.12+/11 builds strongly typed networks, so precision lives in the ONNX graph:

    fp16 = to_fp16(onnx.load("model_fp32.onnx"))                 # float16 weights/compute, float32 I/O
    images = calibration_images(datasets.train, 1024, seed=0)    # TRAINING images, balanced over classes
    quantize_int8(Path("model_fp32.onnx"), Path("model_int8.onnx"), images, target="int8",
                  recipe=Recipe("minmax", keep_float=False))
    assert not unquantized_nodes(onnx.load("model_int8.onnx"))   # Q/DQ in front of every Conv/Gemm

FP16 uses onnxconverter-common (pure Python, runs anywhere ONNX does). INT8 is ONNX Runtime's static
post-training quantization in QDQ format with per-channel symmetric int8 weights, in one of two forms:

- `int8` (for TensorRT): symmetric int8 activations (zero point 0, as TensorRT requires);
- `int8_cpu` (for ONNX Runtime on x86 CPUs): asymmetric uint8 activations, the form whose every Conv
  ONNX Runtime's CPU kernels fuse into an integer QLinearConv (TensorRT rejects it).

Biases stay float (TensorRT's dequantize layers take 8-bit inputs, not ORT's int32 biases) and the
classifier's output (the logits) is not rounded to 256 levels. A `Recipe` names the calibration method
(ORT's min-max, entropy or percentile) and whether the two layers most sensitive to quantization, the
first convolution (raw pixels in) and the classifier (logits out), stay in float.

ONE-E's gate-weighted sum of the branch logits (Mul, then ReduceSum over the branches) always stays in
float (`weighted_sum_nodes`): with a Q/DQ pair between the two, OpenVINO (2026.4, CPU plugin) computes the
ReduceSum of a rank-3 tensor for the first image of a batch only, the rest zeros or garbage (docs/DEPLOY.md).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import tempfile
import warnings
from pathlib import Path
from typing import Iterator, Literal

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
INT8_TARGETS = {"int8": "TensorRT (symmetric int8 Q/DQ)",
                "int8_cpu": "ONNX Runtime on x86 CPUs (uint8 activations, int8 per-channel weights)"}
Method = Literal["minmax", "entropy", "percentile"]
_METHODS = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
            "percentile": CalibrationMethod.Percentile}


@dataclasses.dataclass(frozen=True)
class Recipe:
    """One post-training quantization configuration the export stage may try."""

    method: Method
    keep_float: bool  # first Conv and the classifier stay float

    @property
    def label(self) -> str:
        return f"{self.method}, " + ("first conv + classifier in float" if self.keep_float else "every layer int8")


def recipes(methods: list[str]) -> list[Recipe]:
    """The search order: every method with every layer quantized, then the same keeping the most
    sensitive layers in float (fewer integer kernels, so tried only when the first round fails)."""
    return [Recipe(m, keep) for keep in (False, True) for m in methods]


def to_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """Float16 initializers and compute; the graph's input and output stay float32 (Casts added). Weights
    below float16's range are flushed to its smallest value; the converter warns once per weight, which
    says nothing the accuracy check does not."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return float16.convert_float_to_float16(model, keep_io_types=True)


def calibration_images(train: ImageSet, count: int, seed: int) -> ImageSet:
    """`count` training images (all if fewer), the same number from each class as far as the classes
    allow, drawn with a fixed seed: the same set on every run."""
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))
    labels = train.labels[order]
    classes = labels.unique()
    # rank of each image within its class, in the shuffled order: take ranks 0, 1, ... across classes
    rank = torch.zeros(len(order), dtype=torch.long)
    for c in classes:
        members = (labels == c).nonzero().flatten()
        rank[members] = torch.arange(len(members))
    chosen = order[torch.argsort(rank * len(order) + torch.arange(len(order)))[:min(count, len(train))]]
    return train.subset(chosen.sort().values)


class _Reader(CalibrationDataReader):
    """Feeds normalised, un-augmented batches of one ImageSet to the calibrator."""

    def __init__(self, images: ImageSet, input_name: str):
        self._batches: Iterator = images.batches(CALIBRATION_BATCH)
        self._name = input_name

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._batches, None)
        return None if batch is None else {self._name: batch[0].numpy()}


def sensitive_nodes(model: onnx.ModelProto) -> list[str]:
    """The first Conv and the last Gemm (the classifier), by node name."""
    convs = [n.name for n in model.graph.node if n.op_type == "Conv"]
    gemms = [n.name for n in model.graph.node if n.op_type == "Gemm"]
    return convs[:1] + gemms[-1:]


def weighted_sum_nodes(model: onnx.ModelProto) -> list[str]:
    """The nodes whose output a ReduceSum reads: in ONE-E, the Mul of the gate weights and the stacked branch
    logits (the branch has none). Kept in float, no Q/DQ lies between them and the sum: see the module's
    docstring for the runtime that computes that pattern wrongly."""
    summed = {n.input[0] for n in model.graph.node if n.op_type == "ReduceSum"}
    return [n.name for n in model.graph.node if summed.intersection(n.output)]


def quantize_int8(fp32_path: Path, out_path: Path, images: ImageSet, input_name: str = "input", *,
                  target: str = "int8", recipe: Recipe = Recipe("minmax", False)) -> list[str]:
    """Static INT8 Q/DQ quantization of `fp32_path` into `out_path`, calibrated on `images`, in the
    `target` form (see INT8_TARGETS). Returns the names of the nodes kept in float: the recipe's, then
    `weighted_sum_nodes`."""
    symmetric = target == "int8"
    with tempfile.TemporaryDirectory(prefix="one-quant-") as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(fp32_path), str(prepared))  # shape inference + ORT's basic graph clean-up
        graph = onnx.load(str(prepared))
        kept = (sensitive_nodes(graph) if recipe.keep_float else []) + weighted_sum_nodes(graph)
        with contextlib.redirect_stdout(io.StringIO()):  # the histogram calibrators print their progress
            quantize_static(
                str(prepared), str(out_path), _Reader(images, input_name), quant_format=QuantFormat.QDQ,
                per_channel=True, activation_type=QuantType.QInt8 if symmetric else QuantType.QUInt8,
                weight_type=QuantType.QInt8, nodes_to_exclude=kept, calibrate_method=_METHODS[recipe.method],
                extra_options={"ActivationSymmetric": symmetric, "WeightSymmetric": True, "QuantizeBias": False,
                               "OpTypesToExcludeOutputQuantization": ["Gemm"]},  # logits stay float
                # no CalibMaxIntermediateOutputs: ORT 1.31 drops (does not merge) the batches it flushes
            )
    return kept


def unquantized_nodes(model: onnx.ModelProto, kept_float: list[str] = ()) -> list[str]:
    """Conv/Gemm nodes, other than `kept_float`, whose data input (fed by Q -> DQ) or weight (fed by
    DQ) is not quantized. Also lists the problem if the model has no Conv/Gemm at all."""
    producers = {out: node for node in model.graph.node for out in node.output}

    def from_dq(name: str, need_q: bool) -> bool:
        dq = producers.get(name)
        if dq is None or dq.op_type != "DequantizeLinear":
            return False
        return not need_q or getattr(producers.get(dq.input[0]), "op_type", None) == "QuantizeLinear"

    nodes = [n for n in model.graph.node if n.op_type in QUANTIZED_OPS]
    if not nodes:
        return ["(no Conv or Gemm node in the graph)"]
    return [f"{n.op_type} {n.name or n.output[0]}" for n in nodes if n.name not in kept_float
            and not (from_dq(n.input[0], need_q=True) and from_dq(n.input[1], need_q=False))]


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
