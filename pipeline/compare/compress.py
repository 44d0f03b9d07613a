"""`one-pipeline compare --compress`: does ONE's teacher pay once the kept branch is pruned? After compare's
runs, each seed's ONE and vanilla networks are pruned to the config's compress.flops_ratio and fine-tuned
with the config's compress budget, five ways:

    one-ensemble   ONE's kept branch, distilled from ONE-E        one-labels   the same, CE only
    one-branch     the same, distilled from the unpruned branch   vanilla-labels  the vanilla network, CE only
    vanilla-branch the vanilla network, distilled from itself unpruned

Each is its own run directory (`compress-<variant>-seed<s>`, a copy of compare's run taken through the
compress stage), so an interrupted compare resumes. The table (test top-1 of the pruned network, mean and
std over seeds, and paired differences of one-ensemble against both vanilla variants) goes to
`<name>-compare/compress.md` and `compress.json`.
"""

from __future__ import annotations

import shutil
import statistics
from pathlib import Path
from typing import Any, Sequence

from rich.console import Console
from rich.markup import escape

from pipeline.compare import significance
from pipeline.compare.runs import Method, methods, run_config
from pipeline.config import Config, load_config
from pipeline.device import resolve_device
from pipeline.errors import ArtifactError
from pipeline.rundir import RunDir, write_json, write_text
from pipeline.runner import run_stages
from pipeline.stage import StageContext

# (key, which compare run is pruned, teacher, label)
VARIANTS = (("one-ensemble", "one", "one_e", "ONE kept branch pruned, KD from ONE-E"),
            ("one-labels", "one", "none", "ONE kept branch pruned, CE only"),
            ("one-branch", "one", "branch", "ONE kept branch pruned, KD from the unpruned branch"),
            ("vanilla-labels", "vanilla", "none", "vanilla pruned, CE only"),
            ("vanilla-branch", "vanilla", "branch", "vanilla pruned, KD from itself unpruned"))


def compress_compare(config: Path, overrides: Sequence[str], seeds: Sequence[int], console: Console) -> Path:
    base = load_config(config, overrides)
    root = base.output_root / f"{base.name}-compare"
    by_key = {m.key: m for m in methods([])}
    device = resolve_device(base.train.device)
    records = []
    for seed in seeds:
        for key, source, teacher, label in VARIANTS:
            cfg = _config(config, overrides, root, by_key[source], seed, key, teacher)
            console.rule(f"[bold]compare --compress[/bold]: {escape(label)}, seed {seed}")
            run = RunDir(cfg.run_dir)
            if not run.root.exists():
                source_dir = root / f"{source}-seed{seed}"
                if not (source_dir / "manifest.json").exists():
                    raise ArtifactError(f"{source_dir} has no finished compare run; run compare without --compress "
                                        "first (it is what --compress prunes)")
                shutil.copytree(source_dir, run.root, ignore=shutil.ignore_patterns("export", ".lock"))
            with run.lock():
                run_stages(cfg, run, StageContext(cfg, run, device, console=console,
                                                  label=f"{key} seed {seed} | "), until="compress")
            summary = (run.stage("compress") or {}).get("summary") or {}
            records.append({"variant": key, "seed": seed, "test": summary["test"]["pruned"],
                            "branch_test": summary["test"]["branch"], "val": summary["val"]["pruned"],
                            "flops_ratio": summary["flops_ratio"], "deployed": summary["deployed"],
                            "run": str(run.root)})
    table = summarise(base, seeds, records)
    write_json(root / "compress.json", table)
    write_text(root / "compress.md", markdown(table))
    console.print(escape(table["verdict"]), highlight=False)
    console.print(escape(f"compress table: {root / 'compress.md'}"), highlight=False)
    return root / "compress.md"


def _config(config: Path, overrides: Sequence[str], root: Path, method: Method, seed: int, key: str,
            teacher: str) -> Config:
    return run_config(config, overrides, root, method, seed, name=f"compress-{key}-seed{seed}",
                      extra=("compress.enabled=true", f"compress.teacher={teacher}"))


