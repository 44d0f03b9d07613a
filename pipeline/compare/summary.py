"""`one-pipeline compare`: is ONE worth it on this data? The config's backbone is trained alone (vanilla) and
with ONE, same recipe, same epochs, same seeds, each as its own run directory through the runner, so an
interrupted compare resumes and a finished run is reused. Then the runs' recorded test accuracies are
summarised per method (mean and std over seeds), the kept branch's gain over vanilla is tested seed by seed
(a paired t-test: runs with the same seed share the shuffling and augmentation, and every run the images
and their labels) beside Welch's t-test on the two groups, and the deploy cost of both networks is measured
in ONNX Runtime.

    result = compare(cfg_path, overrides, seeds=[0, 1, 2], variants=["model.branches=4"], console=console)
    result.markdown  # <output_root>/<name>-compare/compare.md, beside compare.json and the plot

Everything it writes is in `<output_root>/<name>-compare/`: one run directory per method and seed
(`vanilla-seed0`, `one-seed0`, ...) and the summary files.
"""

from __future__ import annotations

import dataclasses
import statistics
from pathlib import Path
from typing import Any, Sequence

import torch
from rich.console import Console
from rich.markup import escape

from pipeline.compare.cost import deploy_cost
from pipeline.compare.runs import Method, collect, methods, run_all, run_config
from pipeline.compare.significance import gain
from pipeline.config import Config, load_config
from pipeline.device import resolve_device
from pipeline.rundir import RunDir, cpu_model, write_json

COMPARE_VERSION = 2  # 2: gains carry the paired test (the verdict's) and Welch's


@dataclasses.dataclass(frozen=True)
class CompareResult:
    root: Path
    markdown: Path
    summary: Path
    plot: Path
    verdict: str
    curves: Path


def compare(config: Path, overrides: Sequence[str], seeds: Sequence[int], variants: Sequence[str],
            console: Console) -> CompareResult:
    from pipeline.compare.report import write_curves, write_markdown, write_plot  # matplotlib only when writing

    base = load_config(config, overrides)
    root = base.output_root / f"{base.name}-compare"
    compared = methods(variants)
    plan = [(method, seed) for seed in seeds for method in compared]  # seed by seed: pairs finish early
    configs = [run_config(config, overrides, root, method, seed) for method, seed in plan]  # all errors first
    device = resolve_device(base.train.device)
    run_all(plan, configs, device, console)
    records = [collect(RunDir(cfg.run_dir), method, seed) for (method, seed), cfg in zip(plan, configs)]
    summary = summarise(base, seeds, compared, records, device)
    summary["cost"] = deploy_cost(configs[:len(compared)], compared, device, base.bench.threads)
    result = CompareResult(root, root / "compare.md", root / "compare.json", root / "accuracy_per_seed.png",
                           summary["gains"][0]["verdict"], root / "training_curves.png")
    write_json(result.summary, summary)
    write_markdown(summary, result.markdown, result.plot.name, result.curves.name)
    write_plot(summary, result.plot)
    write_curves(summary, result.curves)
    console.print(escape(result.verdict), highlight=False)
    console.print(escape(f"compare: {result.markdown}\njson:    {result.summary}\nplots:   {result.plot}, "
                         f"{result.curves.name}"), highlight=False)
    return result


def summarise(base: Config, seeds: Sequence[int], compared: Sequence[Method], records: list[dict],
              device: torch.device) -> dict[str, Any]:
    by_method = {m.key: [r for r in records if r["method"] == m.key] for m in compared}
    rows = [_row("vanilla", "vanilla: the network trained alone", "vanilla", by_method["vanilla"], "kept")]
    for method in compared[1:]:
        runs, short = by_method[method.key], method.short
        rows.append(_row(method.key, f"{method.label}: kept branch (chosen on validation)", f"{short}\nkept branch",
                         runs, "kept"))
        if method.key == "one":
            rows.append(_row(method.key, "ONE: best branch on test (an oracle, not a deployable choice)",
                             "ONE\nbest on test", runs, "best"))
            rows.append(_row(method.key, "ONE: worst branch on test", "ONE\nworst on test", runs, "worst"))
        rows.append(_row(method.key, f"{method.label}: ONE-E, the gated ensemble (the full model)",
                         f"{short}\nONE-E", runs, "teacher"))
    def kept(method: str) -> dict[str, float]:
        return {str(r["seed"]): r["kept"] for r in by_method[method]}

    gains = [{"method": m.key, "label": m.label, **gain(kept(m.key), kept("vanilla"))} for m in compared[1:]]
    training = [{"method": m.key, "label": m.label,
                 "train_s": statistics.mean(r["train_s"] for r in by_method[m.key]),
                 "images_per_s": statistics.mean(r["images_per_s"] for r in by_method[m.key]),
                 "train_params": by_method[m.key][0]["train_params"]} for m in compared]
    return {"compare_version": COMPARE_VERSION, "name": base.name, "seeds": list(seeds),
            "recipe": recipe(base),
            "device": str(device), "cpu": cpu_model(), "torch_threads": torch.get_num_threads(),
            "rows": rows, "gains": gains, "training": training, "runs": records}


def recipe(cfg: Config) -> dict[str, Any]:
    """What a compare's verdict holds for: the data and the training recipe (not the seed or the later stages)."""
    return {"dataset": cfg.data.dataset, "train_size": cfg.data.train_size, "label_noise": cfg.data.label_noise,
            "augment": cfg.data.augment, "arch": cfg.model.arch, "branches": cfg.model.branches,
            "epochs": cfg.train.epochs, "batch_size": cfg.train.batch_size, "schedule": cfg.train.schedule,
            "weight_decay": cfg.train.weight_decay, "eval_every": cfg.train.eval_every,
            "temperature": cfg.loss.temperature}


def _row(method: str, label: str, short: str, runs: list[dict], field: str) -> dict[str, Any]:
    values = [r[field] for r in runs]
    return {"method": method, "label": label, "short": short, "field": field,
            "per_seed": {str(r["seed"]): r[field] for r in runs},
            "mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else None}
