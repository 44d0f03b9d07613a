"""The latency planner's clock: a candidate network, freshly built (a network's latency does not depend on
its weights), exported, converted to the target's precision and timed in the target's runtime, the way the
bench times a deployed form (one call at a time, the bench's threads, interleaved rounds).

    where = Where("onnxruntime", "fp32", batch=1, threads=2)
    calls = {key: build_call(model, (1, 28, 28), where, workdir, calibration) for key, model in candidates}
    per_round = time_in_rounds(calls, rounds=3)     # {key: [p50 ms of round 1, round 2, ...]}

Export: TorchScript (`dynamo=False`), ~15x faster than the dynamo exporter on small ResNets, and the same
graph once ONNX Runtime or OpenVINO has fused it. int8_cpu: the export stage's recipe (`quantize_int8`,
target int8_cpu, min-max, every layer int8), calibrated on a few images (what is timed is the graph, not
the accuracy). OpenVINO compiles the same ONNX file at an explicit precision (openvino_runtime.compile_onnx).
"""

from __future__ import annotations

import dataclasses
import io
import statistics
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from pipeline.deploy.onnx_io import INPUT, OUTPUT
from pipeline.deploy.timing import TURN_PAUSE_S, in_turns, latency_samples
from pipeline.errors import PipelineError, StageSkipped, UsageError
from pipeline.training.data import ImageSet

WARMUP = 10  # untimed calls before each turn's samples
# timed calls per turn (a round's p50 is over these): as many as fit in TURN_MS, within these bounds. Over 20
# calls of a quarter-millisecond network, one plan's per-round speed-up spread from 0.4x to 1.8x; 100 of them
# take 25 ms, and a slow network still gets 20
TURN_MS, MIN_ITERATIONS, ITERATIONS = 25.0, 20, 100
TORCHSCRIPT_OPSET = 17


@dataclasses.dataclass(frozen=True)
class Where:
    """Where a latency target is measured: runtime, precision, batch and CPU threads."""

    runtime: str  # onnxruntime | openvino | tensorrt
    precision: str  # fp32 | int8_cpu | bf16 (openvino) | fp16 / int8 (tensorrt)
    batch: int
    threads: int
    pause_s: float = TURN_PAUSE_S  # before every turn (bench.turn_pause_ms)

    def describe(self) -> str:
        return f"{self.runtime} {self.precision}, batch {self.batch}, {self.threads} threads"


def refuse_unsupported(where: Where) -> None:
    """TensorRT candidates need an NVIDIA GPU and an engine build per candidate, which this planner does not do."""
    if where.runtime != "tensorrt":
        return
    if not torch.cuda.is_available():
        raise UsageError("compress.target_runtime tensorrt needs an NVIDIA GPU, and this host has none; plan for "
                         "onnxruntime or openvino here, or run compress on the GPU host")
    raise UsageError("compress.target_runtime tensorrt: the latency planner does not build TensorRT engines yet; "
                     "plan for onnxruntime or openvino, or prune to compress.flops_ratio")


def export_torchscript(model: nn.Module, example: torch.Tensor, path: Path) -> None:
    """The TorchScript ONNX export of `model` (eval mode) with a dynamic batch, as the deployed files have."""
    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation notice, once per candidate
        torch.onnx.export(model.eval(), (example,), buffer, input_names=[INPUT], output_names=[OUTPUT],
                          opset_version=TORCHSCRIPT_OPSET, dynamo=False,
                          dynamic_axes={INPUT: {0: "batch"}, OUTPUT: {0: "batch"}})
    path.write_bytes(buffer.getvalue())


