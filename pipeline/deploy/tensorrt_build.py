"""The TensorRT engine builder: the optimization profile, the network-creation flags, a logger that keeps
every message for build.log, the builder configuration logged before the build, the timing cache, the
build itself, and the check of a built engine against ONNX Runtime on the same ONNX file.

    profile = batch_profile(onnx_path, cfg.engine)               # input name and C, H, W from the file
    figures = build_engine(trt, onnx_path, plan_path, profile, workspace_mb=1024,
                           timing_cache=out / TIMING_CACHE, log_path=out / BUILD_LOG, console=console)
    check = verify_engine(plan_path, onnx_path, images, "fp16", cfg.engine)   # {"passed": ..., "problem": ...}

Targets TensorRT 10.x (10.12 or later, with the STRONGLY_TYPED network-creation flag) and 11.x (every
network strongly typed; the flag is accepted and ignored). Precision is no builder flag: it is the
ONNX graph's own types (fp32, the fp16 conversion, or the Q/DQ int8 model), so this one code path
builds all three on both versions.

TensorRT calls (same on 10.x and 11.x): Builder(logger), create_network(flags), OnnxParser(network,
logger).parse_from_file / num_errors / get_error, create_builder_config, set_memory_pool_limit(
MemoryPoolType.WORKSPACE, bytes), create_optimization_profile / set_shape / add_optimization_profile,
create_timing_cache / set_timing_cache / ITimingCache.serialize, build_serialized_network (None on
failure); ILogger subclassed for the log.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.markup import escape

from pipeline.config import EngineConfig
from pipeline.deploy.onnx_io import read_onnx_io
from pipeline.deploy.runtime import ort_session, parity, run_logits
from pipeline.errors import PipelineError
from pipeline.rundir import atomic_path, write_text

TIMING_CACHE = "timing.cache"
BUILD_LOG = "build.log"


@dataclasses.dataclass(frozen=True)
class BatchProfile:
    """The optimization profile: one input, its batch dimension from min to max."""
    input_name: str
    sample_shape: tuple[int, ...]  # C, H, W
    min_batch: int
    opt_batch: int
    max_batch: int

    def shapes(self) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        return tuple((b, *self.sample_shape) for b in (self.min_batch, self.opt_batch, self.max_batch))

    def to_dict(self) -> dict[str, Any]:
        low, opt, high = self.shapes()
        return {"input": self.input_name, "min": list(low), "opt": list(opt), "max": list(high)}


def batch_profile(onnx_path: Path, cfg: EngineConfig) -> BatchProfile:
    """Input name and C, H, W read from the ONNX file; the batch range from the config."""
    signature = read_onnx_io(onnx_path)
    if len(signature.inputs) != 1:
        raise PipelineError(f"{onnx_path.name} has inputs {[t.name for t in signature.inputs]}; the engine "
                            "profile is made for exactly one (the image batch)")
    spec = signature.inputs[0]
    if any(d < 1 for d in spec.dims):
        raise PipelineError(f"{onnx_path.name}: input '{spec.name}' has dynamic dimensions besides the batch "
                            f"({list(spec.dims)}); export it with a fixed image size")
    return BatchProfile(spec.name, spec.dims, cfg.min_batch, cfg.opt_batch, cfg.max_batch)


def network_flags(trt: ModuleType) -> tuple[int, str]:
    """The creation flags for a strongly typed network: `1 << STRONGLY_TYPED` (required on 10.x, accepted
    and ignored on 11.x); 0 where a future TensorRT drops the member (strong typing is then the only mode)."""
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    if flag is None:
        return 0, "none (no STRONGLY_TYPED member: strongly typed is the only mode)"
    return 1 << int(flag), "STRONGLY_TYPED"


def make_logger(trt: ModuleType, console: Console) -> Any:
    """A trt.ILogger that keeps every message at INFO and above (for build.log) and shows warnings and
    errors on the console; `note(line)` adds this stage's own lines."""

    class BuildLogger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.lines: list[str] = []

        def note(self, line: str) -> None:
            self.lines.append(line)
            console.print(escape(line))

        def log(self, severity: Any, msg: str) -> None:  # called by TensorRT, possibly from its threads
            level = int(severity)
            if level > int(trt.ILogger.Severity.INFO):
                return
            name = getattr(severity, "name", str(severity))
            self.lines.append(f"[{name}] {msg}")
            if level <= int(trt.ILogger.Severity.WARNING):
                console.print(f"[yellow]TensorRT {name}:[/yellow] {escape(msg)}")

        def text(self) -> str:
            return "\n".join(self.lines) + "\n"

    return BuildLogger()


def describe_config(trt: ModuleType, config: Any, network: Any, profile: BatchProfile, flags: str,
                    cache_state: str) -> list[str]:
    """The whole builder configuration, logged before the build (as Polygraphy does)."""
    def tensor(t: Any) -> str:
        return f"{t.name} {getattr(t.dtype, 'name', t.dtype)} {tuple(t.shape)}"

    enabled = [name for name, flag in getattr(trt.BuilderFlag, "__members__", {}).items() if config.get_flag(flag)]
    low, opt, high = profile.shapes()
    workspace = config.get_memory_pool_limit(trt.MemoryPoolType.WORKSPACE)
    return [
        f"TensorRT {trt.__version__}: building with this configuration",
        f"  network flags      | {flags}",
        f"  inputs             | {', '.join(tensor(network.get_input(i)) for i in range(network.num_inputs))}",
        f"  outputs            | {', '.join(tensor(network.get_output(i)) for i in range(network.num_outputs))}",
        f"  builder flags      | [{', '.join(enabled)}]",
        f"  memory pools       | WORKSPACE {workspace / 2**20:.0f} MiB",
        f"  profile 0          | {profile.input_name}: min {low}, opt {opt}, max {high}",
        f"  optimization level | {config.builder_optimization_level}",
        f"  timing cache       | {cache_state}",
    ]