def summarise(base: Config, seeds: Sequence[int], records: list[dict]) -> dict[str, Any]:
    rows = []
    for key, _, teacher, label in VARIANTS:
        runs = [r for r in records if r["variant"] == key]
        values = [r["test"] for r in runs]
        rows.append({"variant": key, "label": label, "teacher": teacher,
                     "per_seed": {r["seed"]: r["test"] for r in runs},
                     "mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else None,
                     "unpruned_mean": statistics.mean(r["branch_test"] for r in runs),
                     "flops_ratio": runs[0]["flops_ratio"], "deployed": sum(r["deployed"] for r in runs)})
    pairs = [paired(records, "one-ensemble", other) for other in ("vanilla-labels", "vanilla-branch")]
    wins = all(significance.significant(p) and p["diff"] > 0 for p in pairs)
    best = max(rows, key=lambda r: r["mean"])
    verdict = (f"best: {best['label']} ({best['mean']:.2f}%). " + "; ".join(p["text"] for p in pairs) + ". " +
               ("ONE's teacher pays its training cost in this pipeline." if wins else
                "ONE's teacher does not pay here: its pruned branch is not significantly better than the "
                "pruned vanilla network."))
    c = base.compress
    return {"seeds": list(seeds), "recipe": {"flops_ratio": c.flops_ratio, "channel_multiple": c.channel_multiple,
                                             "epochs": c.epochs, "images_per_epoch": c.images_per_epoch, "lr": c.lr,
                                             "temperature": c.temperature, "train_epochs": base.train.epochs,
                                             "max_accuracy_drop": c.max_accuracy_drop},
            "rows": rows, "pairs": pairs, "verdict": verdict, "runs": records}


def paired(records: list[dict], treated: str, control: str) -> dict[str, Any]:
    """treated - control, seed by seed (the same seed trained both sides' networks' data order), by the
    one paired test of pipeline/compare/significance.py."""
    figures = significance.paired({r["seed"]: r["test"] for r in records if r["variant"] == treated},
                                  {r["seed"]: r["test"] for r in records if r["variant"] == control})
    diff, p, n = figures["diff"], figures["p"], figures["n"]
    where = f"paired t-test p = {p:.3g}" if p is not None else "no significance figure (one seed or no spread)"
    text = (f"{treated} vs {control}: {diff:+.2f} points over {n} seeds ({where})" if diff is not None else
            f"{treated} vs {control}: no seed run by both")
    return {"treated": treated, "control": control, "diff": diff, "p": p, "n": n, "text": text}


def markdown(table: dict[str, Any]) -> str:
    seeds = table["seeds"]
    r = table["recipe"]
    lines = ["# Does ONE's teacher pay once the kept branch is pruned?", "",
             f"Pruned to {r['flops_ratio']:g} of the kept branch's FLOPs (channel multiples of "
             f"{r['channel_multiple']}), fine-tuned {r['epochs']} epoch(s) of {r['images_per_epoch'] or 'all'} "
             f"images at lr {r['lr']:g}; test top-1 %, seeds {', '.join(map(str, seeds))}.", "",
             "| variant | teacher | " + " | ".join(f"seed {s}" for s in seeds) +
             " | mean | std | unpruned mean | deployed (guard) |",
             "|---|---|" + "---|" * len(seeds) + "---|---|---|---|"]
    for row in table["rows"]:
        std = "-" if row["std"] is None else f"{row['std']:.2f}"
        lines.append(f"| {row['label']} | {row['teacher']} | " +
                     " | ".join(f"{row['per_seed'].get(s, float('nan')):.2f}" for s in seeds) +
                     f" | {row['mean']:.2f} | {std} | {row['unpruned_mean']:.2f} | {row['deployed']} of {len(seeds)} |")
    guard = (f"Deployed: the seeds on which the pruned network stayed within compress.max_accuracy_drop "
             f"({r['max_accuracy_drop']:g}) validation top-1 points of its unpruned network, so that the pipeline "
             "would ship it.")
    return "\n".join([*lines, "", guard, "", table["verdict"], ""])
