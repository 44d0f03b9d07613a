"""How the compress stage gets its plan: to `compress.flops_ratio` (prune.plan_widths), to a latency target
measured on this host (pipeline/deploy/latency_plan.py), or pinned by a plan file (`compress.plan`).

    planned = stage_plan(ctx, branch, example, images)
    planned.plan          # a prune.Plan: widths, blocks per stage, FLOPs
    planned.summary       # what compress/summary.json adds (`latency_plan`: target, measured speed-up, CPU)
    planned.outputs       # {"plan": compress/plan.json} for latency and pinned plans

A latency plan depends on the host, so compress/plan.json records what it was measured on (its `key`:
target, runtime, precision, batch, threads, CPU model, channel multiple, network) and is reused while the
key holds; any change plans again. The target lives in the compress section, so changing it makes the
stage stale as any config change does; the CPU and the bench's threads do not, so the runner asks
`host_changed` too. A pinned plan is never re-planned: that is what pinning is for (one network for every
run of a comparison, whatever host each runs on).
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from pipeline.config import CompressConfig, Config
from pipeline.deploy import latency_plan, plan_timing
from pipeline.errors import ArtifactError, StageSkipped, UsageError
from pipeline.rundir import StageRecord, cpu_model, write_json
from pipeline.stage import StageContext
from pipeline.training import prune
from pipeline.training.data import ImageSet
from pipeline.training.models import SingleNet, stage_depths

PLAN_VERSION = 3  # 2: planned with MARGIN; 3: the most params (not FLOPs) kept
# The planner aims this much past the target: the widest plan meeting the target sits at its edge, where the
# bench's own rounds read it a few percent either side (1.49x for a plan planned at 1.51x, target 1.5x)
MARGIN = 0.05
DEFAULT_CANDIDATES = 40
CALIBRATION_IMAGES = 32  # int8_cpu candidates: enough for the quantizer; their accuracy is not what is timed


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """The CPU's feature flags (/proc/cpuinfo's first `flags` line; empty where there is none)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def channel_block(flags: set[str], runtime: str) -> int:
    """The channel block the runtime's convolution kernels work on: ONNX Runtime's NCHWc and oneDNN's blocked
    layouts (OpenVINO) are 16 channels wide on AVX-512 and 8 on AVX2; TensorRT's tensor cores take 8."""
    if runtime == "tensorrt":
        return 8
    return 16 if "avx512f" in flags else 8


def channel_multiple(cfg: CompressConfig, flags: set[str] | None = None) -> int:
    if cfg.channel_multiple != "auto":
        return cfg.channel_multiple
    return channel_block(cpu_flags() if flags is None else flags, cfg.target_runtime or "onnxruntime")


def has_latency_target(cfg: CompressConfig) -> bool:
    return cfg.target_speedup is not None or cfg.target_ms is not None


def where(cfg: Config) -> plan_timing.Where:
    """Where the target is measured: the bench's threads, as the bench will time the pruned form."""
    c = cfg.compress
    return plan_timing.Where(c.target_runtime or "onnxruntime", c.target_precision or "fp32", c.target_batch or 1,
                             cfg.bench.threads or os.cpu_count() or 1, cfg.bench.turn_pause_s)


def target_of(cfg: CompressConfig, margin: float = 0.0) -> latency_plan.Target:
    """The latency target, or with `margin` what the planner aims at: that share faster."""
    if cfg.target_speedup is not None:
        return latency_plan.Target(speedup=round(cfg.target_speedup * (1 + margin), 6))
    return latency_plan.Target(ms=round(cfg.target_ms / (1 + margin), 6))


def plan_key(cfg: Config, branch: SingleNet, sample_shape: tuple[int, ...]) -> dict[str, Any]:
    """What a latency plan depends on; a plan file with another key is planned again."""
    c = cfg.compress
    return {"version": PLAN_VERSION, "target": {"speedup": c.target_speedup, "ms": c.target_ms},
            **dataclasses.asdict(where(cfg)), "cpu": cpu_model(), "channel_multiple": channel_multiple(c),
            "network": branch.spec.to_dict(), "input": list(sample_shape),
            "candidates": c.plan_candidates or DEFAULT_CANDIDATES}


def host_changed(cfg: Config, entry: StageRecord) -> str | None:
    """Why a finished compress stage's latency plan no longer fits this host (None: it does)."""
    planned = entry.summary.get("latency_plan") or {}
    if not planned or planned.get("source") == "pinned":
        return None
    now = {"cpu": cpu_model(), "threads": where(cfg).threads}
    for key, value in now.items():
        if planned.get(key) != value:
            return f"its latency plan was measured with {key} {planned.get(key)}, this host has {value}"
    return None


