"""Every exported ONNX model of a run (the branch and ONE-E, each precision), timed interleaved in one
process: round after round, each model in turn, so that a noisy neighbour slows all models alike; medians
over the rounds. The bench stage times its rows the same way (`bench.rounds`) beside the eager and
TensorRT rows; this tool runs the ONNX models alone, with more rounds when two forms are close.

    python benchmarks/precision_speed.py artifacts/edge                    # 2 threads, 7 rounds
    python benchmarks/precision_speed.py artifacts/edge --threads 1 --rounds 11 --batch 64
"""

from __future__ import annotations

import argparse
import os
import statistics
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from pipeline.deploy.runtime import input_dtype, ort_session
from pipeline.deploy.timing import in_turns, latency, throughput
from pipeline.rundir import cpu_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--batch", type=int, default=64, help="throughput batch (latency is at batch 1)")
    parser.add_argument("--calls", type=int, default=50, help="batch-1 calls per model per round")
    args = parser.parse_args()
    paths = sorted((args.run_dir / "export").glob("*.onnx"))
    if not paths:
        raise SystemExit(f"no export/*.onnx under {args.run_dir}; run `one-pipeline export` first")
    sessions = {p.stem: ort_session(p, ["CPUExecutionProvider"], args.threads) for p in paths}
    rng = np.random.default_rng(0)
    shape = sessions[paths[0].stem].get_inputs()[0].shape[1:]
    inputs = {b: rng.standard_normal((b, *shape)).astype(np.float32) for b in (1, args.batch)}
    p50: dict[str, list[float]] = {name: [] for name in sessions}
    rate: dict[str, list[float]] = {name: [] for name in sessions}
    cpu = torch.device("cpu")

    def turn(name: str, session) -> Callable[[int], None]:
        feed = {b: {session.get_inputs()[0].name: x.astype(input_dtype(session))} for b, x in inputs.items()}

        def measure(_: int) -> None:
            p50[name].append(latency(lambda: session.run(None, feed[1]), warmup=5, iterations=args.calls,
                                     device=cpu).p50_ms)
            rate[name].append(throughput(lambda: session.run(None, feed[args.batch]), batch=args.batch, warmup=1,
                                         iterations=5, device=cpu))

        return measure

    failed = in_turns({name: turn(name, session) for name, session in sessions.items()}, args.rounds)
    if failed:
        raise SystemExit(f"{', '.join(failed)} failed: {next(iter(failed.values()))}")
    print(f"{cpu_model()}, {args.threads} thread(s), {args.rounds} interleaved rounds; medians over rounds")
    print(f"{'model':<22} {'batch-1 p50 ms':>15} {f'img/s @{args.batch}':>12} {'vs fp32 (img/s)':>16}")
    for name in sessions:
        fp32 = name.split("_", 1)[0] + "_fp32"  # model_int8_cpu -> model_fp32, ensemble_fp16 -> ensemble_fp32
        base = statistics.median(rate[fp32]) if fp32 in rate else None
        ips = statistics.median(rate[name])
        print(f"{name:<22} {statistics.median(p50[name]):>15.3f} {ips:>12.0f} "
              f"{(f'{ips / base:.2f}x' if base else '-'):>16}")


if __name__ == "__main__":
    main()
