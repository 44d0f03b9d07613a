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
import re
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from rich.console import Console
from rich.markup import escape
from scipy import stats

from pipeline.config import Config, field_path, load_config
from pipeline.deploy.onnx_io import exported_onnx, onnx_key
from pipeline.deploy.runtime import ort_session, run_logits
from pipeline.deploy.timing import count_flops, in_turns, latency
from pipeline.device import onnx_providers, resolve_device
from pipeline.errors import ArtifactError, UsageError
from pipeline.rundir import RunDir, cpu_model, write_json
from pipeline.runner import run_stages
from pipeline.stage import StageContext
from pipeline.training import checkpoint
from pipeline.training.models import count_parameters

COMPARE_VERSION = 2  # 2: gains carry the paired test (the verdict's) and Welch's
SIGNIFICANCE = 0.05  # two-sided p below this: the difference is called real
UNTIL = "export"  # each run goes this far: accuracies (train, select) and the deployable fp32 ONNX (export)
# only the network's own cost is compared; `--compress` prunes copies of these runs (pipeline/compare_compress.py)
RUN_OVERRIDES = ("export.precisions=[fp32]", "export.ensemble=false", "compress.enabled=false")
LATENCY_ROUNDS, LATENCY_CALLS = 7, 200


@dataclasses.dataclass(frozen=True)
class Method:
    """One side of the comparison: vanilla, ONE, or ONE with a variant's field changed."""

    key: str  # folder-name prefix: vanilla, one, one-model.branches-4
    label: str  # ONE, model.branches=4
    short: str  # branches=4
    overrides: tuple[str, ...]

    @property
    def is_one(self) -> bool:
        return self.key != "vanilla"


@dataclasses.dataclass(frozen=True)
class CompareResult:
    root: Path
    markdown: Path
    summary: Path
    plot: Path
    verdict: str
    curves: Path


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UsageError(f"--seeds {text!r}: expected seeds separated by commas, for example --seeds 0,1,2") from None
    if not seeds or any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise UsageError(f"--seeds {text!r}: give distinct seeds >= 0, for example --seeds 0,1,2")
    return seeds


def methods(variants: Sequence[str]) -> list[Method]:
    """vanilla, ONE, then one ONE method per variant `FIELD=VALUE` (FIELD may be a field's own name when
    only one section has it: `branches=4` is `model.branches=4`)."""
    found = [Method("vanilla", "vanilla", "vanilla", ("model.method=vanilla",)),
             Method("one", "ONE", "ONE", ("model.method=one",))]
    for variant in variants:
        name, sep, value = variant.partition("=")
        if not sep or not name.strip() or not value.strip():
            raise UsageError(f"--variant {variant!r}: expected FIELD=VALUE, for example --variant model.branches=4")
        path = field_path(name.strip())
        if path in ("seed", "name", "output_root", "model.method"):
            raise UsageError(f"--variant {variant!r}: compare sets {path} itself; vary a recipe field instead "
                             "(model.branches, loss.temperature, ...)")
        setting = f"{path}={value.strip()}"
        key = "one-" + re.sub(r"[^A-Za-z0-9_.-]", "-", setting)
        if any(m.key == key for m in found):
            raise UsageError(f"--variant {variant!r} is given twice")
        found.append(Method(key, f"ONE, {setting}", f"{path.rsplit('.', 1)[-1]}={value.strip()}",
                            ("model.method=one", setting)))
    return found


def run_config(config: Path, overrides: Sequence[str], root: Path, method: Method, seed: int) -> Config:
    return load_config(config, [*overrides, *method.overrides, *RUN_OVERRIDES, f"seed={seed}",
                                f"name={method.key}-seed{seed}", f"output_root={root}"])


def compare(config: Path, overrides: Sequence[str], seeds: Sequence[int], variants: Sequence[str],
            console: Console) -> CompareResult:
    from pipeline.compare_report import write_curves, write_markdown, write_plot  # matplotlib only when writing

    base = load_config(config, overrides)
    root = base.output_root / f"{base.name}-compare"
    compared = methods(variants)
    plan = [(method, seed) for seed in seeds for method in compared]  # seed by seed: pairs finish early
    configs = [run_config(config, overrides, root, method, seed) for method, seed in plan]  # all errors first
    device = resolve_device(base.train.device)
    started = time.perf_counter()
    for number, ((method, seed), cfg) in enumerate(zip(plan, configs), start=1):
        console.rule(f"[bold]compare: run {number}/{len(plan)}[/bold]: {escape(method.label)}, seed {seed}")
        line, label = _progress(configs, number, time.perf_counter() - started)
        console.print(escape(line), highlight=False)
        run = RunDir(cfg.run_dir)
        ctx = StageContext(cfg, run, device, console=console, label=label)
        with run.lock():
            run_stages(cfg, run, ctx, until=UNTIL)
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