@dataclasses.dataclass
class Planned:
    plan: prune.Plan
    summary: dict[str, Any]
    outputs: dict[str, Path]
    fingerprint: str  # added to the fine-tune's resume fingerprint: another plan is another network


def stage_plan(ctx: StageContext, branch: SingleNet, example: torch.Tensor, images: ImageSet) -> Planned:
    cfg = ctx.cfg.compress
    multiple = channel_multiple(cfg)
    if not has_latency_target(cfg) and cfg.plan is None:
        plan = prune.plan_widths(branch, example, cfg.flops_ratio, multiple)
        return Planned(plan, {"stage_blocks": list(stage_depths(branch.spec)), "channel_multiple": multiple}, {}, "")
    space = latency_plan.PlanSpace(branch.spec, prune.conv_geometry(branch, example), multiple)
    path = ctx.stage_dir("compress") / "plan.json"
    if cfg.plan is not None:
        data, source = {**read_plan_file(cfg.plan), "pinned_from": str(cfg.plan)}, "pinned"
    else:
        key = plan_key(ctx.cfg, branch, tuple(example.shape[1:]))
        data = read_plan_file(path) if path.exists() and not ctx.fresh else {}
        source = "reused" if data.get("key") == key else "planned"
        if source == "planned":
            data = measure(ctx, space, tuple(example.shape[1:]), images, key)
    plan = space.plan(shape_of(data.get("chosen"), space, cfg.plan or path))
    write_json(path, data)
    label = space.label(space_shape(plan))
    record, key = data["chosen"], data.get("key") or {}
    summary = {"stage_blocks": list(plan.stage_blocks), "channel_multiple": multiple, "target_flops_ratio": None,
               "latency_plan": {
        "source": source, "target": {"speedup": cfg.target_speedup, "ms": cfg.target_ms},
        **{k: key.get(k) for k in ("runtime", "precision", "batch", "threads", "cpu", "channel_multiple")},
        "plan": label, "speedup": record.get("speedup"), "speedup_spread": record.get("spread"),
        "p50_ms": record.get("p50_ms"), "branch_p50_ms": (data.get("branch") or {}).get("p50_ms"),
        "candidates": len(data.get("candidates", [])), "seconds": data.get("seconds"),
        **({"pinned_from": str(cfg.plan)} if cfg.plan else {})}}
    timed = f", {len(data['candidates']) + 1} plans timed in {data['seconds']:.0f} s" if source == "planned" else ""
    ctx.console.print(f"latency plan ({source}): {label}, {_figures(record)}"
                      + (f" in {key['runtime']} {key['precision']} on {key['cpu']}" if key else "") + timed)
    return Planned(plan, summary, {"plan": path}, label)


def _figures(record: dict[str, Any]) -> str:
    if record.get("speedup") is None:
        return "not measured here"
    return f"{record['speedup']:.2f}x the kept branch ({record['p50_ms']:.3f} ms)"


def measure(ctx: StageContext, space: latency_plan.PlanSpace, sample_shape: tuple[int, ...], images: ImageSet,
            key: dict[str, Any]) -> dict[str, Any]:
    """Plan on this host's clock; the plan file's contents (every timed candidate)."""
    cfg = ctx.cfg.compress
    place = where(ctx.cfg)
    plan_timing.refuse_unsupported(place)
    target, aim = target_of(cfg), target_of(cfg, MARGIN)
    calibration = images.subset(range(min(CALIBRATION_IMAGES, len(images)))) if place.precision == "int8_cpu" else None
    ctx.console.print(f"planning for {target.describe()} (aiming at {aim.describe()}, {MARGIN:.0%} past it) in "
                      f"{place.describe()} on {key['cpu']} (channel multiple {key['channel_multiple']}, at most "
                      f"{key['candidates']} candidates)")
    with tempfile.TemporaryDirectory(prefix="one-plan-") as workdir:
        clock = plan_timing.RuntimeClock(space.network, space.label, sample_shape, place, Path(workdir), calibration)
        try:
            result = latency_plan.Search(space, clock, aim, key["candidates"], log=ctx.console.print).run()
        except latency_plan.OutOfReach as exc:
            if not target.met_by(exc.fastest):
                raise UsageError(out_of_reach(cfg, space, exc, place)) from None
            ctx.console.print(f"{aim.describe()} is out of reach; planning for {target.describe()} itself")
            aim = target
            try:  # the clock keeps every network it built: only the timing is done again
                result = latency_plan.Search(space, clock, aim, key["candidates"], log=ctx.console.print).run()
            except latency_plan.OutOfReach as exc:
                raise UsageError(out_of_reach(cfg, space, exc, place)) from None
    if result.chosen is result.base:
        raise StageSkipped(f"the kept branch already runs in {result.base.p50_ms:.3f} ms <= compress.target_ms "
                           f"{cfg.target_ms:g} in {place.describe()}: it is deployed unpruned")
    return {**plan_document(space, result, target, key), "aim": {"speedup": aim.speedup, "ms": aim.ms}}


