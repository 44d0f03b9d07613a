"""compare.json -> compare.md (verdict, accuracy per seed, gain with its significance, cost, training curves),
a plot of test accuracy per seed per method, and the training curves of every run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from pipeline.deploy.benchfile import fmt
from pipeline.plots import Curves, read_metrics, write_training_curves
from pipeline.rundir import RunDir, atomic_path, write_text


def _mean_std(row: dict[str, Any]) -> str:
    return f"{row['mean']:.2f}" + (f" ± {row['std']:.2f}" if row["std"] is not None else "")


def _ci(figures: dict[str, Any]) -> str:
    return f"{figures['ci95'][0]:+.2f} to {figures['ci95'][1]:+.2f}" if figures["ci95"] else "-"


def write_markdown(summary: dict[str, Any], path: Path, plot_name: str, curves_name: str | None = None) -> None:
    recipe, seeds = summary["recipe"], summary["seeds"]
    images = f"{recipe['train_size']} training images" if recipe["train_size"] else "all training images"
    if recipe.get("label_noise"):
        images += f", {100 * recipe['label_noise']:.0f}% of their labels replaced by another class"
    lines = [
        f"# Is ONE worth it? `{summary['name']}`, {len(seeds)} seed(s)",
        "",
        f"{recipe['arch']} on {recipe['dataset']} ({images}), {recipe['epochs']} epochs, batch "
        f"{recipe['batch_size']}, {recipe['schedule']} schedule; ONE with {recipe['branches']} branches, "
        f"T = {recipe['temperature']}. Vanilla and ONE share the recipe, the epochs and the seeds "
        f"({', '.join(map(str, seeds))}). Measured on {summary['cpu']} ({summary['device']}, "
        f"{summary['torch_threads']} threads).",
        "",
        f"**The kept ONE branch is {summary['gains'][0]['verdict']}.**",
        "",
        "## Test top-1 (%)",
        "",
        "| method | mean ± std | " + " | ".join(f"seed {s}" for s in seeds) + " |",
        "|---|---:|" + "---:|" * len(seeds),
    ]
    for row in summary["rows"]:
        cells = [fmt(row["per_seed"].get(str(s)), ".2f") for s in seeds]
        lines.append(f"| {row['label']} | {_mean_std(row)} | " + " | ".join(cells) + " |")
    lines += ["", f"![test top-1 per seed]({plot_name})", "",
              "## Gain of the kept branch over the network trained alone", "",
              "| method | gain (points) | " + " | ".join(f"seed {s}" for s in seeds) + " | paired 95% CI | "
              "paired p | Welch 95% CI | Welch p | verdict |", "|---|---:|" + "---:|" * (len(seeds) + 4) + "---|"]
    for gain in summary["gains"]:
        per_seed = [fmt(gain["paired"]["per_seed"].get(str(s)), "+.2f") for s in seeds]
        lines.append(f"| {gain['label']} | {gain['diff']:+.2f} | " + " | ".join(per_seed) + " | "
                     f"{_ci(gain['paired'])} | {fmt(gain['paired']['p'], '.3g')} | {_ci(gain['welch'])} | "
                     f"{fmt(gain['welch']['p'], '.3g')} | {gain['verdict'].split(':')[0]} |")
    lines += ["", "Per seed: the kept branch's test top-1 minus vanilla's with the same seed (same shuffling and "
                  "augmentation; every run sees the same images and labels). The verdict uses the paired t-test "
                  "on these differences when at least 2 seeds pair up, else Welch's t-test on the two groups; "
                  f"two-sided p below 0.05 counts as a difference. With {len(seeds)} seed(s) only a gain several "
                  "times its seed-to-seed spread can reach it.", "",
              *_cost(summary)]
    if curves_name:
        lines += ["## Training curves", "", "Training loss, learning rate and the kept branch's validation top-1 per "
                  "epoch, one colour per method, one line style per seed (each run's train/metrics.jsonl).", "",
                  f"![training curves per method and seed]({curves_name})", ""]
    lines += ["## Runs", ""]
    lines += [f"- `{r['run']}`: {r['method']}, seed {r['seed']}, kept branch {r['kept_branch']}"
              for r in summary["runs"]]
    write_text(path, "\n".join(lines) + "\n")


def _cost(summary: dict[str, Any]) -> list[str]:
    lines = ["## Cost", "",
             "| method | training s (mean) | training images/s | params trained | deployed params | MFLOPs | "
             "ONNX Runtime batch-1 p50 ms |", "|---|---:|---:|---:|---:|---:|---:|"]
    cost = {c["method"]: c for c in summary["cost"]}
    for train in summary["training"]:
        deployed = cost[train["method"]]
        lines.append(f"| {train['label']} | {train['train_s']:.1f} | {train['images_per_s']:.0f} | "
                     f"{train['train_params']:,} | {deployed['params']:,} | {deployed['flops'] / 1e6:.2f} | "
                     f"{deployed['p50_ms']:.3f} |")
    rounds = summary["cost"][0]
    return lines + ["", f"Training time is the train stage's wall time (with its validation passes), as each run "
                        "went: a run that shared the CPU or was resumed later reads slower, so compare these figures "
                        "only between runs made alike. The deployed "
                        f"network is the first seed's fp32 ONNX; its batch-1 latency is the median of "
                        f"{rounds['rounds']} rounds of {rounds['calls_per_round']} calls, the methods taking turns in "
                        "each round.", ""]


def write_plot(summary: dict[str, Any], path: Path) -> None:
    """One column per method, a dot per seed, a bar at the mean."""
    rows, seeds = summary["rows"], summary["seeds"]
    fig = Figure(figsize=(max(8.0, 1.3 * len(rows)), 4.5), dpi=100, layout="constrained")
    ax = fig.subplots()
    for column, row in enumerate(rows):
        ax.hlines(row["mean"], column - 0.3, column + 0.3, color="black", linewidth=2)
    for index, seed in enumerate(seeds):
        points = [(c, r["per_seed"][str(seed)]) for c, r in enumerate(rows) if str(seed) in r["per_seed"]]
        offset = (index - (len(seeds) - 1) / 2) * 0.08
        ax.scatter([c + offset for c, _ in points], [v for _, v in points], label=f"seed {seed}", zorder=3)
    ax.set_xticks(range(len(rows)), [r["short"] for r in rows], fontsize=8)
    ax.set(ylabel="test top-1 (%)", title=f"{summary['name']}: test top-1 per seed (bar: mean)")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))  # outside: never over a point
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")


def write_curves(summary: dict[str, Any], path: Path) -> None:
    write_training_curves(curves(summary), path, f"{summary['name']}: training per method and seed")


def curves(summary: dict[str, Any]) -> list[Curves]:
    """One set of lines per run: a colour per method, a line style and marker per seed."""
    labels = {t["method"]: t["label"] for t in summary["training"]}
    colours = {method: f"C{i}" for i, method in enumerate(labels)}
    looks = (("-", "o"), ("--", "s"), (":", "^"), ("-.", "D"))
    styles = {seed: looks[i % len(looks)] for i, seed in enumerate(summary["seeds"])}
    return [Curves(f"{labels[r['method']]}, seed {r['seed']}",
                   read_metrics(RunDir(r["run"]).output("train", "metrics")), kept=r["kept_branch"],
                   colour=colours[r["method"]], style=styles[r["seed"]][0], marker=styles[r["seed"]][1])
            for r in summary["runs"]]