def _time_left(configs: Sequence[Config]) -> float | None:
    """Seconds the unfinished runs among `configs` will take, from the recorded wall time of finished runs
    of the same method (else of any method); None before any run has finished."""
    def wall(cfg: Config) -> float | None:
        recorded = RunDir(cfg.run_dir).manifest()["stages"]  # one read for the four stages
        entries = [recorded.get(stage) or {} for stage in ("train", "select", "strip", UNTIL)]
        if not all(e.get("status") == "done" for e in entries):
            return None
        return sum(e.get("wall_s", 0.0) for e in entries)

    def method(cfg: Config) -> str:
        return cfg.name.rsplit("-seed", 1)[0]

    walls = {cfg.name: wall(cfg) for cfg in configs}
    finished = [(method(cfg), walls[cfg.name]) for cfg in configs if walls[cfg.name] is not None]
    left = 0.0
    for cfg in configs:
        if walls[cfg.name] is None:
            known = [w for m, w in finished if m == method(cfg)] or [w for _, w in finished]
            if not known:
                return None
            left += statistics.mean(known)
    return left


def _progress(configs: Sequence[Config], number: int, elapsed: float) -> tuple[str, str]:
    """(the line before run `number`, the label its progress bar carries): runs done, time so far, time left."""
    total, left, after = len(configs), _time_left(configs), _time_left(configs[number:])
    line = f"{number - 1} of {total} runs done, {elapsed / 60:.1f} min so far; " + (
        f"about {left / 60:.1f} min left" if left is not None else "time left known after the first run")
    label = f"run {number}/{total}" + (f" (then ~{after / 60:.0f} min)" if after else "") + " | "
    return line, label


def collect(run: RunDir, method: Method, seed: int) -> dict[str, Any]:
    """One run's figures, as its manifest recorded them."""
    train, select = run.stage("train") or {}, run.stage("select") or {}
    try:
        test, val = train["summary"]["test"], train["summary"]["val"]
        kept = int(select["summary"]["branch"])
        record = {"method": method.key, "seed": seed, "run": str(run.root), "kept_branch": kept,
                  "val_kept": val["branches"][kept], "kept": test["branches"][kept],
                  "best": max(test["branches"]), "worst": min(test["branches"]), "branches": test["branches"],
                  "train_s": train["wall_s"], "images_per_s": train["summary"]["images_per_s"],
                  "train_params": train["summary"]["params"]}
    except (KeyError, TypeError, IndexError):
        raise ArtifactError(f"{run.root}/manifest.json lacks train or select figures; rerun compare (or delete "
                            "that run directory)") from None
    if method.is_one:
        record["teacher"] = test["teacher"]
    return record


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


def gain(treated: dict[str, float], control: dict[str, float]) -> dict[str, Any]:
    """The kept branch's gain over vanilla (test top-1 per seed, keyed by seed): the paired test decides
    when at least 2 seeds pair up, else Welch's. The chosen test's figures at the top, both beside."""
    both = {"paired": paired(treated, control), "welch": welch(list(treated.values()), list(control.values()))}
    chosen = both["paired"] if both["paired"]["n"] >= 2 else both["welch"]
    return {**{k: chosen[k] for k in ("test", "diff", "p", "ci95", "verdict")}, **both}


