"""Runs the stages in order, like a build tool: a stage reruns only when its config sections or the
outputs of the stages it reads have changed since it last finished.

A stage's fingerprint is the digest of its config sections plus the sha256 of every output of the
stages it reads. `run` compares it with the one in the manifest: equal and outputs intact -> skip.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from types import ModuleType
from typing import Any, Callable

from rich.markup import escape

from pipeline.config import Config
from pipeline.errors import ArtifactError, PipelineError, StageSkipped, UsageError
from pipeline.rundir import RunDir, StageRecord, environment, sha256_file, write_text
from pipeline.stage import StageContext, StageResult


@dataclasses.dataclass(frozen=True)
class StageDef:
    name: str
    sections: tuple[str, ...]  # config fields whose change makes the stage stale
    reads: tuple[str, ...]  # stages whose outputs it reads
    module: str  # `stages.<module>` with `run(ctx) -> StageResult`
    help: str

    def entry(self) -> Callable[[StageContext], StageResult]:
        module: ModuleType = __import__(f"stages.{self.module}", fromlist=["run"])
        return module.run


# `reads` is every stage a stage reads (its context refuses any other, pipeline/stage.py), so its fingerprint
# covers all it depends on. Reading export's ONNX files reads strip and compress too: each file is checked
# against the checkpoint it was exported from (pipeline/deploy/onnx_io.py).
STAGES = (
    StageDef("train", ("seed", "data", "model", "loss", "train"), (), "train", "train ONE (or vanilla)"),
    StageDef("select", ("select",), ("train",), "select", "pick the branch with the best validation accuracy"),
    StageDef("strip", (), ("select", "train"), "strip", "cut the chosen branch out as a plain network"),
    StageDef("compress", ("compress",), ("strip", "train", "select"), "compress",
             "prune the kept branch and fine-tune it from ONE's teacher (compress.enabled)"),
    StageDef("export", ("export",), ("strip", "train", "compress"), "export",
             "export ONNX (branch and ONE-E; fp32, fp16, int8 forms) and guard its accuracy"),
    StageDef("engine", ("engine",), ("export", "strip", "compress"), "engine", "build a TensorRT engine"),
    StageDef("triton", ("triton",), ("export", "engine", "strip", "compress"), "triton",
             "write a Triton model repository"),
    StageDef("bench", ("bench",), ("train", "select", "strip", "compress", "export", "engine", "triton"), "bench",
             "measure every deployed form"),
    StageDef("report", (), ("bench", "export", "train", "select", "compress"), "report",
             "write report.md, its plot and the training curves"),
)
STAGE_NAMES = tuple(s.name for s in STAGES)


def stage_def(name: str) -> StageDef:
    for stage in STAGES:
        if stage.name == name:
            return stage
    raise UsageError(f"unknown stage '{name}'; choose one of {', '.join(STAGE_NAMES)}")


def fingerprint(cfg: Config, stage: StageDef, run: RunDir) -> str:
    upstream = {}
    for name in stage.reads:
        entry = run.stage(name)
        upstream[name] = {k: v.sha256 for k, v in entry.outputs.items()} if entry else {}
    text = json.dumps({"config": cfg.section_hash(*stage.sections) if stage.sections else "", "inputs": upstream},
                      sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def state(cfg: Config, stage: StageDef, run: RunDir) -> tuple[str, str]:
    """(status, detail): done | stale | skipped | failed | missing, checked against the files on disk."""
    entry = run.stage(stage.name)
    if entry is None:
        return "missing", ""
    status = entry.status
    if status == "failed":
        return "failed", entry.error
    if entry.fingerprint != fingerprint(cfg, stage, run):
        return "stale", "config or inputs changed"
    if status == "done" and stage.name == "compress":
        from pipeline.deploy.compress_plan import host_changed  # a latency plan holds on the host it was timed on

        if reason := host_changed(cfg, entry):
            return "stale", reason
    if status == "skipped":
        if machine_changed(entry):
            return "stale", "TensorRT or the GPU changed since it was skipped"
        return "skipped", entry.reason
    for key, record in entry.outputs.items():
        path = run.recorded_path(record.path)
        if not path.exists():
            return "stale", f"{record.path} is missing"
        if sha256_file(path) != record.sha256:
            raise ArtifactError(f"{path} does not match the sha256 recorded in the manifest (truncated or "
                                f"modified); it will not be used: rerun with --from {stage.name}")
    return "done", ""


def machine_changed(entry: StageRecord) -> bool:
    """A skip may have had a cause that is gone now (TensorRT installed, a GPU added): retry it then."""
    recorded, now = entry.environment, environment()
    return any(recorded.get(key) != now[key] for key in ("tensorrt", "cuda"))


def check_same_run(cfg: Config, run: RunDir) -> None:
    """A run directory holds one training run: refuse to overwrite it with another config's."""
    entry = run.stage("train")
    train = stage_def("train")
    if entry and entry.done and entry.fingerprint != fingerprint(cfg, train, run):
        old, new = entry.config, cfg.model_dump(mode="json")
        changed = []
        for section in train.sections:
            before, after = old.get(section), new[section]
            if isinstance(after, dict):
                changed += [f"{section}.{k}" for k in {**(before or {}), **after}
                            if (before or {}).get(k) != after.get(k)]
            elif before != after:
                changed.append(section)
        what = ", ".join(changed[:4]) or "a field this version of one-pipeline added"
        raise UsageError(f"{run.root} holds a run trained with another config (changed: {what}); "
                         "use another run name (--set name=...) or retrain it with --from train")


