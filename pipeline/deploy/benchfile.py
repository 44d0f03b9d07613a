"""The schema of bench/bench.json (documented in docs/bench_schema.md) and the Rich table of its rows.

`BenchFile.model_validate(json.loads(text))` checks a file against the schema: the bench validates
what it writes, the report what it reads.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from rich.markup import escape
from rich.table import Table

from pipeline.deploy.forms import MODELS, RUNTIMES, deployable, row_name, shippable
from pipeline.errors import ArtifactError

SCHEMA_VERSION = 3  # 3: the pruned branch's rows, headline.prune and headline.target (docs/bench_schema.md)
Precision = Literal["fp32", "fp16", "bf16", "int8", "int8_cpu"]  # bf16: OpenVINO's, compiled from fp32


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LatencyMs(Strict):
    p50: float = Field(ge=0)
    p90: float = Field(ge=0)
    p99: float = Field(ge=0)
    mean: float = Field(ge=0)
    batch: Literal[1] = 1
    warmup: int = Field(ge=0)
    iterations: int = Field(ge=1)


class Throughput(Strict):
    images_per_s: float = Field(gt=0)
    batch: int = Field(ge=1)
    warmup: int = Field(ge=0)
    iterations: int = Field(ge=1)


class VsFP32(Strict):
    """A lower-precision row against the same model's fp32 row in the same runtime."""
    row: str
    accuracy_delta: float | None  # this row's top-1 minus the fp32 row's, percentage points
    speedup_p50: float | None  # fp32 batch-1 p50 / this row's
    throughput_ratio: float | None  # this row's images/s / fp32's, at the largest batch both ran


class Row(Strict):
    model_config = ConfigDict(extra="forbid", frozen=True)  # made once (stages/bench_measure.py), never changed

    name: str
    label: str
    model: str  # a model of pipeline/deploy/forms.py MODELS
    format: str  # a runtime of pipeline/deploy/forms.py RUNTIMES
    precision: Precision
    status: Literal["ok", "skipped", "failed"]
    reason: str | None = None
    failed_in: Literal["export", "bench"] | None = None
    note: str | None = None
    file: str | None = None
    file_bytes: int | None = Field(None, ge=0)
    params: int | None = Field(None, ge=0)
    flops: int | None = Field(None, ge=0)
    macs: int | None = Field(None, ge=0)
    accuracy: float | None = Field(None, ge=0, le=100)
    agreement: float | None = Field(None, ge=0, le=100)
    images: int | None = Field(None, ge=1)
    latency_ms: LatencyMs | None = None
    throughput: list[Throughput] = []
    provider: str | None = None
    vs_fp32: VsFP32 | None = None
    triton_model: str | None = None  # the Triton model that serves this file, where the triton stage writes one
    properties: dict[str, str] | None = None  # OpenVINO: the compiled model's settings, as it reports them

    @field_validator("model")
    @classmethod
    def _known_model(cls, value: str) -> str:
        if value not in MODELS:
            raise ValueError(f"model {value!r} is none of {', '.join(MODELS)}")
        return value

    @field_validator("format")
    @classmethod
    def _known_runtime(cls, value: str) -> str:
        if value not in RUNTIMES:
            raise ValueError(f"format {value!r} is none of {', '.join(RUNTIMES)}")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Row:
        if self.status == "ok":
            if self.reason is not None or self.failed_in is not None:
                raise ValueError(f"row {self.name}: an ok row has no reason / failed_in")
            if self.accuracy is None or self.latency_ms is None:
                raise ValueError(f"row {self.name}: an ok row has accuracy and latency_ms")
        elif not self.reason:
            raise ValueError(f"row {self.name}: a {self.status} row needs a reason")
        if (self.status == "failed") != (self.failed_in is not None):
            raise ValueError(f"row {self.name}: failed_in is set exactly when status is failed")
        return self

    def images_per_s(self, batch: int) -> float | None:
        return next((t.images_per_s for t in self.throughput if t.batch == batch), None)


class Check(Strict):
    row: str
    train_head: str  # which figure of the train summary's "test": "teacher", "branches[i]"
    bench: float
    train: float
    equal: bool


class Gain(Strict):
    """`row` against `versus`: one change at a time (the model, the runtime or the precision)."""
    row: str
    versus: str
    speedup_p50: float | None  # versus batch-1 p50 / row's
    throughput_ratio: float | None  # row images/s / versus's, at `batch`
    batch: int | None  # the largest batch both rows ran
    accuracy_delta: float | None  # row minus versus, top-1 points


class Ship(Strict):
    row: str | None  # the pick; None when no form qualifies
    reference_row: str  # the fp32 branch the accuracy bound is measured from
    max_accuracy_drop: float
    objective: Literal["latency", "throughput"] = "latency"  # bench.ship_for
    file: str | None = None
    triton_model: str | None = None
    reason: str  # why this one, or why none
    other_objective: str | None = None  # the pick had the bench been told to ship for the other objective