def out_of_reach(cfg: CompressConfig, space: latency_plan.PlanSpace, exc: latency_plan.OutOfReach,
                 place: plan_timing.Where) -> str:
    fast = exc.fastest
    named = f"compress.target_speedup {cfg.target_speedup:g}" if cfg.target_speedup else \
        f"compress.target_ms {cfg.target_ms:g}"
    return (f"{named} is out of reach here: the fastest plan measured ({space.label(fast.shape)}) ran "
            f"{fast.speedup:.2f}x the kept branch ({fast.p50_ms:.3f} vs {exc.base.p50_ms:.3f} ms) in "
            f"{place.describe()}; aim at most for that, or set compress.channel_multiple lower")


def plan_document(space: latency_plan.PlanSpace, result: latency_plan.Result, target: latency_plan.Target,
                  key: dict[str, Any]) -> dict[str, Any]:
    ranked = sorted(result.candidates, key=lambda c: c.capacity, reverse=True)
    at = ranked.index(result.chosen)  # neighbours: the two measured plans on each side of it in capacity
    neighbours = {c.shape for c in ranked[max(at - 2, 0):at] + ranked[at + 1:at + 3] if c is not result.base}

    def record(c: latency_plan.Candidate) -> dict[str, Any]:
        plan = space.plan(c.shape)
        return {"label": space.label(c.shape), "stage_widths": list(plan.stage_widths),
                "inner_widths": list(plan.inner_widths), "stage_blocks": list(plan.stage_blocks), "flops": c.flops,
                "flops_ratio": round(c.flops / result.base.flops, 4), "params": c.params,
                "p50_ms": round(c.p50_ms, 6), "speedup": round(c.speedup, 4),
                "spread": [round(min(c.round_speedups), 4), round(max(c.round_speedups), 4)],
                "rounds": len(c.round_ms), "meets": target.met_by(c), "confirmed": c.confirmed,
                **({"confirmation": {"speedup": round(c.confirmation[0], 4), "p50_ms": round(c.confirmation[1], 6)}}
                   if c.confirmation else {}), "phase": c.phase,
                "chosen": c is result.chosen, "neighbour": c.shape in neighbours}

    return {"key": key, "planned_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "seconds": round(result.seconds, 2),
            "budget_spent": result.budget_spent, "rounds": {"step": latency_plan.ROUNDS,
                                                            "repeat": latency_plan.REPEAT_ROUNDS,
                                                            "confirm": latency_plan.CONFIRM_ROUNDS},
            "iterations_per_round": {"least": plan_timing.MIN_ITERATIONS, "most": plan_timing.ITERATIONS,
                                     "turn_ms": plan_timing.TURN_MS}, "branch": record(result.base),
            "chosen": record(result.chosen), "candidates": [record(c) for c in ranked if c is not result.base]}


def read_plan_file(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UsageError(f"compress.plan {path} not found; name a compress/plan.json of an earlier run") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{path} is not a readable plan file ({type(exc).__name__}); rerun compress with "
                            "--force to plan again") from None
    if not isinstance(data, dict) or not isinstance(data.get("chosen"), dict):
        raise ArtifactError(f"{path} names no `chosen` plan (stage_widths, inner_widths, stage_blocks)")
    return data


def shape_of(chosen: dict[str, Any] | None, space: latency_plan.PlanSpace, path: Path) -> latency_plan.Shape:
    """The chosen plan of a plan file as a point of `space`; one that does not fit this network is one line."""
    try:
        shape = tuple(int(v) for part in ("stage_widths", "inner_widths", "stage_blocks") for v in chosen[part])
    except (KeyError, TypeError, ValueError):
        raise ArtifactError(f"{path}: `chosen` needs stage_widths, inner_widths and stage_blocks lists") from None
    full = space.full()
    if len(shape) != len(full) or not all(1 <= v <= f for v, f in zip(shape, full)):
        raise UsageError(f"{path}: the plan {chosen.get('stage_widths')}/{chosen.get('inner_widths')}/"
                         f"{chosen.get('stage_blocks')} does not fit the kept branch ({space.label(full)}); plan "
                         "for this network (leave compress.plan out)")
    return shape


def space_shape(plan: prune.Plan) -> latency_plan.Shape:
    return (*plan.stage_widths, *plan.inner_widths, *plan.stage_blocks)
