"""A run's latency target against what its deployed files achieve: the pruned form and the kept branch
(export/), in the target's runtime, precision and batch, timed in interleaved rounds like the planner
(each round: every form in turn; a round's speed-up is the branch's p50 / the pruned form's), the median
over rounds, the whole repeated N times. Prints the target, the planner's figure (compress/plan.json), the
bench's (bench/bench.json `headline.target`) and this measurement, and how far apart they are. Run it with
nothing else running: on a shared CPU one sub-millisecond timing moves by up to 2x.

    python benchmarks/latency_target.py artifacts/edge                      # 7 rounds x 3 repeats
    python benchmarks/latency_target.py artifacts/edge --rounds 11 --repeats 5 --iterations 200
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone without installing

from pipeline.deploy.target_timing import form_call, measure_pair  # noqa: E402
from pipeline.rundir import RunDir, cpu_model  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--repeats", type=int, default=3, help="N: the figures are the median of N measurements")
    parser.add_argument("--iterations", type=int, default=100, help="timed calls per form per round")
    parser.add_argument("--threads", type=int, help="default: the threads the plan was measured at")
    args = parser.parse_args()
    run = RunDir(args.run_dir)
    record = run.stage("compress")
    summary = record.summary if record else {}
    plan = summary.get("latency_plan")
    if not plan or not (plan.get("target") or {}):
        raise SystemExit(f"{args.run_dir}: its compress stage planned no latency target")
    if not summary.get("deployed"):
        raise SystemExit(f"{args.run_dir}: no pruned network was deployed ({summary.get('reason')})")
    runtime, precision, batch = plan["runtime"], plan["precision"], plan.get("batch") or 1
    threads = args.threads or plan.get("threads") or 1
    calls = {m: form_call(run, m, runtime, precision, threads, batch) for m in ("branch", "pruned")}
    found = [measure_pair(calls, args.rounds, args.iterations) for _ in range(args.repeats)]
    speedup = statistics.median(f["speedup"] for f in found)
    ms = statistics.median(f["ms"] for f in found)
    target = plan["target"]
    met = speedup >= target["speedup"] if target.get("speedup") else ms <= target["ms"]
    aim = f"{target['speedup']:g}x" if target.get("speedup") else f"{target['ms']:g} ms"
    print(f"{cpu_model()}, {threads} thread(s); {runtime} {precision} at batch {batch}; {args.rounds} interleaved "
          f"rounds of {args.iterations} calls, median of {args.repeats}")
    print(f"target:   {aim} ({'met' if met else 'MISSED'})")
    print(f"measured: {speedup:.3f}x ({ms:.4f} vs {statistics.median(f['branch_ms'] for f in found):.4f} ms), "
          f"repeats {', '.join(format(f['speedup'], '.3f') + 'x' for f in found)}")
    planned = plan.get("speedup")
    if planned:
        print(f"planner:  {planned:.3f}x ({plan.get('p50_ms') or 0:.4f} ms) on {plan.get('cpu')}, "
              f"{plan.get('threads')} thread(s), plan {plan.get('plan')}: measured / planned - 1 = "
              f"{speedup / planned - 1:+.1%}")
    bench_path = run.root / "bench" / "bench.json"
    bench = json.loads(bench_path.read_text()).get("headline", {}).get("target") if bench_path.exists() else None
    if bench and bench.get("achieved_speedup"):
        print(f"bench:    {bench['achieved_speedup']:.3f}x ({bench['achieved_ms']:.4f} ms) on {bench['benched_on']}: "
              f"measured / bench - 1 = {speedup / bench['achieved_speedup'] - 1:+.1%}")
    if plan.get("cpu") and plan["cpu"] != cpu_model():
        print(f"note: the plan was measured on {plan['cpu']}, this host is {cpu_model()}")


if __name__ == "__main__":
    main()
