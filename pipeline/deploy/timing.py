"""Timing done one way for every benchmark row: warm-up, then `time.perf_counter_ns` around each call
with the device synchronised before the clock is read (timm's `benchmark.py`), or CUDA events for work
queued on PyTorch's CUDA stream (the way trtexec reports GPU compute time). Inputs are prepared by the
caller, outside the timed region; `call` must only run the model.

    lat = latency(lambda: model(x), warmup=10, iterations=100, device=torch.device("cpu"))
    lat.p50_ms, lat.p99_ms
    ips = throughput(lambda: model(xb), batch=64, warmup=3, iterations=20, device=device)
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import time
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from pipeline.config_deploy import BenchConfig


@dataclasses.dataclass(frozen=True)
class Latency:
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    iterations: int

    @classmethod
    def from_ns(cls, samples_ns: list[int]) -> Latency:
        ms = np.asarray(samples_ns, dtype=np.float64) / 1e6
        p50, p90, p99 = np.percentile(ms, [50, 90, 99])
        return cls(float(p50), float(p90), float(p99), float(ms.mean()), len(ms))

    def figures(self, warmup: int) -> dict[str, float | int]:
        """A bench row's `latency_ms` (milliseconds to the nanosecond)."""
        return {"p50": round(self.p50_ms, 6), "p90": round(self.p90_ms, 6), "p99": round(self.p99_ms, 6),
                "mean": round(self.mean_ms, 6), "warmup": warmup, "iterations": self.iterations}


@contextlib.contextmanager
def _no_gc() -> Iterator[None]:
    """No garbage-collector pause inside a timed region (as `timeit` does)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def latency(call: Callable[[], Any], *, warmup: int, iterations: int, device: torch.device,
            cuda_events: bool = False) -> Latency:
    """Per-call latency after `warmup` untimed calls. `cuda_events`: time with CUDA events on the
    current stream (for PyTorch and TensorRT work on that stream); else the host clock after a sync."""
    return Latency.from_ns(latency_samples(call, warmup=warmup, iterations=iterations, device=device,
                                           cuda_events=cuda_events))


def latency_samples(call: Callable[[], Any], *, warmup: int, iterations: int, device: torch.device,
                    cuda_events: bool = False) -> list[int]:
    """`latency`'s samples in nanoseconds, to pool over several turns."""
    for _ in range(warmup):
        call()
    _sync(device)
    samples: list[int] = []
    with _no_gc():
        if cuda_events and device.type == "cuda":
            pairs = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                     for _ in range(iterations)]
            for start, end in pairs:
                start.record()
                call()
                end.record()
                end.synchronize()  # one call at a time: batch-1 latency, not pipelined throughput
            samples = [round(start.elapsed_time(end) * 1e6) for start, end in pairs]
        else:
            for _ in range(iterations):
                t0 = time.perf_counter_ns()
                call()
                _sync(device)
                samples.append(time.perf_counter_ns() - t0)
    return samples


def throughput(call: Callable[[], Any], *, batch: int, warmup: int, iterations: int,
               device: torch.device) -> float:
    """Images per second: `iterations` back-to-back calls on a batch of `batch`, one sync at the end."""
    for _ in range(warmup):
        call()
    _sync(device)
    with _no_gc():
        t0 = time.perf_counter_ns()
        for _ in range(iterations):
            call()
        _sync(device)
        elapsed = time.perf_counter_ns() - t0
    return batch * iterations / (elapsed / 1e9)


# Between two turns: after its last call a runtime's threads spin on for a while (PyTorch's OpenMP pool, ONNX
# Runtime's), and on 2 cores they stole time slices from the next model's calls (its p99 went from 0.5 to
# 4.4 ms on a 2-core AMD EPYC); a 50 ms pause lets them go idle first (bench.turn_pause_ms).
TURN_PAUSE_S = BenchConfig().turn_pause_s


def in_turns(turns: dict[str, Callable[[int], Any]], rounds: int,
             pause_s: float = TURN_PAUSE_S) -> dict[str, Exception]:
    """Round after round, every turn in order (called with the round's index), each after `pause_s`, so
    that a machine that slows down or speeds up moves every model alike. A turn that raises takes no
    further part; its error is returned under its name."""
    failed: dict[str, Exception] = {}
    for index in range(rounds):
        for name, turn in turns.items():
            if name in failed:
                continue
            time.sleep(pause_s)
            try:
                turn(index)
            except Exception as exc:  # the caller decides: a failed row (bench) or a raised error
                failed[name] = exc
    return failed


@torch.no_grad()
def count_flops(model: nn.Module, example: torch.Tensor) -> int:
    """FLOPs of one forward pass on `example` with torch's own counter (convolutions, matmuls;
    a multiply-add counts 2). Elementwise ops (BatchNorm, ReLU, add) are not counted."""
    with FlopCounterMode(display=False) as counter:
        model(example)
    return int(counter.get_total_flops())