def build_call(model: nn.Module, sample_shape: tuple[int, ...], where: Where, workdir: Path,
               calibration: ImageSet | None = None) -> Callable[[], Any]:
    """`model` exported (and quantized) under `workdir`, loaded in `where`'s runtime: a call on a fixed
    random batch (made here, outside every timed region)."""
    workdir.mkdir(parents=True, exist_ok=True)
    inputs = np.random.default_rng(0).standard_normal((where.batch, *sample_shape)).astype(np.float32)
    path = workdir / "fp32.onnx"
    export_torchscript(model, torch.from_numpy(inputs[:1]), path)
    if where.precision == "int8_cpu":
        from pipeline.deploy.quantize import quantize_int8

        if calibration is None:
            raise PipelineError("int8_cpu candidates need calibration images")
        quantized = workdir / "int8_cpu.onnx"
        quantize_int8(path, quantized, calibration, INPUT, target="int8_cpu")
        path = quantized
    if where.runtime == "openvino":
        from pipeline.deploy import openvino_runtime

        try:
            compiled = openvino_runtime.compile_onnx(path, where.precision, where.threads)
        except StageSkipped as exc:  # no OpenVINO, or no bf16 on this CPU: the target cannot be measured here
            raise UsageError(f"compress.target_runtime openvino at {where.precision} cannot run here: {exc}") from None
        return lambda: compiled(inputs)
    from pipeline.deploy.runtime import ort_session

    session = ort_session(path, ["CPUExecutionProvider"], threads=where.threads)
    return lambda: session.run([OUTPUT], {INPUT: inputs})


def time_in_rounds(calls: dict[Any, Callable[[], Any]], rounds: int, iterations: int | None = None,
                   warmup: int = WARMUP, pause_s: float = TURN_PAUSE_S) -> dict[Any, list[float]]:
    """Each call's p50 (ms) per round, over `rounds` rounds in which every call takes its turn (the bench's
    `in_turns`), so that a machine that slows down mid-measurement moves every candidate alike. `iterations`
    None: as many timed calls per turn as take TURN_MS (MIN_ITERATIONS to ITERATIONS), from the warm-up's pace."""
    per_round: dict[Any, list[float]] = {key: [] for key in calls}

    def turn(key: Any) -> Callable[[int], None]:
        def run(index: int) -> None:
            started = time.perf_counter()
            for _ in range(warmup):
                calls[key]()
            count = iterations or _calls_per_turn((time.perf_counter() - started) * 1e3 / max(warmup, 1))
            samples = latency_samples(calls[key], warmup=0, iterations=count,
                                      device=torch.device("cpu"))
            per_round[key].append(statistics.median(samples) / 1e6)
        return run

    failed = in_turns({key: turn(key) for key in calls}, rounds, pause_s)
    if failed:
        key, exc = next(iter(failed.items()))
        raise PipelineError(f"timing a candidate plan ({key}) failed: {type(exc).__name__}: "
                            f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''}")
    return per_round


def _calls_per_turn(call_ms: float) -> int:
    return int(min(max(TURN_MS / max(call_ms, 1e-3), MIN_ITERATIONS), ITERATIONS))


class RuntimeClock:
    """The search's clock (latency_plan.Clock): builds each plan's network once, on first use, and times
    the plans asked for in interleaved rounds."""

    def __init__(self, network: Callable[[Any], nn.Module], label: Callable[[Any], str],
                 sample_shape: tuple[int, ...], where: Where, workdir: Path, calibration: ImageSet | None = None):
        self.network, self.label, self.sample_shape, self.where = network, label, sample_shape, where
        self.workdir, self.calibration = workdir, calibration
        self.calls: dict[Any, Callable[[], Any]] = {}

    def __call__(self, shapes: list[Any], rounds: int) -> dict[Any, list[float]]:
        for shape in shapes:
            if shape not in self.calls:
                folder = self.workdir / self.label(shape).replace("/", "_")
                self.calls[shape] = build_call(self.network(shape), self.sample_shape, self.where, folder,
                                               self.calibration)
        return time_in_rounds({shape: self.calls[shape] for shape in shapes}, rounds, pause_s=self.where.pause_s)
