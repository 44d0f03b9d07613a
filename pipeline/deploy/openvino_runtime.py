"""OpenVINO on the CPU: an exported ONNX file compiled at a stated precision, one infer request.

    model = compile_onnx(path, "fp32", threads=2)   # StageSkipped (with the install command) without OpenVINO
    logits = model(images)                           # numpy in, numpy out, like an ONNX Runtime session
    model.properties                                 # the compiled model's own settings, as recorded in the bench

OpenVINO reads ONNX directly, QDQ int8 included (it runs the `int8_cpu` file's quantized layers in int8).
On CPUs with bfloat16 it compiles float layers to bf16 unless told otherwise, so every model here is
compiled with an explicit INFERENCE_PRECISION_HINT (f32 for the fp32 and int8_cpu forms, bf16 for the
bf16 form) and the hint the compiled model reports is checked against it: no model runs at another
precision than the one it is named for. One stream and a LATENCY hint: one request at a time, the way
every other bench row is timed, with the bench's thread count.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import PipelineError, StageSkipped

INSTALL = "pip install openvino (a dependency of one-pipeline: pip install -e .)"
# the bench's OpenVINO precisions: the ONNX file each is compiled from, and the inference precision
FORMS = {"fp32": ("fp32", "f32"), "bf16": ("fp32", "bf16"), "int8_cpu": ("int8_cpu", "f32")}
PROPERTIES = ("INFERENCE_PRECISION_HINT", "PERFORMANCE_HINT", "NUM_STREAMS", "INFERENCE_NUM_THREADS",
              "EXECUTION_DEVICES")


def core() -> Any:
    try:
        import openvino
    except ImportError:
        raise StageSkipped(f"OpenVINO is not installed: {INSTALL}") from None
    return openvino.Core()


def has_bf16(ov_core: Any) -> bool:
    """Whether the CPU computes in bfloat16 natively (AVX512-BF16 or AMX), as OpenVINO reports it."""
    return "BF16" in ov_core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")


@dataclasses.dataclass
class OpenVINOModel:
    request: Any
    properties: dict[str, str]

    def __call__(self, images: np.ndarray) -> np.ndarray:
        return self.request.infer({0: images})[0]


def compile_onnx(path: Path, precision: str, threads: int) -> OpenVINOModel:
    """`path` compiled for the CPU at `precision` (a key of FORMS); bf16 where the CPU has no bf16 is skipped."""
    ov_core = core()
    hint = FORMS[precision][1]
    if hint == "bf16" and not has_bf16(ov_core):
        raise StageSkipped("this CPU has no native bfloat16 (OpenVINO's OPTIMIZATION_CAPABILITIES lists no BF16)")
    settings = {"INFERENCE_PRECISION_HINT": hint, "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1,
                "INFERENCE_NUM_THREADS": threads}
    try:
        compiled = ov_core.compile_model(str(path), "CPU", settings)
    except RuntimeError as exc:
        raise PipelineError(f"OpenVINO cannot compile {Path(path).name}: {str(exc).strip().splitlines()[0]}") from exc
    properties = {key: str(compiled.get_property(key)) for key in PROPERTIES}
    got = compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()  # "f32", "bf16"
    if got != hint:
        raise PipelineError(f"OpenVINO compiled {Path(path).name} at {got} where {hint} was asked for")
    return OpenVINOModel(compiled.create_infer_request(), properties)


def run_split(model: OpenVINOModel, batches: Any) -> np.ndarray:
    """Logits for every batch of (images, labels), in order."""
    return np.concatenate([np.array(model(images.numpy())) for images, _ in batches])