def run_stages(cfg: Config, run: RunDir, ctx: StageContext, *, until: str | None = None,
               force: str | None = None, only: str | None = None) -> dict[str, str]:
    """Run the chain (or one stage and what it needs); returns {stage: status}. Raises on failure."""
    last = STAGE_NAMES.index(until or only or STAGE_NAMES[-1])
    forced_from = STAGE_NAMES.index(force) if force else len(STAGE_NAMES)
    if forced_from > 0:  # --from train may overwrite another config's run
        check_same_run(cfg, run)
    results: dict[str, str] = {}
    try:
        for index, stage in enumerate(STAGES[:last + 1]):
            status, detail = state(cfg, stage, run)
            if index < forced_from and status in ("done", "skipped"):
                shown = "up to date" if status == "done" else f"skipped: {detail}"
                ctx.console.print(f"[dim]{stage.name:<7} {escape(shown)}[/dim]")
                if status == "skipped" and only == stage.name:  # the command asked for it and got nothing
                    raise StageSkipped(detail)
                results[stage.name] = "cached"
                continue
            fresh = index >= forced_from
            results[stage.name] = execute(cfg, stage, run, ctx, fresh=fresh, strict=only == stage.name)
    finally:
        if ctx.rank == 0 and "done" in results.values():  # the resolved config of what was produced
            write_text(run.path("config.yaml"), cfg.to_yaml())
    return results


def execute(cfg: Config, stage: StageDef, run: RunDir, ctx: StageContext, *, fresh: bool = False,
            strict: bool = False) -> str:
    """Run one stage and record it. A skip is recorded and, unless `strict`, the chain goes on."""
    ctx.console.rule(f"[bold]{stage.name}[/bold]: {stage.help}")
    ctx = dataclasses.replace(ctx, fresh=fresh).for_stage(stage.name, stage.reads)
    started = time.perf_counter()
    record: dict[str, Any] = {"fingerprint": fingerprint(cfg, stage, run), "config": cfg.model_dump(mode="json"),
                              "environment": environment(), "device": str(ctx.device)}
    if ctx.rank != 0:  # under torchrun the other ranks take part in the stage; rank 0 records it
        stage.entry()(ctx)
        return "done"
    try:
        result = stage.entry()(ctx)
    except StageSkipped as exc:
        run.record(stage.name, {**record, "status": "skipped", "reason": str(exc), "outputs": {},
                                "wall_s": round(time.perf_counter() - started, 3)})
        ctx.console.print(f"[yellow]{stage.name} skipped:[/yellow] {escape(str(exc))}")
        if strict:
            raise
        return "skipped"
    except PipelineError as exc:
        if run.stage(stage.name) is None:  # a failure never replaces what an earlier command recorded
            run.record(stage.name, {**record, "status": "failed", "error": str(exc), "outputs": {},
                                    "wall_s": round(time.perf_counter() - started, 3)})
        raise
    run.record(stage.name, {**record, "status": "done", "outputs": run.describe_outputs(result.outputs),
                            "summary": result.summary, "wall_s": round(time.perf_counter() - started, 3)})
    ctx.console.print(f"[green]{stage.name} done[/green] in {time.perf_counter() - started:.1f} s")
    return "done"
