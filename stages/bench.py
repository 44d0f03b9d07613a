"""bench: measure every deployed form of the kept branch and its ONE-E twin on the same inputs, one row
each, into bench.json, so that every comparison changes one thing at a time.

Rows, in order: PyTorch eager (ONE-E, the full model used for the kept branch, the stripped branch, and
with compress.enabled the pruned branch), torch.compile (CUDA only), ONNX Runtime per exported precision
(ONE-E, branch, pruned), OpenVINO on the CPU (fp32, bf16, int8_cpu; ONE-E, branch, pruned), TensorRT
(ONE-E, branch, pruned), and with `bench.baseline` the same network trained alone (PyTorch eager and ONNX
Runtime fp32). A row that cannot run here is `skipped` with the reason (a model the export accuracy guard
rejected among them); one whose file could not be made is `failed` in "export", one whose file exists but
did not run is `failed` in "bench" (Ultralytics keeps the two apart). Every row: top-1 on the test set,
agreement with the same model in PyTorch eager, batch-1 latency (p50/p90/p99), throughput at each of
`bench.batch_sizes`, params, FLOPs, file size. Accuracy is measured row by row; timing afterwards, in
`bench.rounds` rounds in which every row takes its turn (pipeline/deploy/bench_rounds.py; the Triton row,
timed through its server, apart).
The headline splits the gain into its parts (strip, runtime, precision) and picks what to ship. Schema:
docs/bench_schema.md (`pipeline/deploy/benchfile.py`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx
import torch
from rich.markup import escape
from torch import nn

from pipeline.config import Config
from pipeline.deploy import bench_rounds, openvino_runtime, target_check
from pipeline.deploy.benchfile import (
    FORMAT_NAMES,
    SCHEMA_VERSION,
    BenchFile,
    Row,
    gain,
    headline_figures,
    headline_text,
    reason_lines,
    rich_table,
    row_name,
)
from pipeline.deploy.guard import guard
from pipeline.deploy.onnx_io import PRECISIONS, export_onnx, exported_onnx, onnx_key, triton_model_name
from pipeline.deploy.runtime import input_dtype, ort_session, run_split, top1_accuracy
from pipeline.deploy.served import served_row
from pipeline.deploy.timing import count_flops
from pipeline.device import onnx_providers
from pipeline.errors import StageSkipped, UsageError
from pipeline.rundir import RunDir, atomic_path, cpu_model, environment, write_json
from pipeline.stage import StageContext, StageResult
from pipeline.training.checkpoint import load_model
from pipeline.training.data import load_datasets
from pipeline.training.evaluate import evaluate
from pipeline.training.models import EnsembleNet, count_parameters

LABELS = {"ensemble": "ONE-E gated ensemble (full model)", "full_branch": "full model, kept branch's output",
          "branch": "stripped branch", "pruned": "pruned branch (compress)",
          "baseline": "baseline: the same network trained alone"}


def run(ctx: StageContext) -> StageResult:
    if not ctx.cfg.bench.enabled:
        raise StageSkipped("bench.enabled is false in the config")
    threads = ctx.cfg.bench.threads or os.cpu_count() or 1
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)  # the same thread count for every row, ORT included
    try:
        bench = _Bench(ctx, threads).measure()
    finally:
        torch.set_num_threads(previous)
    path = ctx.stage_dir("bench") / "bench.json"
    write_json(path, bench.model_dump(mode="json"))
    ctx.console.print(rich_table(bench))
    for line in reason_lines(bench):
        ctx.console.print(f"  [dim]{escape(line)}[/dim]", highlight=False)
    ctx.console.print(escape(headline_text(bench)))
    if bench.headline.target:
        ctx.console.print(escape(target_check.sentence(bench.headline.target)), highlight=False)
    ship = bench.headline.ship
    if ship and ship.row:
        ctx.console.print(escape(f"What to ship here: {ship.row} ({ship.file}, Triton model {ship.triton_model}): "
                                 f"{ship.reason}"))
    for check in bench.checks:
        if not check.equal:
            ctx.console.print(f"[red]warning:[/red] {check.row} top-1 {check.bench} differs from the {check.train} "
                              f"training recorded for test {check.train_head}")
    outputs = {"bench": path}
    if (ctx.run.path("bench") / BASELINE_ONNX).exists():
        outputs["baseline_onnx"] = ctx.run.path("bench") / BASELINE_ONNX
    return StageResult(outputs=outputs, summary=bench.headline.model_dump(mode="json"))


BASELINE_ONNX = "baseline_fp32.onnx"


def baseline_model(cfg: Config) -> tuple[nn.Module, Path] | None:
    """The network of the `bench.baseline` run: a vanilla run's trained model, or another ONE run's
    stripped branch. A user's mistake (no such run, another dataset) is a UsageError naming the fix."""
    if cfg.bench.baseline is None:
        return None
    root = Path(cfg.bench.baseline).expanduser()
    run = RunDir(root)
    entry = run.stage("train") if run.manifest_path.exists() else None
    if entry is None or entry.get("status") != "done":
        raise UsageError(f"bench.baseline {root} holds no finished training run; train one first, e.g. one-pipeline "
                         "run CONFIG --until train --set model.method=vanilla --set name=NAME")
    theirs, ours = entry.get("config", {}).get("data", {}), cfg.model_dump(mode="json")["data"]
    if any(theirs.get(k) != ours[k] for k in ("dataset", "root", "val_size", "synthetic_size")):
        raise UsageError(f"bench.baseline {root} was trained on other data ({theirs.get('dataset')}, val_size "
                         f"{theirs.get('val_size')}); compare runs of the same data split")
    method = entry.get("summary", {}).get("method", entry.get("config", {}).get("model", {}).get("method"))
    stage = "train" if method == "vanilla" else "strip"
    path = run.output(stage, "model")
    model, _ = load_model(path)
    return model, path


