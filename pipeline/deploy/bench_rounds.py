"""The bench's timing half: each row registers its model call and inputs as a `RowTimer` while its accuracy
is measured, then `time_rows` times every row in `bench.rounds` rounds in which each row takes its turn, so
that a machine that slows down or speeds up during the bench moves every row alike (timed one after the
other, a row's place in the order could decide what to ship). Batch-1 samples are pooled over the rounds;
throughput is the median round.
"""

from __future__ import annotations

import dataclasses
import statistics
from typing import Any, Callable

import numpy as np
import torch
from rich.console import Console
from rich.markup import escape

from pipeline.config import BenchConfig
from pipeline.deploy.timing import Latency, in_turns, latency_samples, throughput
from pipeline.training.splits import Split


@dataclasses.dataclass
class RowTimer:
    """A row's model call and inputs, and the figures its turns have gathered."""

    name: str
    call: Callable[[Any], Any]
    inputs: dict[int, Any]
    cuda_events: bool  # torch and TensorRT work: CUDA events on the current stream
    batches: list[int]
    samples: list[int] = dataclasses.field(default_factory=list)  # batch-1 latencies, ns
    rates: dict[int, list[float]] = dataclasses.field(default_factory=dict)  # images/s per batch, one per round


def time_rows(timers: list[RowTimer], cfg: BenchConfig, device: torch.device,
              console: Console) -> dict[str, dict[str, Any] | str]:
    """Time every timer in `cfg.rounds` rounds: each row's `latency_ms` and `throughput` by name, or the
    reason its timing failed (the row is then `failed` in "bench"; it leaves the later rounds to the others)."""
    def turn(timer: RowTimer) -> Callable[[int], None]:
        return lambda index: take_turn(timer, cfg, device, share(cfg.iterations, cfg.rounds, index),
                                       share(cfg.throughput_iterations, cfg.rounds, index))

    with torch.inference_mode():
        errors = in_turns({timer.name: turn(timer) for timer in timers}, cfg.rounds, cfg.turn_pause_s)
    failed = {name: failure(exc) for name, exc in errors.items()}
    for name, reason in failed.items():
        console.print(f"[red]{name} failed:[/red] {escape(reason)}")
    figures: dict[str, dict[str, Any] | str] = dict(failed)
    for timer in timers:
        if timer.name not in failed:
            figures[timer.name] = {
                "latency_ms": Latency.from_ns(timer.samples).figures(cfg.warmup),
                "throughput": [{"images_per_s": round(statistics.median(timer.rates[b]), 1), "batch": b,
                                "warmup": min(cfg.warmup, 3), "iterations": cfg.throughput_iterations}
                               for b in timer.batches]}
    return figures


def take_turn(timer: RowTimer, cfg: BenchConfig, device: torch.device, iterations: int,
              throughput_iterations: int) -> None:
    """One row's turn in a round: warm-up, its batch-1 latency samples, one throughput figure per batch."""
    first = timer.inputs[1]
    timer.samples += latency_samples(lambda: timer.call(first), warmup=cfg.warmup, iterations=iterations,
                                     device=device, cuda_events=timer.cuda_events)
    for b in timer.batches if throughput_iterations else ():
        x = timer.inputs[b]
        timer.rates.setdefault(b, []).append(throughput(lambda: timer.call(x), batch=b, warmup=min(cfg.warmup, 3),
                                                        iterations=throughput_iterations, device=device))


def share(total: int, rounds: int, turn: int) -> int:
    """Turn `turn`'s part of `total` calls split over `rounds` turns (the parts add up to `total`)."""
    return total // rounds + (turn < total % rounds)


def failure(exc: Exception) -> str:
    """A row's reason: the exception's type and first line."""
    return f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"


def timing_inputs(test: Split, batch_sizes: list[int], device: torch.device) -> dict[int, torch.Tensor]:
    """The timing inputs, made once outside every timed region and shared by every row: batch 1 and
    each throughput batch (the first test images, repeated if the test set is smaller)."""
    sizes = sorted({1, *batch_sizes})
    return {b: test.inputs(torch.arange(b) % len(test)).contiguous().to(device) for b in sizes}


def onnx_call(session: Any, provider: str) -> Callable[[np.ndarray], Any]:
    """An ONNX Runtime session as a timed call; on the GPU the input is copied to the device once, outside
    the timed calls, like the torch rows' inputs."""
    inp, out = session.get_inputs()[0].name, session.get_outputs()[0].name
    if provider != "CUDAExecutionProvider":
        return lambda x: session.run([out], {inp: x})
    import onnxruntime as ort

    bound: dict[int, Any] = {}

    def call(x: np.ndarray) -> Any:
        if id(x) not in bound:
            binding, value = session.io_binding(), ort.OrtValue.ortvalue_from_numpy(x, "cuda", 0)
            binding.bind_ortvalue_input(inp, value)
            binding.bind_output(out, "cuda")
            bound[id(x)] = (binding, value)  # `value` lives as long as its binding
        return session.run_with_iobinding(bound[id(x)][0])

    return call
