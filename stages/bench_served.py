"""The bench's served row (stages/bench.py): the run's Triton repository served by a real tritonserver and
measured through its HTTP API (pipeline/deploy/served.py)."""

from __future__ import annotations

import importlib.util

import numpy as np

from pipeline.deploy.served import measure_served
from pipeline.deploy.triton_server import serve
from pipeline.errors import StageSkipped
from pipeline.stage import StageContext

SERVED_CONCURRENCY = 8


def served_row(ctx: StageContext, images: np.ndarray, labels: np.ndarray) -> dict:
    """The bench's served row: the fp32 ONNX model of the run's Triton repository, served by a tritonserver
    started here with only that model loaded. StageSkipped with the reason when it cannot run here; the
    server environment is never installed by a run (450 MB of downloads): `SETUP_COMMAND` does that."""
    cfg = ctx.cfg.bench
    if not cfg.served:
        raise StageSkipped("bench.served is false in the config")
    if importlib.util.find_spec("tritonclient") is None:
        raise StageSkipped("the served row talks to the server with tritonclient: pip install -e '.[triton]'")
    entry = ctx.record("triton")
    if entry is None or not entry.done:
        why = f"is {entry.status}" if entry else "has not run"
        raise StageSkipped(f"the triton stage {why}: no repository to serve")
    model = next((m for m, platform in entry.summary.get("models", {}).items()
                  if platform == "onnxruntime_onnx" and m.endswith("_onnx")), None)
    if model is None:
        raise StageSkipped("the Triton repository has no fp32 ONNX model")
    model_file = ctx.input("triton", f"{model}/1/model.onnx")
    repository = ctx.run.path("triton")
    with serve(repository, models=[model], log=ctx.stage_dir("bench") / "tritonserver.log") as endpoints:
        figures = measure_served(endpoints.http, model, images, labels,
                                 max_batch=entry.summary["max_batch_size"][model],
                                 throughput_batch=cfg.batch_sizes[-1], concurrency=SERVED_CONCURRENCY,
                                 warmup=cfg.warmup, iterations=cfg.iterations,
                                 throughput_iterations=cfg.throughput_iterations)
    return {**figures, "file": str(model_file.relative_to(ctx.run.root)), "file_bytes": model_file.stat().st_size,
            "provider": f"tritonserver {endpoints.backend}",
            "note": f"through tritonserver over HTTP on this machine: latency with 1 client at batch 1, "
                    f"throughput with {SERVED_CONCURRENCY} clients at batch {figures['throughput'][0]['batch']}"}
