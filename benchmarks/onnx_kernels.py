"""Which ONNX Runtime kernels run, and where the time goes, for each exported model of a run.

    python benchmarks/onnx_kernels.py artifacts/edge            # batch 1, 200 profiled calls per model

ONNX Runtime fuses Q/DQ pairs around Conv/Gemm into integer kernels (QLinearConv, ...) only where it has
one for the data types; the rest runs as float ops plus (de)quantize steps. This prints, per model, the
time share of each executed op type from ORT's own profiler, so a missing INT8 speed-up can be traced
to the kernels that actually ran (model_int8_cpu.onnx, the x86 form, against model_int8.onnx, the
TensorRT form, shows why both are exported).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort


def profile(path: Path, batch: int, calls: int, threads: int) -> tuple[dict[str, float], float]:
    """{op type: microseconds per call} and the mean per-call total, from ORT's profiler."""
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.enable_profiling = True
    with tempfile.TemporaryDirectory() as tmp:
        options.profile_file_prefix = str(Path(tmp) / "ort")
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        meta = session.get_inputs()[0]
        x = np.random.default_rng(0).standard_normal((batch, *meta.shape[1:])).astype(np.float32)
        for _ in range(calls):
            session.run(None, {meta.name: x})
        events = json.loads(Path(session.end_profiling()).read_text())
    per_op: dict[str, float] = collections.defaultdict(float)
    total = 0.0
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            per_op[event["args"]["op_name"]] += event["dur"] / calls
        elif event.get("cat") == "Session" and event["name"] == "model_run":
            total += event["dur"] / calls
    return dict(per_op), total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args()
    models = sorted((args.run_dir / "export").glob("model_*.onnx"))
    if not models:
        raise SystemExit(f"no export/model_*.onnx under {args.run_dir}; run `one-pipeline export` first")
    _report(models, args)


def _report(models: list[Path], args: argparse.Namespace) -> None:
    for path in models:
        per_op, total = profile(path, args.batch, args.calls, args.threads)
        kernels = sum(per_op.values())
        print(f"\n{path.name}: {total:.0f} us per call at batch {args.batch} ({args.batch * 1e6 / total:.0f} "
              f"images/s, {args.threads} threads), {kernels:.0f} us in kernels")
        for op, micros in sorted(per_op.items(), key=lambda kv: -kv[1]):
            print(f"  {op:<22} {micros:8.1f} us  {100 * micros / max(kernels, 1e-9):5.1f}%")


if __name__ == "__main__":
    main()