class TargetCheck(Strict):
    """compress's latency target against what the bench measured (pipeline/deploy/target_check.py)."""
    kind: Literal["speedup", "ms"]
    value: float  # the target: times faster than the kept branch, or ms per call of `batch` images
    runtime: str
    precision: str
    batch: int = Field(ge=1)
    row: str  # the bench row of the pruned form in the target's runtime and precision
    versus: str  # the kept branch's row there, timed in the same interleaved rounds
    plan: str | None = None  # widths/inner widths/blocks, as compress/plan.json labels it
    plan_source: str | None = None  # planned, reused or pinned
    planned_speedup: float | None = None
    planned_ms: float | None = None
    achieved_speedup: float | None = None
    achieved_ms: float | None = None
    planner_vs_bench: float | None = None  # achieved speed-up / planned - 1
    paired_rounds: int | None = None  # achieved over this many paired rounds of the two forms alone; None: the table's
    table_speedup: float | None = None  # the two rows' ratio in the bench's table
    met: bool | None = None  # None: the bench did not measure the target's form
    why: Literal["met", "planner_and_bench_disagree", "accuracy_guard", "not_measured"]
    reason: str  # the verdict in one sentence
    planned_on: str | None = None  # the CPU model (and threads) the plan was measured on
    benched_on: str | None = None
    planned_threads: int | None = None
    benched_threads: int | None = None
    same_host: bool | None = None  # the same CPU model and threads


class Headline(Strict):
    runtime: str  # where the strip gain is measured, e.g. "onnxruntime fp32"
    strip: Gain | None  # kept branch vs ONE-E, same runtime and precision
    runtime_gain: Gain | None  # kept branch: ONNX Runtime fp32 vs PyTorch eager
    precision_gain: Gain | None  # kept branch in ONNX Runtime: fastest deployed lower precision vs fp32
    prune: Gain | None = None  # the compress stage's pruned branch vs the kept branch, ONNX Runtime fp32 both
    size_ratio: float | None  # ONE-E file bytes / branch file bytes (same runtime and precision)
    params_ratio: float | None
    flops_ratio: float | None
    ship: Ship | None
    reason: str | None = None  # why some figures are null
    target: TargetCheck | None = None  # compress's latency target against the bench (absent without one)


class BenchFile(Strict):
    schema_version: Literal[3]
    run: str
    method: Literal["one", "vanilla"]
    branch: int = Field(ge=0)
    device: str
    threads: int = Field(ge=1)
    test_images: int = Field(ge=1)
    eval_batch_size: int = Field(ge=1)
    batch_sizes: list[int]
    settings: dict[str, Any]
    environment: dict[str, Any]
    baseline: str | None  # the bench.baseline run directory, as given
    checks: list[Check]
    rows: list[Row]
    headline: Headline

    @model_validator(mode="after")
    def _unique_names(self) -> BenchFile:
        names = [r.name for r in self.rows]
        if len(set(names)) != len(names):
            raise ValueError(f"row names repeat: {names}")
        return self

    def row(self, name: str | None) -> Row | None:
        return next((r for r in self.rows if r.name == name), None)


def of_this_version(data: Any, path: Path) -> dict:
    """A bench.json's contents, when written at SCHEMA_VERSION; else an ArtifactError in one line: an older
    file lacks what this version reads (and a newer one may hold what it does not know), so rerun the bench."""
    found = data.get("schema_version") if isinstance(data, dict) else None
    if found != SCHEMA_VERSION:
        raise ArtifactError(f"{path} has bench schema_version {'none' if found is None else found}, this "
                            f"one-pipeline reads {SCHEMA_VERSION}; rerun the bench: one-pipeline run CONFIG "
                            "--from bench")
    return data


def gain(row: Row | None, versus: Row | None) -> Gain | None:
    """`row` against `versus` when both ran; None otherwise."""
    if row is None or versus is None or row.status != "ok" or versus.status != "ok":
        return None
    batches = sorted({t.batch for t in row.throughput} & {t.batch for t in versus.throughput})
    batch = batches[-1] if batches else None
    return Gain(row=row.name, versus=versus.name,
                speedup_p50=round(versus.latency_ms.p50 / row.latency_ms.p50, 4) if row.latency_ms.p50 else None,
                throughput_ratio=round(row.images_per_s(batch) / versus.images_per_s(batch), 4) if batch else None,
                batch=batch, accuracy_delta=round(row.accuracy - versus.accuracy, 4))


SHIPPABLE = shippable()  # the kept branch and its pruned form (compress)
DEPLOYABLE = deployable()  # formats a server runs from a file (forms.RUNTIMES' `deployable`)