def paired(treated: dict[str, float], control: dict[str, float]) -> dict[str, Any]:
    """Per-seed differences (treated - control, in points) over the seeds both sides ran, their mean and
    spread, the paired t-test's two-sided p-value (scipy's ttest_rel) and its 95% confidence interval."""
    seeds = [s for s in treated if s in control]
    diffs = [treated[s] - control[s] for s in seeds]
    figures: dict[str, Any] = {"test": "paired t-test", "per_seed": dict(zip(seeds, diffs)),
                               "diff": statistics.mean(diffs) if diffs else None,
                               "sd": statistics.stdev(diffs) if len(diffs) > 1 else None,
                               "p": None, "ci95": None, "n": len(seeds)}
    if len(seeds) < 2:
        return {**figures, "verdict": f"{len(seeds)} seed(s) run by both methods: no paired figure; run both "
                                      "with the same seeds, at least 2 (--seeds 0,1,2)"}
    if figures["sd"] == 0:  # ttest_rel would call an identical difference on every seed infinitely certain
        return {**figures, "verdict": f"{figures['diff']:+.2f} points on every seed: no significance figure"}
    return _judged(figures, stats.ttest_rel([treated[s] for s in seeds], [control[s] for s in seeds]),
                   f"{len(seeds)} paired seeds")


def welch(treated: Sequence[float], control: Sequence[float]) -> dict[str, Any]:
    """Mean difference (treated - control, in points), Welch's t-test p-value (two-sided) and its 95%
    confidence interval, and the verdict in words."""
    diff = statistics.mean(treated) - statistics.mean(control)
    figures: dict[str, Any] = {"test": "Welch's t-test", "diff": diff, "p": None, "ci95": None,
                               "n": [len(treated), len(control)]}
    if min(len(treated), len(control)) < 2:
        return {**figures, "verdict": f"{diff:+.2f} points with one seed per method: no significance figure; run "
                                      "with at least 2 seeds (--seeds 0,1,2)"}
    return _judged(figures, stats.ttest_ind(treated, control, equal_var=False),
                   f"{len(treated)} vs {len(control)} seeds")


def _judged(figures: dict[str, Any], test: Any, counted: str) -> dict[str, Any]:
    """A scipy t-test's result as p, 95% CI and the verdict in words."""
    diff, p = figures["diff"], float(test.pvalue)
    if not np.isfinite(p):  # no spread at all on either side: a t-test has nothing to measure
        return {**figures, "verdict": f"{diff:+.2f} points, with no spread between seeds: no significance figure"}
    ci = test.confidence_interval(0.95)
    figures = {**figures, "p": p, "ci95": [float(ci.low), float(ci.high)]}
    where = f"{diff:+.2f} points (95% CI {ci.low:+.2f} to {ci.high:+.2f}; {figures['test']} p = {p:.3g}, {counted})"
    if p >= SIGNIFICANCE:
        return {**figures, "verdict": f"not distinguishable at this budget: {where}"}
    return {**figures, "verdict": f"{'better' if diff > 0 else 'worse'} than the network trained alone: {where}"}


def deploy_cost(configs: Sequence[Config], compared: Sequence[Method], device: torch.device,
                threads: int | None) -> list[dict[str, Any]]:
    """Params, FLOPs and ONNX Runtime batch-1 latency of each method's deployable network (the first seed's):
    the kept ONE branch is the vanilla network's architecture, so they should match. Latencies are taken
    in turns, round after round, and the median round is reported."""
    models, calls = [], []
    for cfg in configs:
        run = RunDir(cfg.run_dir)
        network, payload = checkpoint.load_model(run.output("strip", "model"))
        example = torch.zeros(1, *payload["data"]["input_shape"])
        onnx_path = exported_onnx(run, onnx_key("branch", "fp32"))
        session = ort_session(onnx_path, onnx_providers(device), threads)
        image = example.numpy()
        models.append({"params": count_parameters(network), "flops": count_flops(network.eval(), example),
                       "onnx": str(onnx_path)})
        calls.append(lambda session=session, image=image: run_logits(session, image))
    p50s: list[list[float]] = [[] for _ in calls]

    def turn(index: int) -> Callable[[int], None]:
        return lambda _: p50s[index].append(latency(calls[index], warmup=10, iterations=LATENCY_CALLS,
                                                    device=torch.device("cpu")).p50_ms)

    failed = in_turns({str(index): turn(index) for index in range(len(calls))}, LATENCY_ROUNDS)
    if failed:
        raise next(iter(failed.values()))
    return [{"method": m.key, "label": m.label, **model, "p50_ms": statistics.median(p), "rounds": LATENCY_ROUNDS,
             "calls_per_round": LATENCY_CALLS} for m, model, p in zip(compared, models, p50s)]
