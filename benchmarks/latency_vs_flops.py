"""Latency-planned against FLOPs-planned pruning at the same measured speed-up (the issue's accuracy goal):
per seed, the config's run is trained once and pruned twice with the same fine-tune budget: to
compress.flops_ratio (widths only, `prune.plan_widths`), and to a latency target set to the speed-up that
FLOPs plan measures on this host (the latency planner may drop blocks). The latency plan is made once, on
the first seed, and pinned for the others (one network for every seed, as `compare --compress` does). Test
top-1 per seed, the paired difference (latency - FLOPs) and its t-test; JSON to <output_root>/<name>-lvf.json.

    python benchmarks/latency_vs_flops.py configs/edge.yaml --seeds 0,1,2          # ~10 min a seed on 2 cores
    python benchmarks/latency_vs_flops.py tiny.yaml --seeds 0 --rounds 3            # a smoke run

Speed is measured on this host (interleaved rounds, the planner's clock): run it with nothing else running.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import torch
from rich.console import Console

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone without installing

from pipeline.compare import significance  # noqa: E402
from pipeline.config import Config, load_config  # noqa: E402
from pipeline.deploy import compress_plan, plan_timing  # noqa: E402
from pipeline.rundir import RunDir, cpu_model, write_json  # noqa: E402
from pipeline.runner import run_stages  # noqa: E402
from pipeline.stage import StageContext  # noqa: E402
from pipeline.training import prune  # noqa: E402
from pipeline.training.checkpoint import load_model  # noqa: E402
from pipeline.training.data import load_datasets  # noqa: E402
from pipeline.training.models import SingleNet, stage_depths  # noqa: E402

NO_TARGET = ["compress.target_speedup=null", "compress.target_ms=null", "compress.target_runtime=null",
             "compress.target_precision=null", "compress.target_batch=null", "compress.plan=null"]


def compressed(config: Path, overrides: list[str], seed: int, kind: str, root: Path, extra: list[str],
               console: Console, copy_from: Path | None = None) -> RunDir:
    """The config's run for `seed` taken through compress under `root/<kind>-seed<seed>` (a copy of
    `copy_from` when given: its training is reused)."""
    cfg = load_config(config, [*overrides, "compress.enabled=true", f"seed={seed}", f"name={kind}-seed{seed}",
                               f"output_root={root}", *extra])
    run = RunDir(cfg.run_dir)
    if copy_from is not None and not run.root.exists():
        shutil.copytree(copy_from, run.root, ignore=shutil.ignore_patterns("compress", ".lock"))
    console.rule(f"{kind}, seed {seed}")
    with run.lock():
        run_stages(cfg, run, StageContext(cfg, run, torch.device("cpu"), console=console), until="compress")
    return run


def measured_speedup(run: RunDir, cfg: Config, rounds: int) -> float:
    """The FLOPs plan's speed-up over the kept branch, timed as the planner times (freshly built networks: a
    network's latency does not depend on its weights, and the guard's verdict does not change its speed),
    the median over `rounds` interleaved rounds."""
    s = run.stage("compress").summary
    branch, _ = load_model(run.output("strip", "model"))
    plan = prune.Plan(tuple(s["stage_widths"]), tuple(s["inner_widths"]), s["flops"], s["branch_flops"],
                      tuple(s.get("stage_blocks") or stage_depths(branch.spec)))
    images, _ = next(load_datasets(cfg.data).val.batches(1))
    with tempfile.TemporaryDirectory(prefix="lvf-") as tmp:
        calls = {name: plan_timing.build_call(net.eval(), tuple(images.shape[1:]), compress_plan.where(cfg),
                                              Path(tmp) / name)
                 for name, net in (("branch", SingleNet(branch.spec)), ("pruned", SingleNet(plan.spec(branch.spec))))}
        per_round = plan_timing.time_in_rounds(calls, rounds)
    return statistics.median(b / p for b, p in zip(per_round["branch"], per_round["pruned"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", type=Path)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--rounds", type=int, default=11, help="interleaved rounds timing the FLOPs plan")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    console = Console()
    base = load_config(args.config, args.overrides)
    root = base.output_root / f"{base.name}-lvf"
    records, target, pinned = [], None, None
    for seed in seeds:
        flops = compressed(args.config, args.overrides, seed, "flops", root, NO_TARGET, console)
        if target is None:
            cfg = load_config(flops.root / "config.yaml")
            target = round(measured_speedup(flops, cfg, args.rounds), 3)
            console.print(f"the FLOPs plan runs {target:.3f}x the kept branch here: the latency target")
        pin = [f"compress.plan={pinned}"] if pinned else []
        latency = compressed(args.config, args.overrides, seed, "latency", root,
                             [*NO_TARGET[1:-1], f"compress.target_speedup={max(target, 1.001)}", *pin], console,
                             copy_from=flops.root)
        pinned = pinned or latency.output("compress", "plan")
        for kind, run in (("flops", flops), ("latency", latency)):
            s = run.stage("compress").summary
            records.append({"kind": kind, "seed": seed, "test": s["test"]["pruned"], "val": s["val"]["pruned"],
                            "branch_test": s["test"]["branch"], "flops_ratio": s["flops_ratio"],
                            "deployed": s["deployed"], "plan": (s.get("latency_plan") or {}).get("plan"),
                            "stage_blocks": s.get("stage_blocks")})
    pair = significance.paired({r["seed"]: r["test"] for r in records if r["kind"] == "latency"},
                               {r["seed"]: r["test"] for r in records if r["kind"] == "flops"})
    pair.pop("verdict", None)  # worded for a compare against a network trained alone, not for two plans
    summary = {"cpu": cpu_model(), "target_speedup": target, "seeds": seeds, "runs": records, "paired": pair}
    write_json(root.parent / f"{base.name}-lvf.json", summary)
    for r in records:
        console.print(f"seed {r['seed']} {r['kind']:<8} test {r['test']:.2f}% (kept branch {r['branch_test']:.2f}%), "
                      f"{r['flops_ratio']:.3f}x FLOPs, blocks {r['stage_blocks']}, deployed {r['deployed']}")
    console.print(f"latency - FLOPs at {target:.3f}x: {json.dumps({k: pair[k] for k in ('diff', 'sd', 'p', 'n')})}")


if __name__ == "__main__":
    main()
