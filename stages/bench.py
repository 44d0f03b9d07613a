"""bench: measure every deployed form of the model on the same inputs, one row each, into bench.json.

Rows: the full ONE model as gated ensemble (ONE-E) and used for one branch, the stripped branch in
PyTorch eager, torch.compile (CUDA only), ONNX Runtime per exported precision and TensorRT. A row that
cannot run here is `skipped` with the reason; one whose file could not be made is `failed` in
"export", one whose file exists but did not run is `failed` in "bench" (Ultralytics keeps the two apart).
Every row: top-1 on the test set, agreement with the stripped branch in PyTorch, batch-1 latency
(p50/p90/p99), throughput at `bench.throughput_batch`, params, FLOPs, file size. Schema:
docs/bench_schema.md (`pipeline/deploy/benchfile.py`).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from rich.markup import escape
from torch import nn

from pipeline.deploy.benchfile import (
    BRANCH_ROW,
    ENSEMBLE_ROW,
    SCHEMA_VERSION,
    BenchFile,
    headline_text,
    reason_lines,
    rich_table,
)
from pipeline.deploy.onnx_io import exported_onnx
from pipeline.deploy.timing import count_flops, latency, throughput
from pipeline.device import onnx_providers
from pipeline.errors import StageSkipped
from pipeline.rundir import environment, write_json
from pipeline.stage import StageContext, StageResult
from pipeline.training.checkpoint import load_model
from pipeline.training.data import ImageSet, load_datasets
from pipeline.training.evaluate import evaluate
from pipeline.training.models import count_parameters

PRECISIONS = ("fp32", "fp16", "int8")


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
    for check in bench.checks:
        if not check.equal:
            ctx.console.print(f"[red]warning:[/red] {check.row} top-1 {check.bench} differs from the {check.train} "
                              f"training recorded for test {check.train_head}")
    return StageResult(outputs={"bench": path}, summary=bench.headline.model_dump(mode="json"))


@dataclasses.dataclass
class _Inputs:
    """The timing inputs, made once outside every timed region and shared by every row."""

    x1: torch.Tensor  # batch 1, on the device
    xb: torch.Tensor  # batch `throughput_batch`, on the device
    x1_np: np.ndarray
    xb_np: np.ndarray

    @classmethod
    def prepare(cls, test: ImageSet, batch: int, device: torch.device) -> _Inputs:
        x1 = test.normalise(test.images[:1]).contiguous()
        xb = test.normalise(test.images[torch.arange(batch) % len(test)]).contiguous()
        return cls(x1.to(device), xb.to(device), x1.numpy(), xb.numpy())


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


class _Bench:
    def __init__(self, ctx: StageContext, threads: int):
        self.ctx, self.cfg, self.device, self.threads = ctx, ctx.cfg.bench, ctx.device, threads
        self.eval_batch = ctx.cfg.train.eval_batch_size
        self.preds: dict[str, torch.Tensor] = {}
        full_test = load_datasets(ctx.cfg.data).test
        limit = self.cfg.test_limit
        self.test = full_test.subset(range(limit)) if limit and limit < len(full_test) else full_test
        self.full_test_set = len(self.test) == len(full_test)
        self.labels = torch.cat([labels for _, labels in self.test.batches(self.eval_batch)])
        self.inputs = _Inputs.prepare(self.test, self.cfg.throughput_batch, self.device)

    # --- the rows --------------------------------------------------------------------------------
    def measure(self) -> BenchFile:
        ctx = self.ctx
        full_path, branch_path = ctx.input("train", "model"), ctx.input("strip", "model")
        full, _ = load_model(full_path)
        stripped, payload = load_model(branch_path)
        self.branch = int(payload.get("branch", ctx.summary("select").get("branch", 0)))
        self.method = ctx.summary("train").get("method", ctx.cfg.model.method)
        full, stripped = full.to(self.device), stripped.to(self.device)
        branch_static = self._static(stripped, branch_path)
        rows = [*self._full_rows(full, full_path), self._branch_eager(stripped, branch_static),
                self._compiled(stripped, branch_static), *self._onnx_rows(branch_static),
                self._tensorrt(branch_static)]
        self._agreement(rows)
        self._vs_fp32(rows)
        return BenchFile.model_validate({
            "schema_version": SCHEMA_VERSION, "run": ctx.cfg.name, "method": self.method, "branch": self.branch,
            "device": str(self.device), "threads": self.threads, "test_images": len(self.test),
            "eval_batch_size": self.eval_batch, "settings": self.cfg.model_dump(mode="json"),
            "environment": environment(), "checks": self._checks(rows), "rows": rows,
            "headline": _headline(rows)})

    def _full_rows(self, full: nn.Module, path: Path) -> list[dict]:
        b = self.branch
        bases = [_base(ENSEMBLE_ROW, "ONE-E gated ensemble (full model)", "ensemble", "pytorch"),
                 _base("full_branch_eager", f"full model, branch {b} output", "full_branch", "pytorch")]
        if self.method == "vanilla":
            reason = "vanilla run: one plain network, no branches or gate to ensemble"
            return [{**base, "status": "skipped", "reason": reason} for base in bases]
        heads = {ENSEMBLE_ROW: lambda out: out.teacher, "full_branch_eager": lambda out: out.branches[:, b]}
        accuracy: dict[str, float] = {}

        def measure(name: str) -> dict:
            if not accuracy:
                acc = self._evaluate(full, heads)
                accuracy.update({ENSEMBLE_ROW: acc["teacher"], "full_branch_eager": acc["branches"][b]})
            return {"accuracy": accuracy[name], **self._static(full, path),
                    **self._torch_timing(lambda x: heads[name](full(x)))}

        return [self._guard(base, lambda base=base: measure(base["name"])) for base in bases]

    def _branch_eager(self, stripped: nn.Module, static: dict) -> dict:
        def measure() -> dict:
            acc = self._evaluate(stripped, {"branch_eager": lambda out: out})
            return {"accuracy": acc["branches"][0], **static, **self._torch_timing(stripped)}

        return self._guard(_base("branch_eager", "stripped branch", "branch", "pytorch"), measure)

    def _compiled(self, stripped: nn.Module, static: dict) -> dict:
        base = _base("branch_compile", "stripped branch, torch.compile (CUDA graphs)", "branch", "torch.compile")

        def measure() -> dict:
            if self.device.type != "cuda":
                raise StageSkipped(f"torch.compile with CUDA graphs is measured on CUDA only; this bench runs on "
                                   f"{self.device.type}")
            compiled = torch.compile(stripped, mode="reduce-overhead")  # `.spec` reads through to `stripped`
            acc = self._evaluate(compiled, {"branch_compile": lambda out: out})
            return {"accuracy": acc["branches"][0], **static, **self._torch_timing(compiled)}

        return self._guard(base, measure)

    def _onnx_rows(self, static: dict) -> list[dict]:
        entry = self.ctx.run.stage("export")
        requested = (entry or {}).get("config", {}).get("export", {}).get("precisions",
                                                                          self.ctx.cfg.export.precisions)
        rows = []
        for p in PRECISIONS:
            base = _base(f"branch_onnx_{p}", f"stripped branch, ONNX Runtime {p}", "branch", "onnxruntime", p)
            upstream = _upstream(entry, "export", f"onnx_{p}")
            if upstream is None:
                rows.append(self._guard(base, lambda p=p: self._onnx(f"branch_onnx_{p}",
                                                                     exported_onnx(self.ctx.run, f"onnx_{p}"), static)))
            elif entry and entry.get("status") == "done" and p not in requested:
                rows.append({**base, "status": "skipped", "reason": f"not exported: {p} is not in export.precisions"})
            else:
                rows.append({**base, **upstream})
        return rows

    def _tensorrt(self, static: dict) -> dict:
        entry = self.ctx.run.stage("engine") or {}
        precision = entry.get("config", {}).get("engine", {}).get("precision", self.ctx.cfg.engine.precision)
        base = _base("branch_tensorrt", f"stripped branch, TensorRT {precision}", "branch", "tensorrt", precision)
        upstream = _upstream(entry or None, "engine", "engine")
        return {**base, **upstream} if upstream else self._guard(base, lambda: self._run_tensorrt(static))

    # --- measuring ----------------------------------------------------------------------------------
    def _guard(self, base: dict, measure: Callable[[], dict]) -> dict:
        """One row: ok with its figures, skipped with the reason, or failed in the bench with the error."""
        try:
            return {**base, "status": "ok", **measure()}
        except StageSkipped as exc:
            return {**base, "status": "skipped", "reason": str(exc)}
        except Exception as exc:  # one row's failure is recorded in its row; the other rows still run
            reason = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
            self.ctx.console.print(f"[red]{base['name']} failed:[/red] {escape(reason)}")
            return {**base, "status": "failed", "failed_in": "bench", "reason": reason}

    def _evaluate(self, model: nn.Module, heads: dict[str, Callable]) -> dict:
        """`pipeline.training.evaluate` (what training records), keeping each head's predictions for agreement."""
        recorder = _Recorder(model, heads)
        acc = evaluate(recorder, self.test, self.device, self.eval_batch)
        self.preds.update({name: torch.cat(p) for name, p in recorder.preds.items()})
        return acc

    def _static(self, model: nn.Module, path: Path) -> dict:
        flops = count_flops(model, self.inputs.x1)
        return {"params": count_parameters(model), "flops": flops, "macs": flops // 2, "provider": "torch",
                "file": str(path.relative_to(self.ctx.run.root)), "file_bytes": path.stat().st_size}

    def _timing(self, one: Callable[[], Any], batch: Callable[[], Any] | None, cuda_events: bool) -> dict:
        c = self.cfg
        lat = latency(one, warmup=c.warmup, iterations=c.iterations, device=self.device, cuda_events=cuda_events)
        figures: dict[str, Any] = {"latency_ms": {  # ms to the ns
            "p50": round(lat.p50_ms, 6), "p90": round(lat.p90_ms, 6), "p99": round(lat.p99_ms, 6),
            "mean": round(lat.mean_ms, 6), "warmup": c.warmup, "iterations": lat.iterations}}
        if batch is not None:
            warm = min(c.warmup, 3)
            ips = throughput(batch, batch=c.throughput_batch, warmup=warm, iterations=c.throughput_iterations,
                             device=self.device)
            figures["throughput"] = {"images_per_s": round(ips, 1), "batch": c.throughput_batch, "warmup": warm,
                                     "iterations": c.throughput_iterations}
        return figures

    def _torch_timing(self, call: Callable[[torch.Tensor], Any]) -> dict:
        x1, xb = self.inputs.x1, self.inputs.xb
        with torch.inference_mode():
            return self._timing(lambda: call(x1), lambda: call(xb), cuda_events=True)

    def _onnx(self, name: str, path: Path, static: dict) -> dict:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = self.threads, 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.log_severity_level = 3
        session = ort.InferenceSession(str(path), options, providers=onnx_providers(self.device))
        inp, out = session.get_inputs()[0], session.get_outputs()[0].name
        dtype = np.float16 if inp.type == "tensor(float16)" else np.float32
        preds = [torch.from_numpy(np.asarray(session.run([out], {inp.name: images.numpy().astype(dtype)})[0])
                                  .argmax(1)) for images, _ in self.test.batches(self.eval_batch)]
        self.preds[name] = torch.cat(preds)
        provider = session.get_providers()[0]
        calls = [self._onnx_call(session, inp.name, out, x.astype(dtype), provider)
                 for x in (self.inputs.x1_np, self.inputs.xb_np)]
        return {**static, "accuracy": _accuracy(self.preds[name], self.labels), "provider": provider,
                "file": str(path.relative_to(self.ctx.run.root)), "file_bytes": path.stat().st_size,
                **self._timing(*calls, cuda_events=False)}

    @staticmethod
    def _onnx_call(session: Any, inp: str, out: str, x: np.ndarray, provider: str) -> Callable[[], Any]:
        if provider != "CUDAExecutionProvider":
            feed = {inp: x}
            return lambda: session.run([out], feed)
        import onnxruntime as ort  # on the GPU: input already on the device, like the torch rows

        binding, value = session.io_binding(), ort.OrtValue.ortvalue_from_numpy(x, "cuda", 0)
        binding.bind_ortvalue_input(inp, value)
        binding.bind_output(out, "cuda")
        return lambda value=value: session.run_with_iobinding(binding)  # `value` lives as long as the call

    def _run_tensorrt(self, static: dict) -> dict:
        if self.device.type != "cuda":
            raise StageSkipped(f"a TensorRT engine runs on a CUDA GPU only; this bench runs on {self.device.type}")
        from pipeline.deploy.tensorrt_runtime import TensorRTRunner

        path = self.ctx.input("engine", "engine")
        runner = TensorRTRunner(path)
        lo, hi = runner.min_batch, runner.max_batch
        preds = []
        for images, _ in self.test.batches(min(self.eval_batch, hi)):
            preds.append(runner(images.to(self.device)).argmax(1).cpu())
        self.preds["branch_tensorrt"] = torch.cat(preds)
        x1, xb = self.inputs.x1, self.inputs.xb
        fits = lo <= self.cfg.throughput_batch <= hi
        note = None if fits else f"throughput batch {self.cfg.throughput_batch} is outside the engine's {lo}..{hi}"
        return {**static, "accuracy": _accuracy(self.preds["branch_tensorrt"], self.labels), "provider": "tensorrt",
                "file": str(path.relative_to(self.ctx.run.root)), "file_bytes": path.stat().st_size, "note": note,
                **self._timing(lambda: runner(x1), (lambda: runner(xb)) if fits else None, cuda_events=True)}

    # --- derived figures ------------------------------------------------------------------------------
    def _agreement(self, rows: list[dict]) -> None:
        reference = self.preds.get("branch_eager")
        for row in rows:
            preds = self.preds.get(row["name"])
            if row["status"] == "ok" and reference is not None and preds is not None:
                row["agreement"] = float(100.0 * (preds == reference).double().mean())
                row["images"] = len(preds)

    @staticmethod
    def _vs_fp32(rows: list[dict]) -> None:
        fp32 = next(r for r in rows if r["name"] == BRANCH_ROW)
        for row in rows:
            if row["format"] == "onnxruntime" and row["precision"] != "fp32" and row["status"] == "ok":
                ok = fp32["status"] == "ok"
                row["vs_fp32"] = {"accuracy_delta": row["accuracy"] - fp32["accuracy"] if ok else None,
                                  "speedup_p50": round(fp32["latency_ms"]["p50"] / row["latency_ms"]["p50"], 4)
                                  if ok else None}

    def _checks(self, rows: list[dict]) -> list[dict]:
        """The bench's top-1 against what training recorded for the same model (full test set only)."""
        recorded = self.ctx.summary("train").get("test", {})
        if not self.full_test_set or not recorded:
            return []
        b = self.branch if self.method == "one" else 0
        wanted = {ENSEMBLE_ROW: "teacher", "full_branch_eager": f"branches[{b}]", "branch_eager": f"branches[{b}]"}
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


