"""report: bench.json -> report/report.md (headline, results table, skipped rows, environment) and
report/accuracy_vs_latency.png (one labelled point per measured row)."""

from __future__ import annotations

import json
from pathlib import Path

from matplotlib.figure import Figure
from pydantic import ValidationError
from rich.markup import escape

from pipeline.deploy.benchfile import (
    FORMAT_NAMES,
    BenchFile,
    fmt,
    headline_text,
    reason_lines,
    rich_table,
    short_label,
    table_cells,
    table_headers,
)
from pipeline.errors import ArtifactError, StageSkipped
from pipeline.rundir import atomic_path, write_text
from pipeline.stage import StageContext, StageResult

PLOT_SIZE_IN, PLOT_DPI = (8.0, 5.0), 100  # 800 x 500 pixels
COLOURS = {"ensemble": "tab:red", "full_branch": "tab:orange", "branch": "tab:blue"}
MARKERS = {"pytorch": "o", "torch.compile": "D", "onnxruntime": "s", "tensorrt": "^", "triton": "v"}


def run(ctx: StageContext) -> StageResult:
    entry = ctx.run.stage("bench") or {}
    if entry.get("status") == "skipped":
        raise StageSkipped(f"nothing to report: bench skipped ({entry.get('reason', '')})")
    bench = load_bench(ctx.input("bench", "bench"))
    out = ctx.stage_dir("report")
    report, plot = out / "report.md", out / "accuracy_vs_latency.png"
    write_text(report, markdown(bench, plot.name))
    write_plot(bench, plot)
    ctx.console.print(rich_table(bench))
    ctx.console.print(escape(headline_text(bench)))
    ctx.console.print(escape(f"report: {report}\nplot:   {plot}"), highlight=False)
    return StageResult(outputs={"report": report, "plot": plot},
                       summary={"rows": len(bench.rows), "ok": sum(r.status == "ok" for r in bench.rows)})


def load_bench(path: Path) -> BenchFile:
    """bench.json, checked against its schema (pipeline/deploy/benchfile.py, docs/bench_schema.md)."""
    try:
        return BenchFile.model_validate(json.loads(path.read_text()))
    except (json.JSONDecodeError, ValidationError) as exc:
        first = str(exc).splitlines()[0] if not isinstance(exc, ValidationError) else (
            f"{'.'.join(map(str, exc.errors()[0]['loc']))}: {exc.errors()[0]['msg']}")
        raise ArtifactError(f"{path} does not follow the bench schema ({first}); rerun with --force bench") from None


def markdown(bench: BenchFile, plot_name: str) -> str:
    s = bench.settings
    lines = [f"# Benchmark: {bench.run}", "", "## Headline", "", *_headline(bench), "",
             f"![accuracy vs batch-1 latency]({plot_name})", "", "## Results", "",
             f"Latency at batch 1 over {s.get('iterations')} calls after {s.get('warmup')} warm-up calls; "
             f"throughput at batch {s.get('throughput_batch')}. Top-1 on {bench.test_images} test images; "
             "agreement: share of top-1 predictions equal to the stripped branch's in PyTorch. "
             "FLOPs per image, counted by `torch.utils.flop_counter` (ONNX and TensorRT rows share the "
             "PyTorch model's count).", ""]
    headers = table_headers(bench)
    lines += ["| " + " | ".join(headers) + " |", "|" + "|".join("---" if i < 4 else "---:"
                                                               for i in range(len(headers))) + "|"]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in table_cells(row)) + " |" for row in bench.rows]
    compared = [r for r in bench.rows if r.vs_fp32 is not None]
    if compared:
        lines += ["", "## Lower precision vs fp32 (ONNX Runtime)", ""]
        lines += [f"- {r.label}: top-1 {_points(r.vs_fp32.accuracy_delta)} vs fp32; at batch 1 (p50) "
                  f"{_speed(r.vs_fp32.speedup_p50)}." for r in compared]
    skipped = reason_lines(bench)
    if skipped:
        lines += ["", "## Skipped and failed rows", "", *[f"- {line}" for line in skipped]]
    if bench.checks:
        lines += ["", "## Checks", ""]
        lines += [f"- {c.row}: top-1 {c.bench:.4f}% {'equals' if c.equal else 'DIFFERS FROM'} the {c.train:.4f}% "
                  f"training recorded (test, {c.train_head})." for c in bench.checks]
    env = bench.environment
    lines += ["", "## Environment", "", f"- device: {bench.device}, {bench.threads} thread(s) for every row, "
              f"{env.get('cpu_count')} CPU cores, GPU: {env.get('cuda') or 'none'}",
              "- " + ", ".join(f"{k} {env.get(k) or 'not installed'}"
                               for k in ("python", "torch", "onnx", "onnxruntime", "tensorrt")),
              f"- platform: {env.get('platform')}", ""]
    return "\n".join(lines)


