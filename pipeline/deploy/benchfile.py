"""The schema of bench/bench.json (documented in docs/bench_schema.md) and the Rich table of its rows.

`BenchFile.model_validate(json.loads(text))` checks a file against the schema: the bench validates
what it writes, the report what it reads.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from rich.markup import escape
from rich.table import Table

SCHEMA_VERSION = 1
ENSEMBLE_ROW = "one_e_eager"  # the headline compares these two rows
BRANCH_ROW = "branch_onnx_fp32"


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
    accuracy_delta: float | None  # this row's top-1 minus the fp32 row's, percentage points
    speedup_p50: float | None  # fp32 batch-1 p50 / this row's


class Row(Strict):
    name: str
    label: str
    model: Literal["ensemble", "full_branch", "branch"]
    format: Literal["pytorch", "torch.compile", "onnxruntime", "tensorrt", "triton"]
    precision: Literal["fp32", "fp16", "int8"]
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
    throughput: Throughput | None = None
    provider: str | None = None
    vs_fp32: VsFP32 | None = None

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


class Check(Strict):
    row: str
    train_head: str  # which figure of the train summary's "test": "teacher", "branches[i]"
    bench: float
    train: float
    equal: bool


class Headline(Strict):
    ensemble_row: str
    branch_row: str
    speedup_p50: float | None  # ensemble batch-1 p50 / branch batch-1 p50
    size_ratio: float | None  # ensemble file bytes / branch file bytes
    params_ratio: float | None
    flops_ratio: float | None
    ensemble_accuracy: float | None
    branch_accuracy: float | None
    accuracy_delta: float | None  # branch minus ensemble, percentage points
    reason: str | None = None  # why some figures are null


class BenchFile(Strict):
    schema_version: Literal[1]
    run: str
    method: Literal["one", "vanilla"]
    branch: int = Field(ge=0)
    device: str
    threads: int = Field(ge=1)
    test_images: int = Field(ge=1)
    eval_batch_size: int = Field(ge=1)
    settings: dict[str, Any]
    environment: dict[str, Any]
    checks: list[Check]
    rows: list[Row]
    headline: Headline

    @model_validator(mode="after")
    def _unique_names(self) -> BenchFile:
        names = [r.name for r in self.rows]
        if len(set(names)) != len(names):
            raise ValueError(f"row names repeat: {names}")
        return self

    def row(self, name: str) -> Row | None:
        return next((r for r in self.rows if r.name == name), None)


FORMAT_NAMES = {"pytorch": "PyTorch eager", "torch.compile": "torch.compile", "onnxruntime": "ONNX Runtime",
                "tensorrt": "TensorRT", "triton": "Triton server"}


def short_label(row: Row) -> str:
    """E.g. "ONE-E, PyTorch eager" or "branch, ONNX Runtime int8"."""
    who = {"ensemble": "ONE-E", "full_branch": "full model -> branch", "branch": "branch"}[row.model]
    precision = f" {row.precision}" if row.format in ("onnxruntime", "tensorrt") else ""
    return f"{who}, {FORMAT_NAMES[row.format]}{precision}"


def fmt(value: float | int | None, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def status_text(row: Row) -> str:
    """Ultralytics keeps "export failed" apart from "exported, validation failed"."""
    if row.status == "failed":
        return "failed (export)" if row.failed_in == "export" else "failed (bench)"
    return row.status


def table_cells(row: Row) -> list[str]:
    lat, thr = row.latency_ms, row.throughput
    return [row.label, FORMAT_NAMES[row.format], row.precision, status_text(row),
            fmt(row.file_bytes / 1e6 if row.file_bytes is not None else None, ".3f"),
            fmt(row.accuracy), fmt(row.agreement), fmt(lat and lat.p50, ".3f"), fmt(lat and lat.p90, ".3f"),
            fmt(lat and lat.p99, ".3f"), fmt(thr and thr.images_per_s, ".0f"), fmt(row.params, ","),
            fmt(row.flops / 1e6 if row.flops is not None else None, ".2f")]


def table_headers(bench: BenchFile) -> list[str]:
    batch = bench.settings.get("throughput_batch", "N")
    return ["variant", "format", "precision", "status", "size MB", "top-1 %", "agree %", "p50 ms", "p90 ms",
            "p99 ms", f"img/s @{batch}", "params", "MFLOPs"]


def rich_table(bench: BenchFile) -> Table:
    """The terminal's table: the columns that decide, narrow enough for 80 columns (report.md has all)."""
    batch = bench.settings.get("throughput_batch", "N")
    table = Table(title=f"bench: {bench.run} on {bench.device}, {bench.threads} thread(s), "
                        f"{bench.test_images} test images")
    for i, header in enumerate(["variant", "status", "top-1", "agree", "p50 ms", "p99 ms", f"img/s@{batch}", "MB"]):
        table.add_column(header, justify="left" if i < 2 else "right", no_wrap=i == 0)
    colour = {"ok": "green", "skipped": "yellow", "failed": "red"}
    for row in bench.rows:
        lat, thr = row.latency_ms, row.throughput
        table.add_row(escape(_tiny_label(row)), f"[{colour[row.status]}]{escape(status_text(row))}[/]",
                      fmt(row.accuracy), fmt(row.agreement), fmt(lat and lat.p50, ".3f"), fmt(lat and lat.p99, ".3f"),
                      fmt(thr and thr.images_per_s, ".0f"),
                      fmt(row.file_bytes / 1e6 if row.file_bytes is not None else None, ".2f"))
    return table


def _tiny_label(row: Row) -> str:
    who = {"ensemble": "ONE-E", "full_branch": "full->branch", "branch": "branch"}[row.model]
    how = {"pytorch": "eager", "torch.compile": "compile", "onnxruntime": "ORT", "tensorrt": "TRT",
           "triton": "Triton"}[row.format]
    return f"{who} {how}" + (f" {row.precision}" if row.format in ("onnxruntime", "tensorrt") else "")


def headline_text(bench: BenchFile) -> str:
    """The trade-off in one plain sentence (or why it cannot be given)."""
    h = bench.headline
    if h.speedup_p50 is None:
        return f"No headline: {h.reason or 'the ensemble or the branch row did not run'}."
    ens, br = bench.row(h.ensemble_row), bench.row(h.branch_row)
    delta = h.accuracy_delta
    cost = ("no accuracy change" if delta == 0 else
            f"{abs(delta):.2f} points {'less' if delta < 0 else 'more'} top-1 accuracy")
    return (f"The kept branch ({br.label}) is {h.speedup_p50:.2f}x faster than the ONE-E ensemble in PyTorch "
            f"eager at batch 1 (p50 {br.latency_ms.p50:.3f} ms vs {ens.latency_ms.p50:.3f} ms), "
            f"{fmt(h.size_ratio)}x smaller on disk ({fmt(h.params_ratio)}x fewer parameters), with {cost} "
            f"({h.branch_accuracy:.2f}% vs {h.ensemble_accuracy:.2f}%).")


def reason_lines(bench: BenchFile) -> list[str]:
    """`label (format precision): status: reason` for every row that did not run."""
    return [f"{r.label}: {status_text(r)}: {r.reason}" for r in bench.rows if r.status != "ok"]
