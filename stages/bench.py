"""bench: measure every deployed form of the kept branch and its ONE-E twin on the same inputs, one row
each, into bench.json, so that every comparison changes one thing at a time.

Rows, in order: PyTorch eager (ONE-E, the full model used for the kept branch, the stripped branch, and
with compress.enabled the pruned branch), torch.compile (CUDA only), ONNX Runtime per exported precision
(ONE-E, branch, pruned), OpenVINO on the CPU (fp32, bf16, int8_cpu; ONE-E, branch, pruned), TensorRT
(ONE-E, branch, pruned), and with `bench.baseline` the same network trained alone (PyTorch eager and ONNX
Runtime fp32). A row that cannot run here is `skipped` with the reason (a model the export accuracy guard
rejected among them); one whose file could not be made is `failed` in "export", one whose file exists but
did not run is `failed` in "bench" (Ultralytics keeps the two apart). Every row: top-1 on the test set,
agreement with the same model in PyTorch eager, batch-1 latency (p50/p90/p99), throughput at each of
`bench.batch_sizes`, params, FLOPs, file size. Accuracy is measured row by row; timing afterwards, in
`bench.rounds` rounds in which every row takes its turn (pipeline/deploy/bench_rounds.py; the Triton row,
timed through its server, apart).
The forms, their names and labels come from the table in pipeline/deploy/forms.py, in its order of
runtimes; each runtime's rows are made by its maker in stages/bench_rows.py (stages/bench_measure.py: how
one row is measured and made).
The headline splits the gain into its parts (strip, runtime, precision) and picks what to ship. Schema:
docs/bench_schema.md (`pipeline/deploy/benchfile.py`).
"""

from __future__ import annotations

import os
from pathlib import Path

import onnx
import torch
from rich.markup import escape
from torch import nn

from pipeline.config import Config
from pipeline.deploy import bench_rounds, target_check, target_timing
from pipeline.deploy.benchfile import (
    SCHEMA_VERSION,
    BenchFile,
    Row,
    headline_figures,
    headline_text,
    rich_table,
)
from pipeline.deploy.forms import row_name
from pipeline.deploy.onnx_io import export_onnx
from pipeline.deploy.runtime import onnxruntime_session
from pipeline.deploy.unmeasured import console_lines
from pipeline.errors import StageSkipped, UsageError
from pipeline.rundir import RunDir, atomic_path, cpu_model, environment, write_json
from pipeline.stage import StageContext, StageResult
from pipeline.training.checkpoint import load_model
from pipeline.training.models import EnsembleNet
from stages.bench_measure import Bench, Form
from stages.bench_rows import runtime_rows


def run(ctx: StageContext) -> StageResult:
    if not ctx.cfg.bench.enabled:
        raise StageSkipped("bench.enabled is false in the config")
    threads = ctx.cfg.bench.threads or os.cpu_count() or 1
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)  # the same thread count for every row, ORT included
    try:
        bench = measure(ctx, threads)
    finally:
        torch.set_num_threads(previous)
    path = ctx.stage_dir("bench") / "bench.json"
    write_json(path, bench.model_dump(mode="json"))
    ctx.console.print(rich_table(bench))
    for line in console_lines(bench):
        ctx.console.print(f"  [dim]{escape(line)}[/dim]", highlight=False)
    ctx.console.print(escape(headline_text(bench)))
    if bench.headline.target:
        ctx.console.print(escape(target_check.sentence(bench.headline.target)), highlight=False)
    ship = bench.headline.ship
    if ship and ship.row:
        ctx.console.print(escape(f"What to ship here: {ship.row} ({ship.file}, Triton model {ship.triton_model}): "
                                 f"{ship.reason}"))
    for check in bench.checks:
        if not check.equal:
            ctx.console.print(f"[red]warning:[/red] {check.row} top-1 {check.bench} differs from the {check.train} "
                              f"training recorded for test {check.train_head}")
    outputs = {"bench": path}
    if (ctx.run.path("bench") / BASELINE_ONNX).exists():
        outputs["baseline_onnx"] = ctx.run.path("bench") / BASELINE_ONNX
    return StageResult(outputs=outputs, summary=bench.headline.model_dump(mode="json"))


BASELINE_ONNX = "baseline_fp32.onnx"


