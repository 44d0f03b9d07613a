"""Where does ONE pay? Several compares side by side: one row per regime (a compare.json), the kept branch's
paired gain over the same network trained alone with its 95% confidence interval, as a Markdown table and
one plot. Compares that differ only in training-set size for the same images seen (train_size x epochs, the
same label noise) also get the gain against the training-set size, in a second panel.

    one-pipeline gain-map artifacts/edge_small_data_long-compare artifacts/edge_noisy_labels-compare \
        --plot gain_map.png
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from matplotlib.figure import Figure

from pipeline.compare.summary import COMPARE_VERSION
from pipeline.deploy.benchfile import fmt
from pipeline.errors import ArtifactError
from pipeline.rundir import atomic_path


def gain_map(paths: Sequence[Path], plot_path: Path) -> str:
    """Read the compares, draw the plot to `plot_path` and return the table (what the command prints)."""
    summaries = load(paths)
    plot(summaries, plot_path)
    return table(summaries) + f"\nplot: {plot_path}"


def load(paths: Sequence[Path]) -> list[dict[str, Any]]:
    """Each compare's summary (a compare.json, or the `<name>-compare` folder that holds one)."""
    summaries = []
    for path in paths:
        file = path / "compare.json" if path.is_dir() else path
        try:
            summary = json.loads(file.read_text())
        except (OSError, ValueError) as exc:
            raise ArtifactError(f"{file}: not a readable compare.json ({exc}); run `one-pipeline compare` first")
        if summary.get("compare_version", 1) < COMPARE_VERSION:
            raise ArtifactError(f"{file} predates the paired statistics; run the same `one-pipeline compare` again "
                                "(its runs are cached, only the summary is rewritten)")
        summaries.append(summary)
    return summaries


def regime(summary: dict[str, Any]) -> str:
    recipe = summary["recipe"]
    images = f"{recipe['train_size']:,} images" if recipe["train_size"] else "all images"
    noise = f", {100 * recipe['label_noise']:.0f}% noisy labels" if recipe.get("label_noise") else ""
    return f"{images}, {recipe['epochs']} epochs{noise}"


def images_seen(recipe: dict[str, Any]) -> int | None:
    """Training images drawn over the run (train_size x epochs); None when it trains on all images."""
    return recipe["train_size"] * recipe["epochs"] if recipe["train_size"] else None


def _mean(summary: dict[str, Any], method: str) -> float:
    return next(r["mean"] for r in summary["rows"] if r["method"] == method and r["field"] == "kept")


def table(summaries: Sequence[dict[str, Any]]) -> str:
    lines = ["| compare | regime | images seen | vanilla % | ONE kept branch % | gain, points (paired 95% CI) | "
             "paired p | seeds |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for summary in summaries:
        recipe, gain = summary["recipe"], summary["gains"][0]
        seen = f"{images_seen(recipe):,}" if recipe["train_size"] else "-"
        ci = f" ({gain['ci95'][0]:+.2f} to {gain['ci95'][1]:+.2f})" if gain["ci95"] else ""
        lines.append(f"| `{summary['name']}` | {regime(summary)} | {seen} | {_mean(summary, 'vanilla'):.2f} | "
                     f"{_mean(summary, 'one'):.2f} | {gain['diff']:+.2f}{ci} | {fmt(gain['p'], '.3g')} | "
                     f"{len(summary['seeds'])} |")
    return "\n".join(lines) + "\n"


def size_sweep(summaries: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The largest group of compares with the same images seen and label noise but different training-set
    sizes, smallest set first; empty when no two compares form one."""
    groups: dict[tuple, dict[int, dict[str, Any]]] = {}
    for summary in summaries:
        recipe = summary["recipe"]
        if recipe["train_size"]:
            key = (images_seen(recipe), recipe.get("label_noise") or 0.0)
            groups.setdefault(key, {})[recipe["train_size"]] = summary
    sweep = max(groups.values(), key=len, default={})
    return [sweep[size] for size in sorted(sweep)] if len(sweep) > 1 else []


def _gain_point(ax: Any, summary: dict[str, Any], at: float, vertical: bool) -> None:
    """The mean gain at `at` with whiskers to its 95% CI, coloured by whether the interval excludes zero."""
    gain = summary["gains"][0]
    low, high = gain["ci95"] or (gain["diff"], gain["diff"])
    whiskers = [[gain["diff"] - low], [high - gain["diff"]]]
    colour = "tab:green" if low > 0 else "tab:red" if high < 0 else "tab:gray"
    if vertical:
        ax.errorbar(at, gain["diff"], yerr=whiskers, fmt="o", capsize=4, color=colour)
    else:
        ax.errorbar(gain["diff"], at, xerr=whiskers, fmt="o", capsize=4, color=colour)


def plot(summaries: Sequence[dict[str, Any]], path: Path) -> None:
    """One row per regime: the mean gain, whiskers to its 95% CI, and the line of no gain; beside it, the
    size sweep's gain against the training-set size."""
    sweep = size_sweep(summaries)
    fig = Figure(figsize=(12.0 if sweep else 8.0, 1.2 + 0.6 * len(summaries)), dpi=100, layout="constrained")
    ax, *by_size = fig.subplots(1, 2, width_ratios=[2, 1]) if sweep else [fig.subplots()]
    for row, summary in enumerate(summaries):
        _gain_point(ax, summary, row, vertical=False)
    ax.axvline(0, color="black", linewidth=1)
    ax.set_yticks(range(len(summaries)), [f"{s['name']}\n{regime(s)}" for s in summaries], fontsize=8)
    ax.invert_yaxis()  # in the order given, top to bottom
    ax.set(xlabel="kept ONE branch - vanilla, test top-1 points (paired 95% CI)",
           title="Where does ONE pay? (green: the whole interval above zero)")
    ax.grid(True, axis="x", alpha=0.3)
    if sweep:
        size_ax = by_size[0]
        for summary in sweep:
            _gain_point(size_ax, summary, summary["recipe"]["train_size"], vertical=True)
        size_ax.axhline(0, color="black", linewidth=1)
        sizes = [s["recipe"]["train_size"] for s in sweep]
        size_ax.set_xscale("log")
        size_ax.minorticks_off()
        size_ax.set_xticks(sizes, [f"{size:,}" for size in sizes])
        size_ax.set(xlabel="training images", ylabel="gain, points",
                    title=f"the same {images_seen(sweep[0]['recipe']):,} images seen")
        size_ax.grid(True, alpha=0.3)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
