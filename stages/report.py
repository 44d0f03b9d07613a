"""report: bench.json -> report/report.md (headline, results table with the forms not measured folded under
it, training, environment),
report/accuracy_vs_latency.png (one labelled point per measured row) and report/training_curves.png (loss,
learning rate and validation top-1 per epoch, from train/metrics.jsonl)."""

from __future__ import annotations

import json
from pathlib import Path

from matplotlib.figure import Figure
from pydantic import ValidationError
from rich.markup import escape

from pipeline.compare import recipe
from pipeline.deploy import target_check
from pipeline.deploy.benchfile import (
    BenchFile,
    Gain,
    fmt,
    gain,
    headline_text,
    of_this_version,
    pareto_front,
    rich_table,
    runtime_text,
    short_label,
    table_cells,
    table_headers,
)
from pipeline.deploy.forms import MODELS, RUNTIMES, deployable, row_name
from pipeline.deploy.quantize import INT8_TARGETS
from pipeline.deploy.unmeasured import console_lines, folded, shown_rows
from pipeline.errors import ArtifactError, StageSkipped
from pipeline.plots import Curves, milliseconds_axis, read_metrics, write_training_curves
from pipeline.rundir import atomic_path, write_text
from pipeline.stage import StageContext, StageResult

PLOT_SIZE_IN, PLOT_DPI = (11.0, 5.0), 100  # 1100 x 500 pixels: the plot, and its legend on the right


def run(ctx: StageContext) -> StageResult:
    entry = ctx.record("bench")
    if entry and entry.status == "skipped":
        raise StageSkipped(f"nothing to report: bench skipped ({entry.reason})")
    bench = load_bench(ctx.input("bench", "bench"))
    out = ctx.stage_dir("report")
    report, plot, curves = out / "report.md", out / "accuracy_vs_latency.png", out / "training_curves.png"
    history = read_metrics(ctx.input("train", "metrics"))
    worth = worth_it(ctx)
    write_text(report, markdown(bench, plot.name, ctx.summary("export"), curves.name, history, worth,
                                target_check.read_plan(ctx)))
    write_plot(bench, plot)
    write_training_curves([Curves(bench.run, history, kept=ctx.summary("select").get("branch"))], curves,
                          f"{bench.run}: training, per epoch")
    ctx.console.print(rich_table(bench))
    for line in console_lines(bench):
        ctx.console.print(f"  [dim]{escape(line)}[/dim]", highlight=False)
    ctx.console.print(escape(headline_text(bench)))
    if worth:
        ctx.console.print(escape(worth), highlight=False)
    ctx.console.print(escape(f"report: {report}\nplots:  {plot}, {curves.name}"), highlight=False)
    return StageResult(outputs={"report": report, "plot": plot, "curves": curves},
                       summary={"rows": len(bench.rows), "ok": sum(r.status == "ok" for r in bench.rows)})


def worth_it(ctx: StageContext) -> str | None:
    """Is ONE worth its training cost on this data? The verdict of `one-pipeline compare` where this run's
    compare exists (`<output_root>/<name>-compare/compare.json`), else the command that measures it: a report
    speaks of this run only. None for a vanilla run."""
    if ctx.summary("train").get("method", ctx.cfg.model.method) != "one":
        return None
    found = ctx.cfg.output_root / f"{ctx.cfg.name}-compare" / "compare.json"
    try:
        summary = json.loads(found.read_text())
        if summary["recipe"] == recipe(ctx.cfg):  # another recipe's verdict (more epochs, say) is not this one's
            return (f"ONE against the same network trained alone on this data ({found.parent / 'compare.md'}): "
                    f"{summary['gains'][0]['verdict']}")
    except (OSError, ValueError, KeyError, IndexError, TypeError):  # no compare (or an unreadable one) yet
        pass
    measured = (" (the project's own Fashion-MNIST compares: docs/RESULTS.md)"
                if ctx.cfg.data.dataset == "fashion-mnist" else "")
    return ("Is ONE worth its training cost? This data has no compare yet; measure it: one-pipeline compare CONFIG "
            f"--seeds 0,1,2 (add --compress for the pruned branch){measured}.")


