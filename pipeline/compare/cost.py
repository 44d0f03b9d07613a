"""What each compared method's deployable network costs: params, FLOPs and ONNX Runtime batch-1 latency."""

from __future__ import annotations

import statistics
from typing import Any, Callable, Sequence

import torch

from pipeline.compare.runs import Method
from pipeline.config import Config
from pipeline.deploy.onnx_io import onnx_key, run_exported_onnx
from pipeline.deploy.runtime import ort_session, run_logits
from pipeline.deploy.timing import count_flops, in_turns, latency
from pipeline.device import onnx_providers
from pipeline.rundir import RunDir
from pipeline.training import checkpoint
from pipeline.training.models import count_parameters

LATENCY_ROUNDS, LATENCY_CALLS = 7, 200


def deploy_cost(configs: Sequence[Config], compared: Sequence[Method], device: torch.device,
                threads: int | None) -> list[dict[str, Any]]:
    """Params, FLOPs and ONNX Runtime batch-1 latency of each method's deployable network (the first seed's):
    the kept ONE branch is the vanilla network's architecture, so they should match. Latencies are taken
    in turns, round after round, and the median round is reported."""
    models, calls = [], []
    for cfg in configs:
        run = RunDir(cfg.run_dir)
        network, payload = checkpoint.load_model(run.output("strip", "model"))
        example = torch.zeros(1, *payload["data"]["input_shape"])
        onnx_path = run_exported_onnx(run, onnx_key("branch", "fp32"))
        session = ort_session(onnx_path, onnx_providers(device), threads)
        image = example.numpy()
        models.append({"params": count_parameters(network), "flops": count_flops(network.eval(), example),
                       "onnx": str(onnx_path)})
        calls.append(lambda session=session, image=image: run_logits(session, image))
    p50s: list[list[float]] = [[] for _ in calls]

    def turn(index: int) -> Callable[[int], None]:
        return lambda _: p50s[index].append(latency(calls[index], warmup=10, iterations=LATENCY_CALLS,
                                                    device=torch.device("cpu")).p50_ms)

    failed = in_turns({str(index): turn(index) for index in range(len(calls))}, LATENCY_ROUNDS,
                      configs[0].bench.turn_pause_s)
    if failed:
        raise next(iter(failed.values()))
    return [{"method": m.key, "label": m.label, **model, "p50_ms": statistics.median(p), "rounds": LATENCY_ROUNDS,
             "calls_per_round": LATENCY_CALLS} for m, model, p in zip(compared, models, p50s)]