def ship_pick(rows: list[Row], max_drop: float, objective: str = "latency") -> Ship:
    """What to ship on this machine: the fastest deployable form of the kept branch or of its pruned
    form (a file a server runs: ONNX Runtime, OpenVINO or TensorRT) whose test top-1 is within `max_drop`
    points of the (unpruned) branch's fp32 ONNX. Fastest for `objective`: latency, by batch-1 p50 (then
    throughput at the largest batch); throughput, by images/s at the largest bench batch (then p50).
    `other_objective` names the winner under the other objective."""
    reference = next((r for r in rows if r.name == row_name("branch", "onnxruntime")), None)
    ref_name = row_name("branch", "onnxruntime")
    if reference is None or reference.status != "ok":
        return Ship(row=None, reference_row=ref_name, max_accuracy_drop=max_drop, objective=objective,
                    reason="the fp32 ONNX branch row did not run, so no form can be measured against it")
    deployed = [r for r in rows if MODELS[r.model].shippable and RUNTIMES[r.format].deployable and r.status == "ok"]
    candidates = [r for r in deployed if r.accuracy >= reference.accuracy - max_drop]
    pick, why = _fastest(candidates, objective)
    other, other_why = _fastest(candidates, "throughput" if objective == "latency" else "latency")
    others = sorted(r.name for r in deployed if r not in candidates)
    reason = (f"{why} of {len(candidates)} deployed forms within {max_drop:g} top-1 points of {ref_name} "
              f"({pick.accuracy - reference.accuracy:+.2f} points)")
    if others:
        reason += f"; over the bound: {', '.join(others)}"
    return Ship(row=pick.name, reference_row=ref_name, max_accuracy_drop=max_drop, objective=objective,
                file=pick.file, triton_model=pick.triton_model, reason=reason,
                other_objective=None if other is pick else f"{other.name}: {other_why}")


def headline_figures(rows: list[Row], max_drop: float, ship_for: str) -> dict:
    """The bench's headline: the gain in parts, strip (same runtime and precision), runtime (same model),
    precision (same model and runtime) and prune (same runtime and precision); what to ship."""
    by_name = {r.name: r for r in rows}
    branch, ensemble = by_name.get(row_name("branch", "onnxruntime")), by_name.get(row_name("ensemble", "onnxruntime"))
    strip = gain(branch, ensemble)
    lower = [r for r in rows if r.model == "branch" and r.format == "onnxruntime" and r.precision != "fp32"
             and r.status == "ok" and r.vs_fp32 and r.vs_fp32.speedup_p50]
    fastest = min(lower, key=lambda r: r.latency_ms.p50, default=None)
    reasons = [f"{r.name} {r.status}: {r.reason}" for r in (ensemble, branch) if r is not None and r.status != "ok"]

    def ratio(key: str) -> float | None:
        a, b = getattr(ensemble, key, None) if ensemble else None, getattr(branch, key, None) if branch else None
        return round(a / b, 4) if strip and a and b else None

    return {"runtime": "onnxruntime fp32", "strip": strip and strip.model_dump(),
            "runtime_gain": (g := gain(branch, by_name.get(row_name("branch", "pytorch")))) and g.model_dump(),
            "precision_gain": (p := gain(fastest, branch)) and p.model_dump(),
            "prune": (q := gain(by_name.get(row_name("pruned", "onnxruntime")), branch)) and q.model_dump(),
            "size_ratio": ratio("file_bytes"), "params_ratio": ratio("params"), "flops_ratio": ratio("flops"),
            "ship": ship_pick(rows, max_drop, ship_for).model_dump(), "reason": "; ".join(reasons) or None}


def _fastest(candidates: list[Row], objective: str) -> tuple[Row, str]:
    """The fastest row for `objective` and the figure that makes it so."""
    best_batch = max((t.batch for r in candidates for t in r.throughput), default=None)

    def rate(r: Row) -> float:
        return r.images_per_s(best_batch) or 0.0

    if objective == "throughput" and best_batch is not None:
        pick = min(candidates, key=lambda r: (-rate(r), r.latency_ms.p50))
        return pick, f"most images/s at batch {best_batch} ({rate(pick):,.0f})"
    pick = min(candidates, key=lambda r: (r.latency_ms.p50, -rate(r)))
    return pick, f"fastest at batch 1 (p50 {pick.latency_ms.p50:.3f} ms)"


def pareto_front(rows: list[Row]) -> list[Row]:
    """Measured rows no other row beats on both batch-1 p50 latency and top-1 (ties kept)."""
    ok = [r for r in rows if r.status == "ok"]
    return [r for r in ok if not any(o.latency_ms.p50 <= r.latency_ms.p50 and o.accuracy >= r.accuracy
                                     and (o.latency_ms.p50, o.accuracy) != (r.latency_ms.p50, r.accuracy) for o in ok)]


