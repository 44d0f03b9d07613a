"""The forms a bench did not measure, folded: one line per reason, naming every form that shares it, so that
the results tables (report.md's and the terminal's, pipeline/deploy/benchfile.py `rich_table`) hold only
the rows that ran (or failed), and a CPU host's dozen dash rows become a few lines:

    torch.compile for ONE-E, branch: torch.compile with CUDA graphs is measured on CUDA only; ...
    TensorRT for ONE-E, branch, pruned branch: engine skipped: TensorRT is not importable ...
"""

from __future__ import annotations

from typing import Iterable

from pipeline.deploy.benchfile import BenchFile, Row
from pipeline.deploy.forms import MODELS, RUNTIMES


def folded(rows: Iterable[Row], status: str = "skipped") -> list[str]:
    """`<forms>: <reason>` for the rows of `status`, one line per reason, in the order the rows come."""
    by_reason: dict[str, list[Row]] = {}
    for row in rows:
        if row.status == status:
            by_reason.setdefault(row.reason or "", []).append(row)
    return [f"{forms_text(group)}: {reason}" for reason, group in by_reason.items()]


def forms_text(rows: Iterable[Row]) -> str:
    """The forms of `rows`, runtime by runtime: "ONNX Runtime fp16/int8 for ONE-E, branch; TensorRT for
    branch". Precisions are named where the runtime has more than one (or the row's is not its only one)."""
    by_runtime: dict[str, dict[str, list[str]]] = {}  # runtime -> model -> precisions, in the rows' order
    for row in rows:
        by_runtime.setdefault(row.format, {}).setdefault(row.model, []).append(row.precision)
    parts = []
    for runtime, models in by_runtime.items():
        rt = RUNTIMES[runtime]
        by_precisions: dict[tuple[str, ...], list[str]] = {}  # models that share their precisions share a part
        for model, precisions in models.items():
            by_precisions.setdefault(tuple(precisions), []).append(MODELS[model].who)
        for precisions, who in by_precisions.items():
            named = len(rt.precisions) > 1 or any(p != rt.precisions[0] for p in precisions)
            parts.append(f"{rt.name}{' ' + '/'.join(precisions) if named else ''} for {', '.join(who)}")
    return "; ".join(parts)


def shown_rows(bench: BenchFile) -> list[Row]:
    """The rows a results table shows: those measured, and those that failed (marked by their status)."""
    return [row for row in bench.rows if row.status != "skipped"]


def console_lines(bench: BenchFile) -> list[str]:
    """What the terminal prints under the results table: the folded skipped forms, then the failed ones."""
    lines = []
    for title, status in (("not measured here", "skipped"), ("failed", "failed")):
        found = folded(bench.rows, status)
        if found:
            lines += [f"{title}:", *[f"  {line}" for line in found]]
    return lines