def _speed(speedup: float | None) -> str:
    if speedup is None:
        return "no speed comparison (the fp32 row did not run)"
    return f"{speedup:.2f}x faster than fp32" if speedup >= 1 else f"{1 / speedup:.2f}x slower than fp32"


def _points(delta: float | None) -> str:
    return "-" if delta is None else f"{delta:+.2f} points"


def _headline(bench: BenchFile) -> list[str]:
    h = bench.headline
    if h.speedup_p50 is None:
        return [f"No headline: {h.reason or 'the ensemble or the branch row did not run'}."]
    ens, br = bench.row(h.ensemble_row), bench.row(h.branch_row)
    delta = h.accuracy_delta
    direction = "lower" if delta < 0 else "higher"
    cost = "the same top-1 accuracy" if delta == 0 else f"**{abs(delta):.2f} points {direction}**"
    return [
        f"- **Speed:** the kept branch in {FORMAT_NAMES[br.format]} {br.precision} answers one image in "
        f"{br.latency_ms.p50:.3f} ms (p50) against {ens.latency_ms.p50:.3f} ms for the full ONE ensemble (ONE-E) "
        "in PyTorch eager: "
        f"**{h.speedup_p50:.2f}x faster**.",
        f"- **Size:** {br.file_bytes / 1e6:.3f} MB against {ens.file_bytes / 1e6:.3f} MB on disk: "
        f"**{fmt(h.size_ratio)}x smaller** ({fmt(h.params_ratio)}x fewer parameters, "
        f"{fmt(h.flops_ratio)}x fewer FLOPs).",
        f"- **Accuracy:** {h.branch_accuracy:.2f}% top-1 against {h.ensemble_accuracy:.2f}% for the ensemble: {cost}.",
    ]


def write_plot(bench: BenchFile, path: Path) -> None:
    """Top-1 against batch-1 p50 latency, whiskers to p99; log x when latencies span over 10x."""
    rows = [r for r in bench.rows if r.status == "ok" and r.accuracy is not None and r.latency_ms]
    fig = Figure(figsize=PLOT_SIZE_IN, dpi=PLOT_DPI, layout="constrained")  # no pyplot: no window, no global state
    ax = fig.subplots()
    for number, row in enumerate(rows, start=1):  # numbered points, named in the legend: labels never collide
        lat = row.latency_ms
        ax.errorbar(lat.p50, row.accuracy, xerr=[[0], [max(lat.p99 - lat.p50, 0)]], fmt=MARKERS[row.format],
                    color=COLOURS[row.model], markersize=8, capsize=3,
                    label=f"{number}: {short_label(row)}, {lat.p50:.3f} ms, {row.accuracy:.2f}%")
        ax.annotate(str(number), (lat.p50, row.accuracy), textcoords="offset points",
                    xytext=(0, 8 if number % 2 else -15), ha="center", fontsize=9, fontweight="bold")
    h = bench.headline
    ens, br = bench.row(h.ensemble_row), bench.row(h.branch_row)
    if h.speedup_p50 is not None:
        ax.annotate("", xy=(br.latency_ms.p50, br.accuracy), xytext=(ens.latency_ms.p50, ens.accuracy),
                    arrowprops={"arrowstyle": "->", "linestyle": "--", "color": "grey"})
    latencies = [r.latency_ms.p50 for r in rows]
    if latencies and max(latencies) / max(min(latencies), 1e-12) > 10:
        ax.set_xscale("log")
    ax.margins(x=0.15, y=0.2)
    if rows:
        ax.legend(fontsize=7, loc="best", title="p50 latency at batch 1, top-1", title_fontsize=7)
    title = f"{bench.run}: accuracy vs latency on {bench.device}, {bench.threads} thread(s)"
    if h.speedup_p50 is not None:
        title += f"\nbranch {h.speedup_p50:.1f}x faster than ONE-E, {_points(h.accuracy_delta)} top-1"
    ax.set(title=title, xlabel="batch-1 latency, p50 (ms); whisker to p99", ylabel="top-1 accuracy (%)")
    ax.grid(True, which="both", alpha=0.3)
    if not rows:
        ax.text(0.5, 0.5, "no row was measured", ha="center", va="center", transform=ax.transAxes)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=PLOT_DPI)