def load_bench(path: Path) -> BenchFile:
    """bench.json, checked against its schema (pipeline/deploy/benchfile.py, docs/bench_schema.md); a file of
    another schema version is refused (rerun the bench)."""
    try:
        return BenchFile.model_validate(of_this_version(json.loads(path.read_text()), path))
    except (json.JSONDecodeError, ValidationError) as exc:
        first = str(exc).splitlines()[0] if not isinstance(exc, ValidationError) else (
            f"{'.'.join(map(str, exc.errors()[0]['loc']))}: {exc.errors()[0]['msg']}")
        raise ArtifactError(f"{path} does not follow the bench schema ({first}); rerun with --from bench") from None


def markdown(bench: BenchFile, plot_name: str, export: dict | None = None, curves_name: str | None = None,
             history: list[dict] | None = None, worth: str | None = None, plan: dict | None = None) -> str:
    env = bench.environment
    lines = [f"# Benchmark: {bench.run}", "",
             f"Measured on {env.get('cpu') or 'an unnamed CPU'} ({env.get('cpu_count')} cores), GPU: "
             f"{env.get('cuda') or 'none'}, {bench.threads} thread(s) for every row. Timings move with the CPU "
             "and with whatever else runs on it: compare rows of one report, not figures across machines.", "",
             "## Headline", "", *_headline(bench), "", *_ship(bench), *target_check.plan_lines(plan), "",
             *([worth, ""] if worth else []),
             f"![accuracy vs batch-1 latency]({plot_name})", "", "## Results", "",
             f"Latency at batch 1 over {bench.settings.get('iterations')} calls after {bench.settings.get('warmup')} "
             f"warm-up calls; throughput at batches {', '.join(map(str, bench.batch_sizes))}. Top-1 on "
             f"{bench.test_images} test images; agreement: share of top-1 predictions equal to the same model's in "
             "PyTorch eager. FLOPs per image, counted by `torch.utils.flop_counter` (ONNX and TensorRT rows share "
             "the PyTorch model's count).", ""]
    lines += _results(bench) + _strip_by_batch(bench) + _baseline(bench) + _precision(bench, export or {})
    if bench.checks:
        lines += ["", "## Checks", ""]
        lines += [f"- {c.row}: top-1 {c.bench:.4f}% {'equals' if c.equal else 'DIFFERS FROM'} the {c.train:.4f}% "
                  f"training recorded (test, {c.train_head})." for c in bench.checks]
    if curves_name:
        lines += ["", "## Training", "", *_training(history or []), "", f"![training curves]({curves_name})"]
    lines += ["", "## Environment", "", f"- device: {bench.device}, CPU: {env.get('cpu')}, {env.get('cpu_count')} "
              f"cores, GPU: {env.get('cuda') or 'none'}",
              "- " + ", ".join(f"{k} {env.get(k) or 'not installed'}"
                               for k in ("python", "torch", "onnx", "onnxruntime", "tensorrt")),
              f"- platform: {env.get('platform')}", ""]
    return "\n".join(lines)


def _results(bench: BenchFile) -> list[str]:
    """The rows that ran (and those that failed, marked), then every skipped form in one list, forms that
    share a reason in one entry (pipeline/deploy/unmeasured.py): a CPU host skips a dozen GPU forms."""
    shown = shown_rows(bench)
    lines = _table(table_headers(bench), [table_cells(bench, row) for row in shown], left=3) if shown \
        else ["No form was measured here."]
    for title, status in (("Not measured here", "skipped"), ("Failed (marked in the table)", "failed")):
        found = folded(bench.rows, status)
        if found:
            lines += ["", f"{title}:", "", *[f"- {line}" for line in found]]
    return lines


def _training(history: list[dict]) -> list[str]:
    """The last epoch's figures, under the curves of every epoch (train/metrics.jsonl)."""
    validated = [r for r in history if r.get("val")]
    if not validated:
        return ["No epoch recorded a validation pass."]
    last = validated[-1]
    teacher = f", ONE-E {last['val']['teacher']:.2f}%" if "teacher" in last["val"] else ""
    branches = ", ".join(f"{v:.2f}" for v in last["val"]["branches"])
    return [f"{len(history)} epoch(s). At epoch {last['epoch']}: training loss {last['train_loss']:.4f}, learning "
            f"rate {last['lr']:.3g}, validation top-1 {branches}% (per branch){teacher}. The figure shows "
            "every epoch: loss, learning rate, and validation top-1 per branch and for ONE-E."]