def build_engine(trt: ModuleType, onnx_path: Path, plan_path: Path, profile: BatchProfile, *, workspace_mb: int,
                 timing_cache: Path, log_path: Path, console: Console) -> dict[str, Any]:
    """Parse, configure, log the configuration, build; write the plan, the timing cache and the log (the
    log also when the build fails). Returns build figures."""
    logger = make_logger(trt, console)
    try:
        builder = trt.Builder(logger)
        flags, flags_text = network_flags(trt)
        network = builder.create_network(flags)
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(str(onnx_path)):
            errors = [str(parser.get_error(i)) for i in range(parser.num_errors)] or ["no error recorded"]
            for error in errors:
                logger.note(f"parser error: {error}")
            raise PipelineError(f"TensorRT {trt.__version__} cannot parse {onnx_path.name}: {errors[0]}"
                                f"{f' (and {len(errors) - 1} more)' if len(errors) > 1 else ''}; see {log_path}")
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mb << 20)
        optimization = builder.create_optimization_profile()
        optimization.set_shape(profile.input_name, *profile.shapes())
        config.add_optimization_profile(optimization)
        cache, cache_state = _attach_timing_cache(config, timing_cache)
        for line in describe_config(trt, config, network, profile, flags_text, cache_state):
            logger.note(line)
        started = time.perf_counter()
        plan = builder.build_serialized_network(network, config)
        build_s = time.perf_counter() - started
        if plan is None:
            raise PipelineError(f"TensorRT {trt.__version__} could not build an engine from {onnx_path.name} "
                                f"(build_serialized_network returned None); the reason is in {log_path}")
        with atomic_path(plan_path) as tmp:
            tmp.write_bytes(memoryview(plan))
        with atomic_path(timing_cache) as tmp:
            tmp.write_bytes(memoryview(cache.serialize()))
        logger.note(f"built {plan_path.name} ({plan_path.stat().st_size / 1e6:.2f} MB) in {build_s:.1f} s")
        return {"build_s": round(build_s, 2), "timing_cache": cache_state, "network_flags": flags_text}
    finally:
        write_text(log_path, logger.text())


def _attach_timing_cache(config: Any, path: Path) -> tuple[Any, str]:
    """Reuse engine/timing.cache when it fits this GPU and TensorRT version, else start a new one."""
    data = path.read_bytes() if path.exists() else b""
    if data:
        try:
            cache = config.create_timing_cache(data)
        except Exception:  # a truncated file: TensorRT raises its own error types
            cache = None
        if cache is not None and config.set_timing_cache(cache, ignore_mismatch=False):
            return cache, f"{path.name} reused ({len(data)} bytes)"
    cache = config.create_timing_cache(b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    state = "new" if not data else "new (the cached one is from another GPU or TensorRT version)"
    return cache, f"{path.name} {state}"


def compare_outputs(got: np.ndarray, reference: np.ndarray, precision: str, cfg: EngineConfig) -> dict[str, Any]:
    """The engine's logits against ONNX Runtime's on the same ONNX file, with this precision's limit."""
    result: dict[str, Any] = {"images": len(reference), "max_abs_diff": None, "top1_agreement": None}
    limits: dict[str, float] = {}
    if precision != "int8":  # per image: atol + rtol x its largest |logit| (see runtime.py `parity`)
        key = "fp16" if precision == "fp16" else "fp32"
        limits = {"atol": getattr(cfg, f"{key}_atol"), "rtol": getattr(cfg, f"{key}_rtol")}
        result.update(limits)
    figures, problems = parity(got, reference, **limits)
    if not figures or not np.isfinite(got).all():  # another shape, or NaN/inf: no figures worth recording
        return {**result, "passed": False, "problem": "; ".join(problems)}
    agreement = figures["top1_agreement"]
    result.update(max_abs_diff=figures["max_abs_diff"], top1_agreement=agreement)
    if precision == "int8":
        result["min_top1_agreement"] = cfg.int8_min_agreement
        problem = (f"top-1 agreement {agreement:.1%} < {cfg.int8_min_agreement:.1%} (engine.int8_min_agreement)"
                   if agreement < cfg.int8_min_agreement else None)
    else:
        problem = f"{problems[0]} (engine.{key}_atol, engine.{key}_rtol)" if problems else None
    return {**result, "passed": problem is None, "problem": problem}


def verify_engine(plan_path: Path, onnx_path: Path, images: torch.Tensor, precision: str,
                  cfg: EngineConfig) -> dict[str, Any]:
    """Deserialize the plan, run `images` through it and through ONNX Runtime (CPU) on the same ONNX."""
    from pipeline.deploy.tensorrt_runtime import TensorRTRunner

    reference = run_logits(ort_session(onnx_path, ["CPUExecutionProvider"]), images.numpy())
    runner = TensorRTRunner(plan_path, check_sidecar=False)
    with torch.no_grad():
        got = runner(images.cuda())
        torch.cuda.current_stream().synchronize()
    return compare_outputs(got.float().cpu().numpy(), reference, precision, cfg)
