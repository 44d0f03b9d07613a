"""The runs a compare is made of: its methods (vanilla, ONE, ONE with one field changed), one config per
method and seed, each its own run directory under `<output_root>/<name>-compare/` taken through the runner
(so an interrupted compare resumes and a finished run is reused), and the figures each run recorded."""

from __future__ import annotations

import dataclasses
import re
import statistics
import time
from pathlib import Path
from typing import Any, Sequence

import torch
from rich.console import Console
from rich.markup import escape

from pipeline.config import Config, field_path, load_config
from pipeline.errors import ArtifactError, UsageError
from pipeline.rundir import RunDir
from pipeline.runner import run_stages
from pipeline.stage import StageContext

UNTIL = "export"  # each run goes this far: accuracies (train, select) and the deployable fp32 ONNX (export)
# only the network's own cost is compared; `--compress` prunes copies of these runs (pipeline/compare/compress.py)
RUN_OVERRIDES = ("export.precisions=[fp32]", "export.ensemble=false", "compress.enabled=false")


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


def run_config(config: Path, overrides: Sequence[str], root: Path, method: Method, seed: int, *,
               name: str | None = None, extra: Sequence[str] = ()) -> Config:
    """The config of one compare run: the user's, then the method's fields, compare's own and `extra`;
    its run directory is `<root>/<name>` (default `<method>-seed<seed>`: earlier compares resume from it)."""
    return load_config(config, [*overrides, *method.overrides, *RUN_OVERRIDES, f"seed={seed}",
                                f"name={name or f'{method.key}-seed{seed}'}", f"output_root={root}", *extra])


def run_all(plan: Sequence[tuple[Method, int]], configs: Sequence[Config], device: torch.device,
            console: Console) -> None:
    """Take every run through the runner (up to UNTIL), saying before each how far the compare is."""
    started = time.perf_counter()
    for number, ((method, seed), cfg) in enumerate(zip(plan, configs), start=1):
        console.rule(f"[bold]compare: run {number}/{len(plan)}[/bold]: {escape(method.label)}, seed {seed}")
        line, label = _progress(configs, number, time.perf_counter() - started)
        console.print(escape(line), highlight=False)
        run = RunDir(cfg.run_dir)
        ctx = StageContext(cfg, run, device, console=console, label=label)
        with run.lock():
            run_stages(cfg, run, ctx, until=UNTIL)


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
    train, select = run.stage("train"), run.stage("select")
    try:
        if train is None or select is None:
            raise KeyError("train" if train is None else "select")
        test, val = train.summary["test"], train.summary["val"]
        kept = int(select.summary["branch"])
        record = {"method": method.key, "seed": seed, "run": str(run.root), "kept_branch": kept,
                  "val_kept": val["branches"][kept], "kept": test["branches"][kept],
                  "best": max(test["branches"]), "worst": min(test["branches"]), "branches": test["branches"],
                  "train_s": train.wall_s, "images_per_s": train.summary["images_per_s"],
                  "train_params": train.summary["params"]}
    except (KeyError, TypeError, IndexError):
        raise ArtifactError(f"{run.root}/manifest.json lacks train or select figures; rerun compare (or delete "
                            "that run directory)") from None
    if method.is_one:
        record["teacher"] = test["teacher"]
    return record