def baseline_model(cfg: Config) -> tuple[nn.Module, Path] | None:
    """The network of the `bench.baseline` run: a vanilla run's trained model, or another ONE run's
    stripped branch. A user's mistake (no such run, another dataset) is a UsageError naming the fix."""
    if cfg.bench.baseline is None:
        return None
    root = Path(cfg.bench.baseline).expanduser()
    run = RunDir(root)
    entry = run.stage("train") if run.manifest_path.exists() else None  # another run's: not a read of this run
    if entry is None or not entry.done:
        raise UsageError(f"bench.baseline {root} holds no finished training run; train one first, e.g. one-pipeline "
                         "run CONFIG --until train --set model.method=vanilla --set name=NAME")
    theirs, ours = entry.config.get("data", {}), cfg.model_dump(mode="json")["data"]
    if any(theirs.get(k) != ours[k] for k in ("dataset", "root", "val_size", "synthetic_size")):
        raise UsageError(f"bench.baseline {root} was trained on other data ({theirs.get('dataset')}, val_size "
                         f"{theirs.get('val_size')}); compare runs of the same data split")
    method = entry.summary.get("method", entry.config.get("model", {}).get("method"))
    stage = "train" if method == "vanilla" else "strip"
    path = run.output(stage, "model")  # another run's
    model, _ = load_model(path)
    return model, path


def measure(ctx: StageContext, threads: int) -> BenchFile:
    """Every row of the table's forms (pipeline/deploy/forms.py), accuracy row by row, then the timing rounds."""
    baseline = baseline_model(ctx.cfg)  # a mistake here is the user's: before any measuring
    bench = Bench(ctx, threads)
    full_path, branch_path = ctx.input("train", "model"), ctx.input("strip", "model")
    full, _ = load_model(full_path)
    stripped, payload = load_model(branch_path)
    bench.branch = int(payload.get("branch", ctx.summary("select").get("branch", 0)))
    bench.method = ctx.summary("train").get("method", ctx.cfg.model.method)
    bench.full, bench.stripped = full.to(bench.device), stripped.to(bench.device)
    bench.static["branch"] = bench.static_figures(bench.stripped, branch_path)
    if bench.method == "one":
        bench.static["ensemble"] = bench.static_figures(EnsembleNet(bench.full), full_path)
    made = runtime_rows(bench)
    if baseline is not None:
        made += _baseline_rows(bench, *baseline)
    timings = bench_rounds.time_rows(list(bench.timers.values()), bench.cfg, bench.device, ctx.console)
    rows = bench.finish(made, timings)
    cfg = bench.cfg
    headline = headline_figures(rows, cfg.ship_max_accuracy_drop, cfg.ship_for)
    compress = ctx.record("compress")
    paired = target_timing.measure_target(ctx.run, compress, threads, pause_s=cfg.turn_pause_s)
    headline["target"] = target_check.headline_target(rows, compress, cpu_model(), threads, paired)
    return BenchFile.model_validate({
        "schema_version": SCHEMA_VERSION, "run": ctx.cfg.name, "method": bench.method, "branch": bench.branch,
        "device": str(bench.device), "threads": threads, "test_images": len(bench.test),
        "eval_batch_size": bench.eval_batch, "batch_sizes": cfg.batch_sizes, "settings": cfg.model_dump(mode="json"),
        "environment": environment(), "baseline": str(cfg.baseline) if cfg.baseline else None,
        "checks": _checks(bench, rows), "rows": rows,
        "headline": headline})


def _baseline_rows(bench: Bench, model: nn.Module, path: Path) -> list:
    """The same network trained alone, in PyTorch eager and (exported here) ONNX Runtime fp32."""
    model = model.to(bench.device)
    static = bench.static_figures(model, path)
    ctx = bench.ctx

    def onnx_row() -> dict:
        onnx_path = ctx.stage_dir("bench") / BASELINE_ONNX
        images = bench.test.inputs(range(2))
        proto = export_onnx(model.cpu(), images, ctx.cfg.export.opset)
        model.to(bench.device)
        with atomic_path(onnx_path) as tmp:
            onnx.save(proto, str(tmp))
        return bench.session_figures(row_name("baseline", "onnxruntime"), onnxruntime_session(
            onnx_path, bench.threads, bench.device), onnx_path, static)

    return [bench.guard(Form("baseline", "pytorch"), lambda: bench.eager(row_name("baseline", "pytorch"), model,
                                                                         static)),
            bench.guard(Form("baseline", "onnxruntime"), onnx_row)]


def _checks(bench: Bench, rows: list[Row]) -> list[dict]:
    """The bench's top-1 against what training recorded for the same model (full test set only)."""
    recorded = bench.ctx.summary("train").get("test", {})
    if not bench.full_test_set or not recorded:
        return []
    b = bench.branch if bench.method == "one" else 0
    wanted = {row_name("ensemble", "pytorch"): "teacher", row_name("full_branch", "pytorch"): f"branches[{b}]",
              row_name("branch", "pytorch"): f"branches[{b}]"}
    checks = []
    for row in rows:
        head = wanted.get(row.name)
        if head is None or row.status != "ok":
            continue
        branches = recorded.get("branches", [])
        train = recorded.get("teacher") if head == "teacher" else branches[b] if b < len(branches) else None
        if train is not None:
            checks.append({"row": row.name, "train_head": head, "bench": row.accuracy, "train": train,
                           "equal": row.accuracy == train})
    return checks
