"""Figures shared by the report stage and compare: training curves from train/metrics.jsonl, and the
millisecond axis of latency plots. matplotlib's object API only (no pyplot: no window, no global state)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

from pipeline.errors import ArtifactError
from pipeline.rundir import atomic_path

CURVES_SIZE_IN, CURVES_DPI = (12.0, 4.0), 100  # 1200 x 400 pixels: three panels side by side


@dataclasses.dataclass(frozen=True)
class Curves:
    """One training run's per-epoch records (train/metrics.jsonl), as one set of lines."""

    label: str
    history: list[dict[str, Any]]
    kept: int | None = None  # the branch select kept: drawn alone when several runs share a figure
    colour: str | None = None
    style: str = "-"
    marker: str = "o"


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """train/metrics.jsonl: one JSON object per finished epoch."""
    try:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{path} is not JSON lines ({exc}); rerun with --from train") from None


def write_training_curves(runs: list[Curves], path: Path, title: str) -> None:
    with atomic_path(path) as tmp:
        training_curves_figure(runs, title).savefig(tmp, format="png", dpi=CURVES_DPI)


def training_curves_figure(runs: list[Curves], title: str) -> Figure:
    """Training loss, learning rate and validation top-1 per epoch. One run: every branch, ONE-E (the gated
    teacher) and the kept branch in bold; several runs (compare): the kept branch of each."""
    fig = Figure(figsize=CURVES_SIZE_IN, dpi=CURVES_DPI, layout="constrained")
    loss_ax, lr_ax, val_ax = fig.subplots(1, 3)
    single = len(runs) == 1
    for run in runs:
        epochs = [r["epoch"] for r in run.history]
        line = {"color": run.colour, "linestyle": run.style, "marker": run.marker, "markersize": 3}
        loss_ax.plot(epochs, [r["train_loss"] for r in run.history], label=run.label, **line)
        lr_ax.plot(epochs, [r["lr"] for r in run.history], label=run.label, **line)
        validated = [r for r in run.history if r.get("val")]  # an epoch may have had no validation pass
        heads = len(validated[0]["val"]["branches"]) if validated else 0
        for head in range(heads) if single else [run.kept or 0]:
            if single:  # the branches in the colour cycle, the kept one bold
                label = f"{'branch' if heads > 1 else 'network'} {head}" + (" (kept)" if head == run.kept else "")
                style = {**line, "color": None, "linewidth": 2.5 if head == run.kept else 1.2}
            else:
                label, style = run.label, line
            val_ax.plot([r["epoch"] for r in validated], [r["val"]["branches"][head] for r in validated],
                        label=label, **style)
        if single and validated and "teacher" in validated[0]["val"]:
            val_ax.plot([r["epoch"] for r in validated], [r["val"]["teacher"] for r in validated],
                        label="ONE-E (gated ensemble)", color="black", linestyle="--", marker="s", markersize=3)
    loss_ax.set(title="training loss", xlabel="epoch", ylabel="mean loss over the epoch")
    lr_ax.set(title="learning rate (at the epoch's end)", xlabel="epoch", ylabel="lr")
    val_ax.set(title="validation top-1" + ("" if single else ": kept branch"), xlabel="epoch", ylabel="top-1 (%)")
    for ax in (loss_ax, lr_ax, val_ax):
        ax.grid(True, alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    val_ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))  # outside the axes: covers no line
    fig.suptitle(title)
    return fig


def milliseconds_axis(ax: Axes, values: list[float]) -> None:
    """A log x axis when `values` span over 10x, else linear; ticks read as plain milliseconds (0.2, 0.5, 1, 2),
    never matplotlib's 2x10^-1."""
    span = max(values) / max(min(values), 1e-12) if values else 1.0
    if span <= 10:
        return
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0) if span <= 1000 else (1.0,)))  # no crowding
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())