def _table(headers: list[str], rows: list[list[str]], left: int = 1) -> list[str]:
    return ["| " + " | ".join(headers) + " |", "|" + "|".join("---" if i < left else "---:"
                                                             for i in range(len(headers))) + "|",
            *["| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |" for cells in rows]]


def _times(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _gain_line(title: str, g: Gain | None, bench: BenchFile, missing: str) -> str:
    if g is None:
        return f"- **{title}:** {missing}."
    row, versus = bench.row(g.row), bench.row(g.versus)
    thr = f", {_times(g.throughput_ratio)} the images/s at batch {g.batch}" if g.batch else ""
    return (f"- **{title}:** {short_label(row)} vs {short_label(versus)}: {_times(g.speedup_p50)} faster at batch 1 "
            f"(p50 {row.latency_ms.p50:.3f} vs {versus.latency_ms.p50:.3f} ms){thr}; top-1 "
            f"{_points(g.accuracy_delta)} ({row.accuracy:.2f}% vs {versus.accuracy:.2f}%).")


def _headline(bench: BenchFile) -> list[str]:
    h = bench.headline
    lines = [*([f"**{target_check.sentence(h.target)}**", ""] if h.target else []), headline_text(bench), ""]
    lines.append(_gain_line("Strip gain (same runtime, same precision)", h.strip, bench,
                            f"not measured ({h.reason or 'the ONE-E or branch ONNX row did not run'})"))
    if h.strip:
        lines.append(f"  The branch file is {fmt(h.size_ratio)}x smaller ({fmt(h.params_ratio)}x fewer parameters, "
                     f"{fmt(h.flops_ratio)}x fewer FLOPs).")
    lines.append(_gain_line("Runtime gain (same model)", h.runtime_gain, bench, "not measured"))
    lines.append(_gain_line("Precision gain (same model, same runtime)", h.precision_gain, bench,
                            "no lower precision of the branch was deployed and measured"))
    pruned = bench.row(row_name("pruned", "onnxruntime"))
    if pruned is not None:  # compress.enabled
        lines.append(_gain_line("Prune gain (same runtime, same precision)", h.prune, bench,
                                f"not measured ({pruned.reason or 'the branch ONNX row did not run'})"))
    return lines


def _ship(bench: BenchFile) -> list[str]:
    ship = bench.headline.ship
    if ship is None:
        return []
    head = ["## What to ship on this machine", ""]
    if ship.row is None:
        return head + [f"Nothing to pick: {ship.reason}."]
    row = bench.row(ship.row)
    served = f", Triton model `{ship.triton_model}`" if ship.triton_model else ""
    lines = [f"**{short_label(row)}**: `{ship.file}`{served}. Why: {ship.reason}. The bound is measured on "
             f"the test set from `{ship.reference_row}` (bench.ship_max_accuracy_drop); lower precisions "
             "passed the export accuracy guard on the validation split first."]
    other = "throughput" if ship.objective == "latency" else "latency"
    lines += ["", f"Shipped for {ship.objective} (bench.ship_for). " + (
        f"For {other} it would be {ship.other_objective} (`--set bench.ship_for={other}`)." if ship.other_objective
        else f"The same form wins for {other}.")]
    return head + lines + _runtimes(bench)


def _runtimes(bench: BenchFile) -> list[str]:
    """The fastest form of the kept branch (or its pruned form) in each runtime, for both objectives."""
    batch = bench.batch_sizes[-1]
    lines = []
    for fmt_name in deployable():
        rows = [r for r in bench.rows if MODELS[r.model].shippable and r.format == fmt_name and r.status == "ok"]
        if not rows:
            continue
        quick = min(rows, key=lambda r: r.latency_ms.p50)
        wide = max(rows, key=lambda r: r.images_per_s(batch) or 0)
        lines.append(f"- {RUNTIMES[fmt_name].name}: batch-1 p50 {quick.latency_ms.p50:.3f} ms "
                     f"({MODELS[quick.model].who} {quick.precision}); {fmt(wide.images_per_s(batch), ',.0f')} "
                     f"images/s at batch {batch} ({MODELS[wide.model].who} {wide.precision})")
    return ["", "Each runtime's fastest deployed form at batch 1 and at the largest batch:", "", *lines] if lines \
        else []


def _strip_by_batch(bench: BenchFile) -> list[str]:
    """Branch vs ONE-E in every runtime and precision where both ran, at every batch size."""
    pairs = [(bench.row(row_name("ensemble", r.format, r.precision)), r) for r in bench.rows
             if r.model == "branch" and r.status == "ok"]
    pairs = [(e, b) for e, b in pairs if e is not None and e.status == "ok"]
    if not pairs:
        return []
    headers = ["runtime", "top-1 ONE-E / branch", "p50 ms ONE-E / branch", "batch-1 speed-up",
               *[f"img/s @{b} (ratio)" for b in bench.batch_sizes]]
    rows = []
    for ens, br in pairs:
        g = gain(br, ens)
        cells = [runtime_text(br), f"{ens.accuracy:.2f} / {br.accuracy:.2f}",
                 f"{ens.latency_ms.p50:.3f} / {br.latency_ms.p50:.3f}", _times(g.speedup_p50)]
        for b in bench.batch_sizes:
            e, k = ens.images_per_s(b), br.images_per_s(b)
            cells.append(f"{fmt(e, '.0f')} / {fmt(k, '.0f')} ({_times(k / e) if e and k else '-'})")
        rows.append(cells)
    return ["", "## The kept branch against ONE-E, runtime by runtime", "",
            "Each line changes only the model (the full ensemble -> its kept branch). Where the ratio grows "
            "with the batch, a batching server gains more from stripping than one-image latency shows.", "",
            *_table(headers, rows, left=3)]


def _baseline(bench: BenchFile) -> list[str]:
    base = {r.format: r for r in bench.rows if r.model == "baseline"}
    if not base:
        return []
    lines = ["", "## ONE against the same network trained alone", "",
             f"Baseline run: `{bench.baseline}`."]
    for fmt_name in ("pytorch", "onnxruntime"):
        mine, theirs = bench.row(row_name("branch", fmt_name)), base.get(fmt_name)
        if mine is None or theirs is None or mine.status != "ok" or theirs.status != "ok":
            continue
        delta = mine.accuracy - theirs.accuracy
        verdict = "better" if delta > 0 else "worse" if delta < 0 else "the same"
        lines.append(f"- {runtime_text(mine)}: the kept ONE branch {mine.accuracy:.2f}% vs trained alone "
                     f"{theirs.accuracy:.2f}% top-1 ({_points(delta)}: ONE is {verdict} on this test set, one seed "
                     f"each); p50 {mine.latency_ms.p50:.3f} vs {theirs.latency_ms.p50:.3f} ms (the same network).")
    skipped = [f"- {r.label}: {r.reason}" for r in base.values() if r.status != "ok"]
    return lines + skipped


def _precision(bench: BenchFile, export: dict) -> list[str]:
    """Lower precisions: what each is for, what the guard measured, every calibration recipe tried."""
    lines = []
    compared = [r for r in bench.rows if r.vs_fp32 is not None]
    if compared:
        lines += ["", "## Lower precision against fp32 (same model, same runtime)", ""]
        lines += [f"- {short_label(r)}: top-1 {_points(r.vs_fp32.accuracy_delta)}; batch 1 "
                  f"{_speed(r.vs_fp32.speedup_p50)}; {_times(r.vs_fp32.throughput_ratio)} fp32's images/s at the "
                  "largest batch." for r in compared]
    fp16 = bench.row(row_name("branch", "onnxruntime", "fp16"))
    if bench.device == "cpu" and fp16 is not None and fp16.vs_fp32 is not None:
        lines.append(f"- fp16 on this CPU: {_speed(fp16.vs_fp32.speedup_p50)} at batch 1, "
                     f"{_times(fp16.vs_fp32.throughput_ratio)} fp32's images/s at the largest batch. ONNX Runtime has "
                     "few fp16 kernels on x86 CPUs (most of the graph runs in float32 between casts), so do not "
                     "expect fp16 to pay off on a CPU; the fp16 file is for GPUs (TensorRT, the Triton onnxruntime "
                     "backend).")
    summary = export.get("branch") or {}
    guarded = {p: f for p, f in summary.items() if p != "fp32" and isinstance(f, dict) and "passed" in f}
    if not guarded:
        return lines
    lines += ["", "## Export accuracy guard (validation split, against the fp32 ONNX)", "",
              f"Bound: {export.get('max_accuracy_drop')} top-1 points on {export.get('validation_images')} "
              "validation images (export.max_accuracy_drop). int8 is TensorRT's form (symmetric Q/DQ); int8_cpu "
              "is ONNX Runtime's x86 CPU form (uint8 activations, every Conv an integer kernel).", ""]
    rows = []
    for precision, f in guarded.items():
        for trial in f.get("trials") or [{"recipe": "-", "val_accuracy": f.get("val_accuracy"), "drop": f.get("drop"),
                                          "passed": f.get("passed")}]:
            rows.append([precision, INT8_TARGETS.get(precision, "GPUs (TensorRT) and CPUs"), trial["recipe"],
                         fmt(trial.get("val_accuracy")), _points(-trial["drop"]) if trial.get("drop") is not None
                         else "-", "deployed" if trial.get("passed") and f.get("passed") else "rejected"
                         if not trial.get("passed") else "passed (an earlier recipe was kept)"])
    return lines + _table(["precision", "for", "calibration recipe", "val top-1 %", "vs fp32", "verdict"], rows, 3)


def _speed(speedup: float | None) -> str:
    if speedup is None:
        return "no speed comparison (the fp32 row did not run)"
    return f"{speedup:.2f}x faster than fp32" if speedup >= 1 else f"{1 / speedup:.2f}x slower than fp32"


def _points(delta: float | None) -> str:
    return "-" if delta is None else f"{delta + 0.0:+.2f} points"  # + 0.0: no "-0.00"


def write_plot(bench: BenchFile, path: Path) -> None:
    with atomic_path(path) as tmp:
        plot_figure(bench).savefig(tmp, format="png", dpi=PLOT_DPI)


def plot_figure(bench: BenchFile) -> Figure:
    """Top-1 against batch-1 p50 latency, whiskers to p99, the Pareto front joined and labelled, the
    ship pick starred; log x (in plain milliseconds) when latencies span over 10x."""
    rows = [r for r in bench.rows if r.status == "ok" and r.accuracy is not None and r.latency_ms]
    front = pareto_front(rows)
    ship = bench.headline.ship.row if bench.headline.ship else None
    fig = Figure(figsize=PLOT_SIZE_IN, dpi=PLOT_DPI, layout="constrained")  # no pyplot: no window, no global state
    ax = fig.subplots()
    for number, row in enumerate(rows, start=1):  # numbered points, named in the legend: labels never collide
        lat = row.latency_ms
        marker = "*" if row.name == ship else RUNTIMES[row.format].marker
        ax.errorbar(lat.p50, row.accuracy, xerr=[[0], [max(lat.p99 - lat.p50, 0)]], fmt=marker,
                    color=MODELS[row.model].colour, markersize=14 if row.name == ship else 8, capsize=3,
                    label=f"{number}: {short_label(row)}, {lat.p50:.3f} ms, {row.accuracy:.2f}%"
                          + (" (Pareto)" if row in front else "") + (" SHIP" if row.name == ship else ""))
        ax.annotate(str(number), (lat.p50, row.accuracy), textcoords="offset points",
                    xytext=(0, 8 if number % 2 else -15), ha="center", fontsize=9, fontweight="bold")
    if len(front) > 1:
        ordered = sorted(front, key=lambda r: r.latency_ms.p50)
        ax.step([r.latency_ms.p50 for r in ordered], [r.accuracy for r in ordered], where="post", color="grey",
                linestyle="--", linewidth=1, label="Pareto front (no row is both faster and more accurate)")
    milliseconds_axis(ax, [r.latency_ms.p50 for r in rows])
    ax.margins(x=0.15, y=0.2)
    if rows:  # outside the axes, on the right: it covers no point
        ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1.0), title="p50 latency at batch 1, top-1",
                  title_fontsize=7)
    strip = bench.headline.strip
    where = bench.environment.get("cpu") or bench.device
    title = f"{bench.run}: accuracy vs latency, {where}, {bench.threads} thread(s)"
    if strip is not None:
        title += f"\nbranch {_times(strip.speedup_p50)} faster than ONE-E in {runtime_text(bench.row(strip.row))}, " \
                 f"{_points(strip.accuracy_delta)} top-1"
    ax.set(title=title, xlabel="batch-1 latency, p50 (ms); whisker to p99", ylabel="top-1 accuracy (%)")
    ax.grid(True, which="both", alpha=0.3)
    if not rows:
        ax.text(0.5, 0.5, "no row was measured", ha="center", va="center", transform=ax.transAxes)
    return fig