def _base(name: str, label: str, model: str, fmt: str, precision: str = "fp32") -> dict:
    return {"name": name, "label": label, "model": model, "format": fmt, "precision": precision}


def _upstream(entry: dict | None, stage: str, key: str) -> dict | None:
    """None when the stage finished with `key`; else the row's status and reason from the manifest."""
    if entry is None:
        return {"status": "skipped", "reason": f"the {stage} stage has not run"}
    if entry.get("status") == "skipped":
        return {"status": "skipped", "reason": f"{stage} skipped: {entry.get('reason', '')}"}
    if entry.get("status") != "done":
        return {"status": "failed", "failed_in": "export", "reason": f"{stage} failed: {entry.get('error', '')}"}
    if key not in entry.get("outputs", {}):
        return {"status": "failed", "failed_in": "export", "reason": f"{stage} recorded no {key}"}
    return None


def _accuracy(preds: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 in %, computed as `pipeline.training.evaluate` does."""
    return float(100.0 * (preds == labels).sum().double() / max(len(labels), 1))


def _headline(rows: list[dict]) -> dict:
    ens = next(r for r in rows if r["name"] == ENSEMBLE_ROW)
    br = next(r for r in rows if r["name"] == BRANCH_ROW)
    ok = ens["status"] == "ok" and br["status"] == "ok"

    def ratio(key: str) -> float | None:
        return round(ens[key] / br[key], 4) if ok and ens.get(key) and br.get(key) else None

    reasons = [f"{r['name']} {r['status']}: {r['reason']}" for r in (ens, br) if r["status"] != "ok"]
    return {"ensemble_row": ENSEMBLE_ROW, "branch_row": BRANCH_ROW,
            "speedup_p50": round(ens["latency_ms"]["p50"] / br["latency_ms"]["p50"], 4) if ok else None,
            "size_ratio": ratio("file_bytes"), "params_ratio": ratio("params"), "flops_ratio": ratio("flops"),
            "ensemble_accuracy": ens.get("accuracy"), "branch_accuracy": br.get("accuracy"),
            "accuracy_delta": br["accuracy"] - ens["accuracy"] if ok else None,
            "reason": "; ".join(reasons) or None}
