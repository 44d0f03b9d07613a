"""`one-pipeline compare --compress`: does ONE's teacher pay once the kept branch is pruned? After compare's
runs, each seed's ONE and vanilla networks are pruned to the config's compress.flops_ratio and fine-tuned
with the config's compress budget, five ways:

    one-ensemble   ONE's kept branch, distilled from ONE-E        one-labels   the same, CE only
    one-branch     the same, distilled from the unpruned branch   vanilla-labels  the vanilla network, CE only
    vanilla-branch the vanilla network, distilled from itself unpruned

With a latency target (compress.target_speedup / target_ms) the plan is made once, on the first seed's ONE
kept branch, written to `<name>-compare/compress-plan-<plan>.json` and pinned (compress.plan) for every
variant and seed, so that the five variants prune to the same network (a later compare reuses it while its
key holds: target, runtime, threads, CPU). Each is its own run directory (`compress-<variant>-seed<s>`, a
copy of compare's run taken through the compress stage), so an interrupted compare resumes. The table (test
top-1 of the pruned network, mean and std over seeds, and paired differences of one-ensemble against both
vanilla variants) goes to `<name>-compare/compress.md` and `compress.json`.
"""

from __future__ import annotations

import shutil
import statistics
from pathlib import Path
from typing import Any, Sequence

import torch
from rich.console import Console
from rich.markup import escape

from pipeline.compare import significance
from pipeline.compare.runs import Method, methods, run_config
from pipeline.config import Config, load_config
from pipeline.deploy import compress_plan, latency_plan
from pipeline.device import resolve_device
from pipeline.errors import ArtifactError, StageSkipped
from pipeline.rundir import RunDir, write_json, write_text
from pipeline.runner import run_stages
from pipeline.stage import StageContext
from pipeline.training import prune
from pipeline.training.checkpoint import load_model
from pipeline.training.data import load_datasets

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
    pinned = pin_plan(_config(config, overrides, root, by_key["one"], seeds[0], "plan", "one_e"),
                      root / f"one-seed{seeds[0]}", device, console)
    for seed in seeds:
        for key, source, teacher, label in VARIANTS:
            cfg = _config(config, overrides, root, by_key[source], seed, key, teacher, pinned)
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
            record = run.stage("compress")
            summary = record.summary if record else {}
            records.append({"variant": key, "seed": seed, "test": summary["test"]["pruned"],
                            "branch_test": summary["test"]["branch"], "val": summary["val"]["pruned"],
                            "flops_ratio": summary["flops_ratio"], "deployed": summary["deployed"],
                            "plan": (summary.get("latency_plan") or {}).get("plan"), "run": str(run.root)})
    table = summarise(base, seeds, records)
    write_json(root / "compress.json", table)
    write_text(root / "compress.md", markdown(table))
    console.print(escape(table["verdict"]), highlight=False)
    console.print(escape(f"compress table: {root / 'compress.md'}"), highlight=False)
    return root / "compress.md"


def _config(config: Path, overrides: Sequence[str], root: Path, method: Method, seed: int, key: str,
            teacher: str, plan: Path | None = None) -> Config:
    return run_config(config, overrides, root, method, seed, name=f"compress-{key}-seed{seed}",
                      # these runs stop at compress: no bench to measure a latency target's form in
                      extra=("compress.enabled=true", f"compress.teacher={teacher}", "bench.enabled=false",
                             *([f"compress.plan={plan}"] if plan else [])))


def pin_plan(cfg: Config, source_dir: Path, device: torch.device, console: Console) -> Path | None:
    """The latency plan every variant and seed prunes to: planned here once on `source_dir`'s kept branch (or
    reused from an earlier compare with the same key); None without a latency target or with a plan the config
    pins itself. The file is named after the plan, so that another plan is another config for every run."""
    if not compress_plan.has_latency_target(cfg.compress) or cfg.compress.plan is not None:
        return None
    run = RunDir(source_dir)
    if not run.manifest_path.exists():
        raise ArtifactError(f"{source_dir} has no finished compare run; run compare without --compress first "
                            "(it is what --compress prunes)")
    branch, _ = load_model(run.output("strip", "model"))
    data = load_datasets(cfg.data)
    example, _ = next(data.val.batches(64))
    key = compress_plan.plan_key(cfg, branch, tuple(example.shape[1:]))
    for found in sorted(source_dir.parent.glob("compress-plan-*.json")):
        if compress_plan.read_plan_file(found).get("key") == key:
            console.print(escape(f"compare --compress: every variant prunes to the plan of {found}"), highlight=False)
            return found
    space = latency_plan.PlanSpace(branch.spec, prune.conv_geometry(branch, example),
                                   compress_plan.channel_multiple(cfg.compress))
    console.rule(f"[bold]compare --compress[/bold]: one latency plan for every variant, on {source_dir.name}")
    try:
        doc = compress_plan.measure(StageContext(cfg, run, device, console=console), space,
                                    tuple(example.shape[1:]), data.val, key)
    except StageSkipped as exc:  # the kept branch meets the target as it is: each run says so itself
        console.print(escape(str(exc)), highlight=False)
        return None
    path = source_dir.parent / f"compress-plan-{doc['chosen']['label'].replace('/', '_')}.json"
    write_json(path, doc)
    console.print(escape(f"latency plan {doc['chosen']['label']} ({doc['chosen']['speedup']:.2f}x the kept branch), "
                         f"pinned for every variant and seed: {path}"), highlight=False)
    return path


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
                                             "max_accuracy_drop": c.max_accuracy_drop,
                                             "target_speedup": c.target_speedup, "target_ms": c.target_ms,
                                             "plans": sorted({r["plan"] for r in records if r.get("plan")})},
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
    pruned = (f"Pruned to the latency plan {', '.join(r['plans'])} (planned once, pinned for every run)"
              if r.get("plans") else f"Pruned to {r['flops_ratio']:g} of the kept branch's FLOPs")
    lines = ["# Does ONE's teacher pay once the kept branch is pruned?", "",
             f"{pruned} (channel multiples of {r['channel_multiple']}), fine-tuned {r['epochs']} epoch(s) of "
             f"{r['images_per_epoch'] or 'all'} "
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
