"""compress's latency target against what the bench achieved: the bench's headline (`headline.target` of
bench.json) and the report's sentences about it, and the report's view of compress/plan.json (the chosen plan
and its neighbours).

    figures = headline_target(rows, ctx.record("compress"), cpu_model(), threads)   # a TargetCheck's fields
    sentence(TargetCheck(**figures))      # "Latency target 2x (...): met, ..." / "... MISSED: ..."
    plan_lines(read_plan(ctx))            # the report's "Latency plan" section

The achieved figure is measured as the planner measures (pipeline/deploy/latency_plan.py): the median over
interleaved rounds of the per-round ratio of the two forms' p50s, timed alone after the bench's rows
(pipeline/deploy/target_timing.py). Where those rounds could not run, it is the ratio of the two rows' figures
in the bench's table: at batch 1 their p50s, at a larger target batch their images/s at that batch (ms: the
batch over the images/s); that ratio is kept beside the paired one as `table_speedup`.
"""

from __future__ import annotations

import json
from typing import Any

from pipeline.deploy.benchfile import Row, TargetCheck, fmt
from pipeline.deploy.forms import row_name
from pipeline.errors import ArtifactError
from pipeline.rundir import StageRecord
from pipeline.stage import StageContext


def headline_target(rows: list[Row], compress: StageRecord | None, cpu: str | None,
                    threads: int, paired: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """The target check of a run whose compress stage (its record: `compress`) planned (or pinned) a latency
    plan; None otherwise. `paired`: the bench's paired rounds of the two forms (pipeline/deploy/target_timing.py),
    which decide where present; the two rows' ratio is kept beside them (table_speedup)."""
    summary = compress.summary if compress else {}
    planned = summary.get("latency_plan")
    target = (planned or {}).get("target") or {}
    if compress is None or not compress.done or target.get("speedup") is None and target.get("ms") is None:
        return None
    kind = "speedup" if target.get("speedup") is not None else "ms"
    runtime, precision = planned.get("runtime") or "onnxruntime", planned.get("precision") or "fp32"
    by_name = {r.name: r for r in rows}
    row, versus = row_name("pruned", runtime, precision), row_name("branch", runtime, precision)
    check: dict[str, Any] = {
        "kind": kind, "value": target[kind], "runtime": runtime, "precision": precision,
        "batch": planned.get("batch") or 1, "row": row, "versus": versus, "plan": planned.get("plan"),
        "plan_source": planned.get("source"), "planned_speedup": planned.get("speedup"),
        "planned_ms": planned.get("p50_ms"), "planned_on": planned.get("cpu"), "benched_on": cpu,
        "planned_threads": planned.get("threads"), "benched_threads": threads}
    check["same_host"] = (check["planned_on"] == cpu and check["planned_threads"] == threads
                          if check["planned_on"] else None)
    measured = _achieved(by_name.get(row), by_name.get(versus), check["batch"])
    if not summary.get("deployed"):
        check.update(achieved_speedup=1.0, achieved_ms=_call_ms(by_name.get(versus), check["batch"]), met=False,
                     why="accuracy_guard", reason=f"the accuracy guard kept the pruned network back "
                                                  f"({summary.get('reason') or 'not deployed'})")
        return check
    if not isinstance(measured, str):
        check["table_speedup"] = round(measured[0], 4)
    if paired is not None:
        measured = paired["speedup"], paired["ms"]
        check["paired_rounds"] = paired["rounds"]
    if isinstance(measured, str):
        return {**check, "met": None, "why": "not_measured", "reason": measured}
    speedup, ms = measured
    met = speedup >= check["value"] if kind == "speedup" else ms <= check["value"]
    check.update(achieved_speedup=round(speedup, 4), achieved_ms=round(ms, 6), met=met)
    if check["planned_speedup"]:
        check["planner_vs_bench"] = round(speedup / check["planned_speedup"] - 1, 4)
    if met:
        return {**check, "why": "met", "reason": "the bench measured the target met"}
    return {**check, "why": "planner_and_bench_disagree",
            "reason": f"the planner measured {fmt(check['planned_speedup'])}x, the bench {speedup:.2f}x"}


def _call_ms(row: Row | None, batch: int) -> float | None:
    """A measured row's ms per call of `batch` images (None where it did not run at that batch)."""
    if row is None or row.status != "ok":
        return None
    if batch == 1:
        return row.latency_ms.p50
    rate = row.images_per_s(batch)
    return round(1000.0 * batch / rate, 6) if rate else None


def _achieved(row: Row | None, versus: Row | None, batch: int) -> tuple[float, float] | str:
    """(speed-up over the kept branch, ms per call of `batch` images) of the pruned form; why not, as a str."""
    for r, name in ((row, "the pruned form"), (versus, "the kept branch")):
        if r is None:
            return f"the bench has no row of {name} in this runtime and precision"
        if r.status != "ok":
            return f"{r.name} {r.status}: {r.reason}"
    ms, base = _call_ms(row, batch), _call_ms(versus, batch)
    if not ms or not base:
        return f"the bench timed no batch {batch} (add {batch} to bench.batch_sizes)"
    return base / ms, ms


def where_text(check: TargetCheck) -> str:
    value = f"{check.value:g}x the kept branch" if check.kind == "speedup" else f"{check.value:g} ms per call"
    return f"{value} in {check.runtime} {check.precision} at batch {check.batch}"


def sentence(check: TargetCheck) -> str:
    """The verdict, plainly: met, MISSED (and why) or not measured; then a note when the hosts differ."""
    head = f"Latency target {where_text(check)}: "
    achieved = (f"{check.achieved_speedup:.2f}x ({check.achieved_ms:.3f} ms)"
                if check.achieved_speedup is not None and check.achieved_ms is not None else None)
    planner = (f"the planner measured {check.planned_speedup:.2f}x ({fmt(check.planned_ms, '.3f')} ms) for "
               f"plan {check.plan}" if check.planned_speedup is not None else f"plan {check.plan}")
    if achieved and check.paired_rounds:
        table = f"; the table's p50s: {check.table_speedup:.2f}x" if check.table_speedup is not None else ""
        achieved += f" over {check.paired_rounds} paired rounds{table}"
    if check.why == "met":
        diff = f", {check.planner_vs_bench:+.1%} off" if check.planner_vs_bench is not None else ""
        text = f"met: the bench measured {achieved} in {check.row} against {check.versus}; {planner}{diff}."
    elif check.why == "planner_and_bench_disagree":
        diff = f" ({check.planner_vs_bench:+.0%})" if check.planner_vs_bench is not None else ""
        text = (f"MISSED: the bench measured {achieved} in {check.row} against {check.versus}, where {planner}: "
                f"the planner and the bench disagree{diff}.")
    elif check.why == "accuracy_guard":
        text = f"MISSED: {check.reason}; the kept branch ships at 1.00x ({planner})."
    else:
        text = f"not measured by the bench ({check.reason}); {planner}."
    return head + text + host_note(check)


def host_note(check: TargetCheck) -> str:
    if check.same_host is not False:
        return ""
    return (f" The plan was measured on {check.planned_on} with {check.planned_threads} thread(s) and benched on "
            f"{check.benched_on} with {check.benched_threads}: a plan's speed-up holds on the host it was planned "
            "on; plan again there (one-pipeline compress CONFIG --force) for one that fits this host.")


def read_plan(ctx: StageContext) -> dict[str, Any] | None:
    """compress/plan.json of a run whose compress stage recorded one; None otherwise (or when unreadable)."""
    entry = ctx.record("compress")
    if entry is None or not entry.done or "plan" not in entry.outputs:
        return None
    try:
        data = json.loads(ctx.input("compress", "plan").read_text())
    except (ArtifactError, OSError, ValueError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("chosen"), dict) else None


PLAN_HEADERS = ["plan (widths / inner widths / blocks)", "", "FLOPs", "params", "p50 ms", "speed-up (spread)",
                "rounds", "meets"]


def plan_lines(doc: dict[str, Any] | None) -> list[str]:
    """The report's view of compress/plan.json: where it was measured, the chosen plan among its neighbours
    (the measured plans next to it in FLOPs) and the kept branch, widest first."""
    if not doc:
        return []
    key, chosen = doc.get("key") or {}, doc["chosen"]
    target = key.get("target") or {}
    aim = f"{target['speedup']:g}x" if target.get("speedup") else f"{target.get('ms')} ms" if target.get("ms") \
        else "a latency target"
    pinned = f" Pinned from `{doc['pinned_from']}`." if doc.get("pinned_from") else ""
    where = (f"Planned for {aim} in {key.get('runtime')} {key.get('precision')} at batch {key.get('batch')}, "
             f"{key.get('threads')} thread(s), on {key.get('cpu')} (channel multiple {key.get('channel_multiple')}): "
             f"{len(doc.get('candidates', [])) + 1} plans timed in {fmt(doc.get('seconds'), '.0f')} s in "
             "interleaved rounds beside the kept branch; the chosen plan keeps the most parameters among those meeting "
             "the target, confirmed in rounds of its own." if key else "A plan given without its measurements.")
    picked = [c for c in doc.get("candidates", []) if c.get("chosen") or c.get("neighbour")] or [chosen]
    records = [*([doc["branch"]] if doc.get("branch") else []), *picked]
    records.sort(key=lambda c: -(c.get("flops") or 0))
    rows = [_plan_cells(c, "kept branch" if c is doc.get("branch") else "**chosen**"
                        if c.get("chosen") or c is chosen else "neighbour") for c in records]
    table = ["| " + " | ".join(PLAN_HEADERS) + " |", "|---|---|" + "---:|" * (len(PLAN_HEADERS) - 2),
             *["| " + " | ".join(cells) + " |" for cells in rows]]
    return ["", "## Latency plan (compress/plan.json)", "", where + pinned, "", *table]


def _plan_cells(c: dict[str, Any], role: str) -> list[str]:
    label = c.get("label") or "/".join("-".join(map(str, c.get(k) or [])) for k in
                                       ("stage_widths", "inner_widths", "stage_blocks"))
    spread = c.get("spread") or []
    speed = f"{fmt(c.get('speedup'))}x" + (f" ({spread[0]:.2f}-{spread[1]:.2f})" if len(spread) == 2 else "") \
        if c.get("speedup") is not None else "-"
    ratio = f"{c['flops_ratio']:.3f}x" if c.get("flops_ratio") is not None else fmt(c.get("flops"), ",")
    meets = "-" if c.get("meets") is None or role == "kept branch" else "yes" if c["meets"] else "no"
    return [label, role, ratio, fmt(c.get("params"), ","), fmt(c.get("p50_ms"), ".3f"), speed,
            fmt(c.get("rounds"), "d"), meets]