def runtime_text(row: Row) -> str:
    """E.g. "PyTorch eager" or "ONNX Runtime int8_cpu"."""
    rt = RUNTIMES[row.format]
    return rt.name + (f" {row.precision}" if rt.deployable else "")


def short_label(row: Row) -> str:
    """E.g. "ONE-E, PyTorch eager" or "branch, ONNX Runtime int8"."""
    return f"{MODELS[row.model].who}, {runtime_text(row)}"


def fmt(value: float | int | None, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def status_text(row: Row) -> str:
    """Ultralytics keeps "export failed" apart from "exported, validation failed"."""
    if row.status == "failed":
        return "failed (export)" if row.failed_in == "export" else "failed (bench)"
    return row.status


def table_cells(bench: BenchFile, row: Row) -> list[str]:
    lat = row.latency_ms
    return [row.label, runtime_text(row), status_text(row),
            fmt(row.file_bytes / 1e6 if row.file_bytes is not None else None, ".3f"),
            fmt(row.accuracy), fmt(row.agreement), fmt(lat and lat.p50, ".3f"), fmt(lat and lat.p99, ".3f"),
            *[fmt(row.images_per_s(b), ".0f") for b in bench.batch_sizes], fmt(row.params, ","),
            fmt(row.flops / 1e6 if row.flops is not None else None, ".2f")]


def table_headers(bench: BenchFile) -> list[str]:
    return ["variant", "runtime", "status", "size MB", "top-1 %", "agree %", "p50 ms", "p99 ms",
            *[f"img/s @{b}" for b in bench.batch_sizes], "params", "MFLOPs"]


def rich_table(bench: BenchFile) -> Table:
    """The terminal's table: the rows that ran or failed (pipeline/deploy/unmeasured.py folds the skipped ones
    under it), the columns that decide, narrow enough for 80 columns (report.md has all)."""
    batch = bench.batch_sizes[-1]
    table = Table(title=f"bench: {bench.run} on {bench.device}, {bench.threads} thread(s), "
                        f"{bench.test_images} test images")
    for i, header in enumerate(["variant", "status", "top-1", "p50 ms", "p99 ms", f"img/s@{batch}", "MB"]):
        table.add_column(header, justify="left" if i < 2 else "right", no_wrap=i == 0)
    colour = {"ok": "green", "skipped": "yellow", "failed": "red"}
    for row in [r for r in bench.rows if r.status != "skipped"]:
        lat = row.latency_ms
        table.add_row(escape(_tiny_label(row)), f"[{colour[row.status]}]{escape(status_text(row))}[/]",
                      fmt(row.accuracy), fmt(lat and lat.p50, ".3f"), fmt(lat and lat.p99, ".3f"),
                      fmt(row.images_per_s(batch), ".0f"),
                      fmt(row.file_bytes / 1e6 if row.file_bytes is not None else None, ".2f"))
    return table


def _tiny_label(row: Row) -> str:
    rt = RUNTIMES[row.format]
    return f"{MODELS[row.model].tiny} {rt.tiny}" + (f" {row.precision}" if rt.deployable else "")


def _times(g: Gain) -> str:
    return f"{g.speedup_p50:.2f}x" if g.speedup_p50 is not None else "-"


def headline_text(bench: BenchFile) -> str:
    """The strip gain in one plain sentence, naming the runtime it is measured in (or why it cannot be)."""
    h = bench.headline
    if h.strip is None:
        return f"No headline: {h.reason or 'the ensemble or the branch row did not run'}."
    br, ens = bench.row(h.strip.row), bench.row(h.strip.versus)
    text = (f"In {runtime_text(br)}, the kept branch answers one image {_times(h.strip)} faster than the ONE-E "
            f"ensemble (p50 {br.latency_ms.p50:.3f} vs {ens.latency_ms.p50:.3f} ms) with "
            f"{h.strip.accuracy_delta:+.2f} top-1 points ({br.accuracy:.2f}% vs {ens.accuracy:.2f}%)")
    if h.runtime_gain:
        text += f"; ONNX Runtime vs PyTorch eager adds {_times(h.runtime_gain)}"
    if h.precision_gain:
        p = bench.row(h.precision_gain.row).precision
        text += f"; {p} vs fp32 adds {_times(h.precision_gain)} ({h.precision_gain.accuracy_delta:+.2f} points)"
    if h.prune:
        flops = bench.row(h.prune.row).flops, br.flops
        share = f", {flops[0] / flops[1]:.2f}x the FLOPs" if all(flops) else ""
        text += (f"; pruning (compress) adds {_times(h.prune)} at batch 1 and {h.prune.throughput_ratio or 0:.2f}x "
                 f"the images/s at batch {h.prune.batch} in {runtime_text(br)} ({h.prune.accuracy_delta:+.2f} "
                 f"points{share})")
    return text + "."