class _Bench:
    def __init__(self, ctx: StageContext, threads: int):
        self.ctx, self.cfg, self.device, self.threads = ctx, ctx.cfg.bench, ctx.device, threads
        self.eval_batch = ctx.cfg.train.eval_batch_size
        self.preds: dict[str, torch.Tensor] = {}
        self.timers: dict[str, bench_rounds.RowTimer] = {}
        # images decoded in this process (image folders): a DataLoader worker forked once OpenVINO has run
        # here crashed with a segmentation fault (its thread pools do not survive a fork)
        self.datasets = load_datasets(ctx.cfg.data.model_copy(update={"num_workers": 0}))
        full_test = self.datasets.test
        limit = self.cfg.test_limit
        self.test = full_test.subset(range(limit)) if limit and limit < len(full_test) else full_test
        self.full_test_set = len(self.test) == len(full_test)
        self.labels = self.test.labels
        self.inputs = bench_rounds.timing_inputs(self.test, self.cfg.batch_sizes, self.device)
        self.triton_base = ctx.cfg.triton.model_name or ctx.cfg.name if ctx.cfg.triton.enabled else None

    # --- the rows --------------------------------------------------------------------------------
    def measure(self) -> BenchFile:
        ctx = self.ctx
        baseline = baseline_model(ctx.cfg)  # a mistake here is the user's: before any measuring
        full_path, branch_path = ctx.input("train", "model"), ctx.input("strip", "model")
        full, _ = load_model(full_path)
        stripped, payload = load_model(branch_path)
        self.branch = int(payload.get("branch", ctx.summary("select").get("branch", 0)))
        self.method = ctx.summary("train").get("method", ctx.cfg.model.method)
        full, stripped = full.to(self.device), stripped.to(self.device)
        self.static = {"branch": self._static(stripped, branch_path)}
        if self.method == "one":
            self.static["ensemble"] = self._static(EnsembleNet(full), full_path)
        models = ("ensemble", "branch", "pruned") if ctx.cfg.compress.enabled else ("ensemble", "branch")
        rows = [*self._eager_rows(full, stripped), *([self._pruned_eager_row()] if "pruned" in models else []),
                *self._compiled_rows(full, stripped)]
        for precision in PRECISIONS:
            rows += [self._onnx_row(m, precision) for m in models]
        for precision in openvino_runtime.FORMS:
            rows += [self._openvino_row(m, precision) for m in models]
        rows += [self._tensorrt_row(m) for m in models] + [self._served_row()]
        if baseline is not None:
            rows += self._baseline_rows(*baseline)
        bench_rounds.time_rows(list(self.timers.values()), rows, self.cfg, self.device, self.ctx.console)
        self._derived(rows)
        bench = {"schema_version": SCHEMA_VERSION, "run": ctx.cfg.name, "method": self.method, "branch": self.branch,
                 "device": str(self.device), "threads": self.threads, "test_images": len(self.test),
                 "eval_batch_size": self.eval_batch, "batch_sizes": self.cfg.batch_sizes,
                 "settings": self.cfg.model_dump(mode="json"), "environment": environment(),
                 "baseline": str(self.cfg.baseline) if self.cfg.baseline else None, "checks": self._checks(rows),
                 "rows": rows}
        parsed = [Row.model_validate(r) for r in rows]
        headline = headline_figures(parsed, self.cfg.ship_max_accuracy_drop, self.cfg.ship_for)
        headline["target"] = target_check.headline_target(parsed, ctx.run.stage("compress"), cpu_model(), self.threads)
        return BenchFile.model_validate({**bench, "headline": headline})

    def _eager_rows(self, full: nn.Module, stripped: nn.Module) -> list[dict]:
        b = self.branch
        heads = {row_name("ensemble", "pytorch"): lambda out: out.teacher,
                 row_name("full_branch", "pytorch"): lambda out: out.branches[:, b]}
        accuracy: dict[str, float] = {}

        def full_row(model: str) -> dict:
            name = row_name(model, "pytorch")
            if not accuracy:
                acc = self._evaluate(full, heads)
                accuracy.update(zip(heads, (acc["teacher"], acc["branches"][b])))
            self._time_later(name, lambda x: heads[name](full(x)), self.inputs, cuda_events=True)
            return {"accuracy": accuracy[name], **self.static["ensemble"]}

        def branch_row() -> dict:
            name = row_name("branch", "pytorch")
            acc = self._evaluate(stripped, {name: lambda out: out})
            self._time_later(name, stripped, self.inputs, cuda_events=True)
            return {"accuracy": acc["branches"][0], **self.static["branch"]}

        rows = [self._guard(_base(m, "pytorch"), lambda m=m: full_row(m), self._vanilla_reason())
                for m in ("ensemble", "full_branch")]
        return rows + [self._guard(_base("branch", "pytorch"), branch_row)]

    def _pruned_eager_row(self) -> dict:
        """The compress stage's network in PyTorch, when its guard deployed one (else why not)."""
        base = _base("pruned", "pytorch")
        not_run = self._not_run("pruned", "compress", "model", "fp32")
        if not_run:
            return {**base, **not_run}
        path = self.ctx.input("compress", "model")
        pruned = load_model(path)[0].to(self.device)
        self.static["pruned"] = self._static(pruned, path)

        def measure() -> dict:
            acc = self._evaluate(pruned, {base["name"]: lambda out: out})
            self._time_later(base["name"], pruned, self.inputs, cuda_events=True)
            return {"accuracy": acc["branches"][0], **self.static["pruned"]}

        return self._guard(base, measure)

    def _compiled_rows(self, full: nn.Module, stripped: nn.Module) -> list[dict]:
        def measure(model: str) -> dict:
            if self.device.type != "cuda":
                raise StageSkipped(f"torch.compile with CUDA graphs is measured on CUDA only; this bench runs on "
                                   f"{self.device.type}")
            net = EnsembleNet(full) if model == "ensemble" else stripped
            compiled = torch.compile(net, mode="reduce-overhead")
            name = row_name(model, "torch.compile")
            acc = self._evaluate(compiled, {name: lambda out: out})  # `.spec` reads through to `net`
            self._time_later(name, compiled, self.inputs, cuda_events=True)
            return {"accuracy": acc["branches"][0], **self.static[model]}

        return [self._guard(_base(m, "torch.compile"), lambda m=m: measure(m),
                            self._vanilla_reason() if m == "ensemble" else None) for m in ("ensemble", "branch")]

    def _onnx_row(self, model: str, precision: str) -> dict:
        base = _base(model, "onnxruntime", precision)
        not_run = self._not_run(model, "export", onnx_key(model, precision), precision)
        if not_run:
            return {**base, **not_run}
        path = exported_onnx(self.ctx.run, onnx_key(model, precision))
        row = self._guard(base, lambda: self._onnx(base["name"], path, self.static[model]))
        if self._triton_base(model):
            row["triton_model"] = triton_model_name(self._triton_base(model), precision)
        return row

    def _triton_base(self, model: str) -> str | None:
        """The triton stage's model-name stem for the branch or its pruned form; None for other models."""
        if model not in ("branch", "pruned") or not self.triton_base:
            return None
        return self.triton_base + ("_pruned" if model == "pruned" else "")

    def _openvino_row(self, model: str, precision: str) -> dict:
        """An exported ONNX file compiled by OpenVINO for the CPU (pipeline/deploy/openvino_runtime.py)."""
        base = _base(model, "openvino", precision)
        if not self.cfg.openvino:
            return {**base, "status": "skipped", "reason": "bench.openvino is false in the config"}
        source = openvino_runtime.FORMS[precision][0]
        not_run = self._not_run(model, "export", onnx_key(model, source), source)
        if not_run:
            return {**base, **not_run}
        path = exported_onnx(self.ctx.run, onnx_key(model, source))
        row = self._guard(base, lambda: self._openvino(base["name"], model, precision, path))
        if self._triton_base(model) and precision == "int8_cpu":
            row["triton_model"] = triton_model_name(self._triton_base(model), precision, openvino=True)
        return row

    def _openvino(self, name: str, model: str, precision: str, path: Path) -> dict:
        compiled = openvino_runtime.compile_onnx(path, precision, self.threads)
        # the export accuracy guard, for OpenVINO too: bf16 is a precision of its own, and a runtime that
        # computes a file's graph wrongly (seen: ONE-E's int8_cpu file at chance level, docs/DEPLOY.md) is not
        # deployed
        val = self.datasets.val
        accuracy = top1_accuracy(openvino_runtime.run_split(compiled, val.batches(self.eval_batch)),
                                 val.labels.numpy())
        fp32 = self.ctx.summary("export")[model]["fp32"]["val_accuracy"]
        verdict = guard(f"OpenVINO {precision}", accuracy, fp32, len(val), self.ctx.cfg.export.max_accuracy_drop)
        if not verdict.passed:
            raise StageSkipped(f"not deployed: {verdict.reason}")
        logits = openvino_runtime.run_split(compiled, self.test.batches(self.eval_batch))
        self.preds[name] = torch.from_numpy(logits.argmax(1))
        self._time_later(name, compiled, {b: x.cpu().numpy() for b, x in self.inputs.items()}, cuda_events=False)
        return {**self.static[model], "accuracy": top1_accuracy(logits, self.labels.numpy()), "provider": "CPU",
                "file": str(path.relative_to(self.ctx.run.root)), "file_bytes": path.stat().st_size,
                "properties": compiled.properties}

    def _tensorrt_row(self, model: str) -> dict:
        entry = self.ctx.run.stage("engine") or {}
        info = (entry.get("summary") or {}).get(model) or {}
        precision = info.get("precision") or "fp32"
        base = _base(model, "tensorrt", precision)
        key = "engine" if model == "branch" else f"{model}_engine"
        not_run = self._not_run(model, "engine", key, precision)
        if not_run:
            return {**base, **not_run}
        row = self._guard(base, lambda: self._run_tensorrt(base["name"], self.ctx.input("engine", key),
                                                           self.static[model]))
        if model == "branch" and self.triton_base:
            row["triton_model"] = triton_model_name(self.triton_base, precision, tensorrt=True)
        return row

    def _served_row(self) -> dict:
        """The fp32 ONNX model through a real Triton server (pipeline/deploy/served.py)."""
        def measure() -> dict:
            images = np.concatenate([x.numpy() for x, _ in self.test.batches(self.eval_batch)])
            figures = served_row(self.ctx, images, self.labels.numpy())
            self.preds[row_name("branch", "triton")] = torch.from_numpy(figures.pop("predictions"))
            return {**self.static["branch"], **figures}

        return self._guard(_base("branch", "triton"), measure)

    def _baseline_rows(self, model: nn.Module, path: Path) -> list[dict]:
        model = model.to(self.device)
        static = self._static(model, path)

        def eager() -> dict:
            name = row_name("baseline", "pytorch")
            acc = self._evaluate(model, {name: lambda out: out})
            self._time_later(name, model, self.inputs, cuda_events=True)
            return {"accuracy": acc["branches"][0], **static}

        def onnx_row() -> dict:
            onnx_path = self.ctx.stage_dir("bench") / BASELINE_ONNX
            images = self.test.inputs(range(2))
            proto = export_onnx(model.cpu(), images, self.ctx.cfg.export.opset)
            model.to(self.device)
            with atomic_path(onnx_path) as tmp:
                onnx.save(proto, str(tmp))
            return self._onnx(row_name("baseline", "onnxruntime"), onnx_path, static)

        return [self._guard(_base("baseline", "pytorch"), eager),
                self._guard(_base("baseline", "onnxruntime"), onnx_row)]

    # --- what did not run, and why ------------------------------------------------------------------
    def _vanilla_reason(self) -> str | None:
        return "vanilla run: one plain network, no branches or gate to ensemble" if self.method == "vanilla" else None

    def _not_run(self, model: str, stage: str, key: str, precision: str) -> dict | None:
        """None when `stage` recorded `key`; else the row's status and reason."""
        if model == "ensemble" and self.method == "vanilla":
            return {"status": "skipped", "reason": self._vanilla_reason()}
        compress = self.ctx.run.stage("compress") or {}
        if model == "pruned" and not (compress.get("summary") or {}).get("deployed"):
            why = (compress.get("summary") or {}).get("reason") or compress.get("reason") or "compress has not run"
            return {"status": "skipped", "reason": f"no pruned network: {why}"}
        entry = self.ctx.run.stage(stage)
        if entry is None:
            return {"status": "skipped", "reason": f"the {stage} stage has not run"}
        if entry.get("status") == "skipped":
            return {"status": "skipped", "reason": f"{stage} skipped: {entry.get('reason', '')}"}
        if entry.get("status") != "done":
            return {"status": "failed", "failed_in": "export", "reason": f"{stage} failed: {entry.get('error', '')}"}
        if key in entry.get("outputs", {}):
            return None
        summary = entry.get("summary") or {}
        figures = (summary.get(model) or {}).get(precision) or {}
        if stage == "export" and figures.get("passed") is False:
            return {"status": "skipped", "reason": f"not deployed: {figures.get('reason', 'rejected')}"}
        if stage == "export" and precision not in entry.get("config", {}).get("export", {}).get("precisions", []):
            return {"status": "skipped", "reason": f"not exported: {precision} is not in export.precisions"}
        if model == "ensemble" and not entry.get("config", {}).get(stage, {}).get("ensemble", True):
            return {"status": "skipped", "reason": f"{stage}.ensemble is false in the config"}
        return {"status": "failed", "failed_in": "export", "reason": f"{stage} recorded no {key}"}

    # --- measuring ----------------------------------------------------------------------------------
    def _guard(self, base: dict, measure: Callable[[], dict], skip: str | None = None) -> dict:
        """One row: ok with its figures, skipped with the reason, or failed in the bench with the error."""
        if skip:
            return {**base, "status": "skipped", "reason": skip}
        try:
            return {**base, "status": "ok", **measure()}
        except StageSkipped as exc:
            return {**base, "status": "skipped", "reason": str(exc)}
        except Exception as exc:  # one row's failure is recorded in its row; the other rows still run
            reason = bench_rounds.failure(exc)
            self.ctx.console.print(f"[red]{base['name']} failed:[/red] {escape(reason)}")
            return {**base, "status": "failed", "failed_in": "bench", "reason": reason}

    def _evaluate(self, model: nn.Module, heads: dict[str, Callable]) -> dict:
        """`pipeline.training.evaluate` (what training records), keeping each head's predictions."""
        recorder = _Recorder(model, heads)
        acc = evaluate(recorder, self.test, self.device, self.eval_batch)
        self.preds.update({name: torch.cat(p) for name, p in recorder.preds.items()})
        return acc

    def _static(self, model: nn.Module, path: Path) -> dict:
        flops = count_flops(model, self.inputs[1])
        root = self.ctx.run.root
        return {"params": count_parameters(model), "flops": flops, "macs": flops // 2, "provider": "torch",
                "file": str(path.relative_to(root) if path.is_relative_to(root) else path),  # a baseline's: as found
                "file_bytes": path.stat().st_size}

    def _time_later(self, name: str, call: Callable[[Any], Any], inputs: dict[int, Any], cuda_events: bool,
                    batches: list[int] | None = None) -> None:
        """Row `name` takes part in the timing rounds: batch-1 latency and throughput at each of `batches`
        (default all), filled into the row by `bench_rounds.time_rows`. `cuda_events`: torch and TensorRT work."""
        self.timers[name] = bench_rounds.RowTimer(name, call, inputs, cuda_events, batches or self.cfg.batch_sizes)

    def _onnx(self, name: str, path: Path, static: dict) -> dict:
        session = ort_session(path, onnx_providers(self.device), self.threads)
        logits = run_split(session, self.test, self.eval_batch)
        self.preds[name] = torch.from_numpy(logits.argmax(1))
        provider = session.get_providers()[0]
        call = bench_rounds.onnx_call(session, provider)
        dtype = input_dtype(session)
        self._time_later(name, call, {b: x.cpu().numpy().astype(dtype) for b, x in self.inputs.items()},
                         cuda_events=False)
        return {**static, "accuracy": top1_accuracy(logits, self.labels.numpy()), "provider": provider,
                "file": str(path.relative_to(self.ctx.run.root)), "file_bytes": path.stat().st_size}

    def _run_tensorrt(self, name: str, path: Path, static: dict) -> dict:
        if self.device.type != "cuda":
            raise StageSkipped(f"a TensorRT engine runs on a CUDA GPU only; this bench runs on {self.device.type}")
        from pipeline.deploy.tensorrt_runtime import TensorRTRunner

        runner = TensorRTRunner(path)
        lo, hi = runner.min_batch, runner.max_batch
        batches = self.test.batches(min(self.eval_batch, hi))
        self.preds[name] = torch.cat([runner(images.to(self.device)).argmax(1).cpu() for images, _ in batches])
        fits = [b for b in self.cfg.batch_sizes if lo <= b <= hi]
        outside = sorted(set(self.cfg.batch_sizes) - set(fits))
        note = f"batch sizes {outside} are outside the engine's profile {lo}..{hi}" if outside else None
        self._time_later(name, runner, self.inputs, cuda_events=True, batches=fits)
        return {**static, "accuracy": float(100.0 * (self.preds[name] == self.labels).double().mean()),
                "provider": "tensorrt",
                "file": str(path.relative_to(self.ctx.run.root)), "file_bytes": path.stat().st_size, "note": note}

    # --- derived figures ------------------------------------------------------------------------------
    def _derived(self, rows: list[dict]) -> None:
        """Agreement with the same model in PyTorch eager; lower precisions against fp32 in the same runtime."""
        for row in rows:
            if row["status"] != "ok":
                continue
            eager = row_name("branch" if row["model"] == "full_branch" else row["model"], "pytorch")
            reference, preds = self.preds.get(eager), self.preds.get(row["name"])
            if reference is not None and preds is not None:
                row["agreement"] = float(100.0 * (preds == reference).double().mean())
                row["images"] = len(preds)
        parsed = {r["name"]: Row.model_validate(r) for r in rows}
        for row in rows:  # a TensorRT engine has one precision: it has no fp32 twin to compare with
            if row["format"] in ("onnxruntime", "openvino") and row["precision"] != "fp32" and row["status"] == "ok":
                found = gain(parsed[row["name"]], parsed.get(row_name(row["model"], row["format"], "fp32")))
                if found:
                    row["vs_fp32"] = {"row": found.versus, "accuracy_delta": found.accuracy_delta,
                                      "speedup_p50": found.speedup_p50, "throughput_ratio": found.throughput_ratio}

    def _checks(self, rows: list[dict]) -> list[dict]:
        """The bench's top-1 against what training recorded for the same model (full test set only)."""
        recorded = self.ctx.summary("train").get("test", {})
        if not self.full_test_set or not recorded:
            return []
        b = self.branch if self.method == "one" else 0
        wanted = {"one_e_eager": "teacher", "full_branch_eager": f"branches[{b}]", "branch_eager": f"branches[{b}]"}
        checks = []
        for row in rows:
            head = wanted.get(row["name"])
            if head is None or row["status"] != "ok":
                continue
            branches = recorded.get("branches", [])
            train = recorded.get("teacher") if head == "teacher" else branches[b] if b < len(branches) else None
            if train is not None:
                checks.append({"row": row["name"], "train_head": head, "bench": row["accuracy"], "train": train,
                               "equal": row["accuracy"] == train})
        return checks


class _Recorder(nn.Module):
    """Passes a model's output through unchanged to `evaluate`, keeping each head's top-1 predictions."""

    def __init__(self, net: nn.Module, heads: dict[str, Callable[[Any], torch.Tensor]]):
        super().__init__()
        self.net, self.spec, self.heads = net, net.spec, heads
        self.preds: dict[str, list[torch.Tensor]] = {name: [] for name in heads}

    def forward(self, x: torch.Tensor) -> Any:
        out = self.net(x)
        for name, head in self.heads.items():
            self.preds[name].append(head(out).argmax(1).cpu())
        return out


def _base(model: str, fmt: str, precision: str = "fp32") -> dict:
    label = LABELS[model] if fmt == "pytorch" else f"{LABELS[model].split(' (')[0]}, {FORMAT_NAMES[fmt]}" + (
        f" {precision}" if fmt in ("onnxruntime", "tensorrt", "triton", "openvino") else "")
    return {"name": row_name(model, fmt, precision), "label": label, "model": model, "format": fmt,
            "precision": precision}
