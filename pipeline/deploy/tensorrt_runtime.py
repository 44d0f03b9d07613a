"""Run a serialized TensorRT engine on torch CUDA tensors (TensorRT 10.x and 11.x: name-based I/O).

    runner = TensorRTRunner("artifacts/edge/engine/model_fp32.plan")
    logits = runner(images.cuda())          # enqueued on torch.cuda.current_stream()
    runner.min_batch, runner.max_batch      # the engine's optimization profile for the batch dimension

The runner reads the sidecar `<plan>.json` written by the engine stage (when present) and refuses a
plan built with another TensorRT version or on another GPU model: such a plan does not deserialize,
or worse, so the error says to rebuild it instead. `tensorrt` is imported only when a runner is made.

Calls (TensorRT Python API, identical on 10.x and 11.x): `trt.Runtime(logger)`,
`runtime.deserialize_cuda_engine(plan)`, `engine.create_execution_context()`, `engine.num_io_tensors`,
`engine.get_tensor_name(i)`, `engine.get_tensor_mode(name)`, `engine.get_tensor_dtype(name)`,
`engine.get_tensor_profile_shape(name, 0)`, `context.set_input_shape(name, shape)`,
`context.get_tensor_shape(name)`, `context.set_tensor_address(name, ptr)`,
`context.execute_async_v3(stream_handle)`.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from pipeline.errors import PipelineError, UsageError

# TensorRT DataType member -> torch dtype (members looked up by name: older releases lack some)
_TORCH_DTYPES = {"FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16, "INT8": torch.int8,
                 "INT32": torch.int32, "INT64": torch.int64, "UINT8": torch.uint8, "BOOL": torch.bool}


def import_tensorrt() -> tuple[ModuleType | None, str]:
    """(the tensorrt module, "") or (None, why it cannot be used here)."""
    try:
        import tensorrt as trt
    except Exception as exc:  # ImportError, or OSError/RuntimeError when libnvinfer is missing or broken
        detail = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        return None, (f"TensorRT is not importable here ({detail}); on a host with an NVIDIA GPU: "
                      "pip install -e '.[tensorrt]' in the one-pipeline checkout")
    return trt, ""


def sidecar_path(plan_path: Path) -> Path:
    """engine/model_fp32.plan -> engine/model_fp32.plan.json (never inside the plan itself)."""
    return plan_path.with_name(plan_path.name + ".json")


def check_compatible(info: dict[str, Any], tensorrt_version: str, gpu: str, plan_path: Path | str = "the plan") -> None:
    """A plan runs only with the TensorRT version and on the GPU model it was built with."""
    built = (info.get("tensorrt"), info.get("gpu"))
    if built != (tensorrt_version, gpu):
        raise PipelineError(f"{plan_path} was built with TensorRT {built[0]} on {built[1]}; this host has TensorRT "
                            f"{tensorrt_version} on {gpu}, where it cannot run: rebuild it here "
                            "(one-pipeline engine CONFIG --force)")


class TensorRTRunner:
    """One execution context of a deserialized engine with a single input (dynamic batch)."""

    def __init__(self, plan_path: Path | str, *, check_sidecar: bool = True):
        trt, reason = import_tensorrt()
        if trt is None:
            raise PipelineError(reason)
        if not torch.cuda.is_available():
            raise PipelineError("a TensorRT engine runs on a CUDA GPU only and none is visible here")
        self.plan_path = Path(plan_path)
        info_path = sidecar_path(self.plan_path)
        self.info: dict[str, Any] | None = json.loads(info_path.read_text()) if info_path.exists() else None
        if self.info is not None and check_sidecar:
            check_compatible(self.info, trt.__version__, torch.cuda.get_device_name(), self.plan_path)
        try:
            plan = self.plan_path.read_bytes()
        except FileNotFoundError:
            raise PipelineError(f"{self.plan_path} not found; build it with one-pipeline engine CONFIG") from None
        self._logger = trt.Logger(trt.Logger.WARNING)  # must outlive every object made through the runtime
        self._runtime = trt.Runtime(self._logger)
        self.engine = self._runtime.deserialize_cuda_engine(plan)
        if self.engine is None:
            raise PipelineError(f"TensorRT {trt.__version__} could not deserialize {self.plan_path} (corrupted, or "
                                "built with another TensorRT version or GPU); rebuild it: "
                                "one-pipeline engine CONFIG --force")
        self.context = self.engine.create_execution_context()
        if self.context is None:
            raise PipelineError(f"TensorRT could not create an execution context for {self.plan_path} "
                                "(out of GPU memory?)")
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if len(self.inputs) != 1 or not self.outputs:
            raise PipelineError(f"{self.plan_path} has inputs {self.inputs} and outputs {self.outputs}; "
                                "this runner takes one input and at least one output")
        self.input_name = self.inputs[0]
        self.dtypes = {n: _torch_dtype(trt, self.engine.get_tensor_dtype(n)) for n in names}
        low, opt, high = (tuple(d) for d in self.engine.get_tensor_profile_shape(self.input_name, 0))
        self.min_batch, self.opt_batch, self.max_batch = low[0], opt[0], high[0]
        self.sample_shape = high[1:]
        self.stream: torch.cuda.Stream | None = None  # made on the first batch's device

    def run(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every output for a batch `x` (CUDA; cast to the engine's input dtype). The engine runs on its own
        stream (TensorRT warns about, and synchronizes on, the legacy default stream) ordered after the
        caller's current stream, which then waits for it: read the results on that stream as usual."""
        if not x.is_cuda:
            raise UsageError("TensorRTRunner takes a CUDA tensor; move the batch with .cuda() first")
        if tuple(x.shape[1:]) != tuple(self.sample_shape) or not self.min_batch <= x.shape[0] <= self.max_batch:
            raise UsageError(f"batch of shape {tuple(x.shape)} is outside the engine's profile: batch "
                             f"{self.min_batch}..{self.max_batch} of {tuple(self.sample_shape)}")
        x = x.to(self.dtypes[self.input_name]).contiguous()
        if self.context.set_input_shape(self.input_name, tuple(x.shape)) is False:
            raise PipelineError(f"TensorRT rejected input shape {tuple(x.shape)} for '{self.input_name}'")
        self.context.set_tensor_address(self.input_name, x.data_ptr())
        results = {}
        for name in self.outputs:
            results[name] = torch.empty(tuple(self.context.get_tensor_shape(name)), dtype=self.dtypes[name],
                                        device=x.device)
            self.context.set_tensor_address(name, results[name].data_ptr())
        caller = torch.cuda.current_stream(x.device)
        if self.stream is None:
            self.stream = torch.cuda.Stream(x.device)
        self.stream.wait_stream(caller)  # the input (and the outputs' allocation) are ready first
        if self.context.execute_async_v3(self.stream.cuda_stream) is False:
            raise PipelineError(f"TensorRT could not enqueue {self.plan_path} (execute_async_v3 returned False)")
        # The tensors belong to the caller's stream, which waits for the engine here: freeing them there
        # cannot hand their memory to new work before the engine is done with it.
        caller.wait_stream(self.stream)
        return results

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """The first output (the logits) for a batch `x`."""
        return self.run(x)[self.outputs[0]]


def _torch_dtype(trt: ModuleType, dtype: Any) -> torch.dtype:
    for name, torch_dtype in _TORCH_DTYPES.items():
        if hasattr(trt.DataType, name) and dtype == getattr(trt.DataType, name):
            return torch_dtype
    raise PipelineError(f"TensorRT tensor type {dtype} has no torch equivalent in this runner")
