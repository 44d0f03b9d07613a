"""The bench's own measurement of a latency target: the pruned form and the kept branch alone, in the target's
runtime, precision and batch, in TARGET_ROUNDS interleaved rounds of the planner's clock (a round's speed-up is
the branch's p50 / the pruned form's; the figure is the median over rounds), so that the bench and the planner
measure the target alike. The bench table's p50s come from turns of a few calls each among some twenty rows:
on a shared 2-core CPU their ratio for one pair of files read 1.04x where paired rounds read 1.48x and the
planner 1.51x.

    figures = measure_target(run, compress_record, threads)   # {"speedup", "ms", "branch_ms", "rounds"} or None
"""

from __future__ import annotations

import statistics
from typing import Any, Callable

import numpy as np
import onnx

from pipeline.deploy import openvino_runtime
from pipeline.deploy.bench_rounds import onnx_call
from pipeline.deploy.onnx_io import onnx_key, run_exported_onnx
from pipeline.deploy.plan_timing import time_in_rounds
from pipeline.deploy.runtime import input_dtype, ort_session
from pipeline.deploy.timing import TURN_PAUSE_S
from pipeline.errors import PipelineError, StageSkipped
from pipeline.rundir import RunDir, StageRecord

TARGET_ROUNDS = 15  # 2 forms x 15 rounds x about 25 ms: under a second for a sub-millisecond network


def form_call(run: RunDir, model: str, runtime: str, precision: str, threads: int, batch: int) -> Callable[[], Any]:
    """The exported file of `model` (branch or pruned) in `runtime` at `precision`, as a call on a fixed
    random batch."""
    if runtime not in ("onnxruntime", "openvino"):
        raise StageSkipped(f"{runtime} latency targets are not measured here")
    source = openvino_runtime.FORMS[precision][0] if runtime == "openvino" else precision
    path = run_exported_onnx(run, onnx_key(model, source))
    dims = onnx.load(str(path), load_external_data=False).graph.input[0].type.tensor_type.shape.dim[1:]
    x = np.random.default_rng(0).standard_normal((batch, *(d.dim_value for d in dims))).astype(np.float32)
    if runtime == "openvino":
        compiled = openvino_runtime.compile_onnx(path, precision, threads)
        return lambda: compiled(x)
    session = ort_session(path, ["CPUExecutionProvider"], threads)
    x = x.astype(input_dtype(session))
    call = onnx_call(session, "CPUExecutionProvider")
    return lambda: call(x)


def measure_pair(calls: dict[str, Callable[[], Any]], rounds: int, iterations: int | None = None,
                 pause_s: float = TURN_PAUSE_S) -> dict[str, Any]:
    """The median over `rounds` interleaved rounds of the per-round speed-up of calls["pruned"] over
    calls["branch"], and of each one's p50 (ms)."""
    per_round = time_in_rounds(calls, rounds, iterations=iterations, pause_s=pause_s)
    return {"speedup": statistics.median(b / p for b, p in zip(per_round["branch"], per_round["pruned"])),
            "ms": statistics.median(per_round["pruned"]), "branch_ms": statistics.median(per_round["branch"]),
            "rounds": rounds}


def measure_target(run: RunDir, compress: StageRecord | None, threads: int, rounds: int = TARGET_ROUNDS,
                   pause_s: float = TURN_PAUSE_S) -> dict[str, Any] | None:
    """The paired figures of a run whose compress stage deployed a network pruned to a latency target; None
    where there is none, or where its forms cannot be timed here (the bench's rows then speak for it)."""
    summary = compress.summary if compress else {}
    plan = summary.get("latency_plan") or {}
    if compress is None or not compress.done or not summary.get("deployed") or not plan.get("target"):
        return None
    runtime, precision, batch = plan.get("runtime") or "onnxruntime", plan.get("precision") or "fp32", plan.get(
        "batch") or 1
    try:
        calls = {m: form_call(run, m, runtime, precision, threads, batch) for m in ("branch", "pruned")}
        return measure_pair(calls, rounds, pause_s=pause_s)
    except (PipelineError, OSError):  # a form not exported (the guard kept it back) or not loadable
        return None
