"""engine stage: build TensorRT engines from the exported ONNX of `engine.precision` (`auto`: the lowest
precision the export accuracy guard deployed): the kept branch, its ONE-E twin when `engine.ensemble`
(for the like-for-like bench), and compress's pruned branch when the export stage wrote pruned_<p>.onnx
(servers get the branch and the pruned branch: the triton stage's <name>_trt and <name>_pruned_trt).

The builder (profile, network flags, logger, timing cache, the check against ONNX Runtime) is
pipeline/deploy/tensorrt_build.py; this stage chooses what to build and records it.

Writes, under engine/:
- model_<p>.plan       the serialized engine (nothing else inside it); ensemble_<p>.plan for ONE-E,
                       pruned_<p>.plan for the pruned branch;
- model_<p>.plan.json  its sidecar: TensorRT version, GPU, compute capability, precision and why it was
                       chosen, profile, ONNX sha256 and the check figures. A plan runs only with that
                       TensorRT version on that GPU model;
- build.log            the builder config (logged first), then every TensorRT message at INFO and up
                       (ensemble_build.log for ONE-E, pruned_build.log for the pruned branch);
- timing.cache         tactic timings, reused by the next build on the same GPU and TensorRT.

After the build the plan is deserialized and run on the validation images the export stage checks
(`export.check_size`), against ONNX Runtime (CPU) on the same ONNX file: per image, max abs logit difference
within engine.fp32_atol / fp16_atol plus engine.fp32_rtol / fp16_rtol x that image's largest |logit|, or
(int8) top-1 agreement of at least engine.int8_min_agreement.
Where TensorRT is not importable or no CUDA GPU is visible the stage raises StageSkipped.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from rich.markup import escape

from pipeline.config import Config, EngineConfig
from pipeline.deploy.forms import onnx_key, output_prefix
from pipeline.deploy.onnx_io import exported_onnx
from pipeline.deploy.tensorrt_build import (
    BUILD_LOG,
    TIMING_CACHE,
    BatchProfile,
    batch_profile,
    build_engine,
    verify_engine,
)
from pipeline.deploy.tensorrt_runtime import import_tensorrt, sidecar_path
from pipeline.errors import PipelineError, StageSkipped
from pipeline.rundir import StageRecord, sha256_file, write_json
from pipeline.stage import StageContext, StageResult
from pipeline.training.data import load_datasets


def tensorrt_or_skip(cfg: EngineConfig) -> ModuleType:
    """The tensorrt module, or StageSkipped naming what is missing on this machine."""
    if not cfg.enabled:
        raise StageSkipped("engine.enabled is false in the config")
    trt, reason = import_tensorrt()
    if trt is None:
        raise StageSkipped(reason)
    if not torch.cuda.is_available():
        raise StageSkipped("no CUDA GPU is visible; a TensorRT engine is built on (and runs only on) the GPU "
                           "model that will serve it: run this stage on that host")
    return trt


def choose_precision(cfg: EngineConfig, export: StageRecord) -> tuple[str, str]:
    """(precision, why): engine.precision, or for `auto` the lowest precision whose ONNX the export
    accuracy guard deployed (int8, else fp16, else fp32). A precision the guard rejected is never built."""
    outputs, figures = export.outputs, export.summary.get("branch", {})
    if cfg.precision != "auto":
        if onnx_key("branch", cfg.precision) not in outputs:
            why = figures.get(cfg.precision, {}).get("reason", "it was not exported")
            raise PipelineError(f"engine.precision {cfg.precision}: that ONNX is not deployed ({why}); set "
                                "engine.precision: auto to build the lowest precision that passed")
        return cfg.precision, "engine.precision in the config"
    notes = []
    for precision in ("int8", "fp16"):
        if onnx_key("branch", precision) in outputs:
            drop = figures.get(precision, {}).get("drop")
            return precision, "; ".join([*notes, f"auto: {precision} passed the export accuracy guard "
                                                 f"({fmt_drop(drop)} on validation)"])
        notes.append(f"{precision} " + (f"not deployed ({figures[precision]['reason']})" if precision in figures
                                        else "not exported"))
    return "fp32", "; ".join([*notes, "auto: fp32"])


def fmt_drop(drop: float | None) -> str:
    return "drop not recorded" if drop is None else f"{-drop:+.2f} top-1 points vs fp32"


def validation_images(cfg: Config, profile: BatchProfile) -> torch.Tensor:
    """The export check's validation images (the first export.check_size), fitted into the profile."""
    val = load_datasets(cfg.data).val
    count = min(max(cfg.export.check_size, profile.min_batch), profile.max_batch)
    images, _ = next(val.batches(min(count, len(val))))
    if len(images) < count:  # fewer validation images than the profile's minimum batch
        images = images.repeat(-(-count // len(images)), 1, 1, 1)[:count]
    return images


def run(ctx: StageContext) -> StageResult:
    cfg = ctx.cfg.engine
    trt = tensorrt_or_skip(cfg)
    export = ctx.record("export")
    if export is None or not export.done:
        raise PipelineError("the export stage has not finished; run it first (one-pipeline run CONFIG --until export)")
    precision, why = choose_precision(cfg, export)
    ctx.console.print(escape(f"engine precision {precision}: {why}"))
    subjects = ["branch"] + (["ensemble"] if cfg.ensemble and onnx_key("ensemble", precision) in
                             export.outputs else [])
    if onnx_key("pruned", precision) in export.outputs:  # compress's network, same precision
        subjects.append("pruned")
    outputs: dict[str, Path] = {}
    summary: dict[str, Any] = {"precision": precision, "why": why}
    for subject in subjects:
        info, info_path = _build_one(ctx, trt, subject, precision, why)
        prefix = output_prefix(subject)
        outputs.update({f"{prefix}engine": ctx.run.path("engine", info["plan"]), f"{prefix}engine_info": info_path,
                        f"{prefix}build_log": ctx.run.path("engine", info["log"])})
        summary[subject] = {k: info[k] for k in ("tensorrt", "gpu", "compute_capability", "precision", "profile",
                                                 "plan_bytes", "build_s", "timing_cache", "check")}
    return StageResult(outputs=outputs, summary=summary)


def _build_one(ctx: StageContext, trt: ModuleType, subject: str, precision: str,
               why: str) -> tuple[dict[str, Any], Path]:
    """Build, record and check the engine of one exported subject (the branch, ONE-E or the pruned branch)."""
    cfg = ctx.cfg.engine
    onnx_path = exported_onnx(ctx, onnx_key(subject, precision))
    profile = batch_profile(onnx_path, cfg)
    out = ctx.stage_dir("engine")
    prefix = output_prefix(subject)
    plan_path, log_path = out / f"{onnx_path.stem}.plan", out / f"{prefix}{BUILD_LOG}"  # model_int8.plan, ...
    built = build_engine(trt, onnx_path, plan_path, profile, workspace_mb=cfg.workspace_mb,
                         timing_cache=out / TIMING_CACHE, log_path=log_path, console=ctx.console)
    major, minor = torch.cuda.get_device_capability()
    info: dict[str, Any] = {
        "plan": plan_path.name, "log": log_path.name, "model": subject, "tensorrt": trt.__version__,
        "gpu": torch.cuda.get_device_name(), "compute_capability": f"{major}.{minor}", "precision": precision,
        "precision_why": why, "profile": profile.to_dict(), "onnx": str(onnx_path.relative_to(ctx.run.root)),
        "onnx_sha256": sha256_file(onnx_path), "plan_sha256": sha256_file(plan_path),
        "plan_bytes": plan_path.stat().st_size, "workspace_mb": cfg.workspace_mb, **built,
        "built": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "check": None,
    }
    if cfg.verify:
        info["check"] = verify_engine(plan_path, onnx_path, validation_images(ctx.cfg, profile), precision, cfg)
    info_path = sidecar_path(plan_path)
    write_json(info_path, info)
    check = info["check"]
    if check is not None:
        if not check["passed"]:
            raise PipelineError(f"the {precision} {subject} engine disagrees with ONNX Runtime on {check['images']} "
                                f"validation images: {check['problem']}; figures in {info_path}")
        ctx.console.print(f"{subject} check: max abs logit diff {check['max_abs_diff']:.3g}, top-1 agreement "
                          f"{check['top1_agreement']:.1%} on {check['images']} images")
    return info, info_path
