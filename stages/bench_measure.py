"""The bench's measuring side (stages/bench.py): the test images and timing inputs, the predictions each row
made, and how one row is measured. A row maker (stages/bench_rows.py) turns each form of the table
(pipeline/deploy/forms.py) into a `Row` when it did not run, or into a `Measured` whose accuracy is known and
whose model call waits for the timing rounds; `finish` then makes each of those a `Row`, once, with its
latency, throughput, agreement and fp32 comparison. No row is changed after it is made.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable

import torch
from rich.markup import escape
from torch import nn

from pipeline.deploy import bench_rounds
from pipeline.deploy.benchfile import Row, gain
from pipeline.deploy.forms import RUNTIMES, row_label, row_name
from pipeline.deploy.runtime import FileSession, top1_accuracy
from pipeline.deploy.timing import count_flops
from pipeline.errors import StageSkipped
from pipeline.stage import StageContext
from pipeline.training.data import load_datasets
from pipeline.training.evaluate import evaluate
from pipeline.training.models import count_parameters


@dataclasses.dataclass(frozen=True)
class Form:
    """One row's place in the table: which model, in which runtime, at which precision."""

    model: str
    runtime: str
    precision: str = "fp32"

    @property
    def name(self) -> str:
        return row_name(self.model, self.runtime, self.precision)

    def fields(self) -> dict[str, Any]:
        return {"name": self.name, "label": row_label(self.model, self.runtime, self.precision), "model": self.model,
                "format": self.runtime, "precision": self.precision}

    def row(self, **fields: Any) -> Row:
        return Row.model_validate({**self.fields(), **fields})


@dataclasses.dataclass(frozen=True)
class Measured:
    """A row that ran: its figures so far; its latency and throughput come from the timing rounds."""

    form: Form
    figures: dict[str, Any]

    @property
    def name(self) -> str:
        return self.form.name


class Bench:
    """What every row of one bench shares: the data, the models' static figures, the predictions."""

    def __init__(self, ctx: StageContext, threads: int):
        self.ctx, self.cfg, self.device, self.threads = ctx, ctx.cfg.bench, ctx.device, threads
        self.eval_batch = ctx.cfg.train.eval_batch_size
        self.preds: dict[str, torch.Tensor] = {}
        self.timers: dict[str, bench_rounds.RowTimer] = {}
        self.static: dict[str, dict] = {}
        self.branch, self.method = 0, ctx.cfg.model.method
        self.full: nn.Module | None = None  # the trained full model and the stripped branch, on the device
        self.stripped: nn.Module | None = None
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

    def vanilla_reason(self) -> str | None:
        return "vanilla run: one plain network, no branches or gate to ensemble" if self.method == "vanilla" else None

    def guard(self, form: Form, measure: Callable[[], dict], skip: str | None = None,
              **extra: Any) -> Row | Measured:
        """One row: measured with its figures, skipped with the reason, or failed in the bench with the error.
        `extra`: fields of the row whatever happens (its Triton model)."""
        if skip:
            return form.row(status="skipped", reason=skip, **extra)
        try:
            return Measured(form, {**extra, **measure()})
        except StageSkipped as exc:
            return form.row(status="skipped", reason=str(exc), **extra)
        except Exception as exc:  # one row's failure is recorded in its row; the other rows still run
            reason = bench_rounds.failure(exc)
            self.ctx.console.print(f"[red]{form.name} failed:[/red] {escape(reason)}")
            return form.row(status="failed", failed_in="bench", reason=reason, **extra)

    def evaluate(self, model: nn.Module, heads: dict[str, Callable]) -> dict:
        """`pipeline.training.evaluate` (what training records), keeping each head's predictions."""
        recorder = _Recorder(model, heads)
        acc = evaluate(recorder, self.test, self.device, self.eval_batch)
        self.preds.update({name: torch.cat(p) for name, p in recorder.preds.items()})
        return acc

    def eager(self, name: str, model: nn.Module, static: dict) -> dict:
        """A single-output network in PyTorch (eager or compiled): its top-1, timed later."""
        acc = self.evaluate(model, {name: lambda out: out})
        self.time_later(name, model, self.inputs, cuda_events=True)
        return {"accuracy": acc["branches"][0], **static}

    def static_figures(self, model: nn.Module, path: Path) -> dict:
        flops = count_flops(model, self.inputs[1])
        return {"params": count_parameters(model), "flops": flops, "macs": flops // 2, "provider": "torch",
                "file": self.file(path), "file_bytes": path.stat().st_size}

    def file(self, path: Path) -> str:
        """A file inside the run relative to it; a baseline's as found."""
        root = self.ctx.run.root
        return str(path.relative_to(root) if path.is_relative_to(root) else path)

    def time_later(self, name: str, call: Callable[[Any], Any], inputs: dict[int, Any], cuda_events: bool,
                   batches: list[int] | None = None) -> None:
        """Row `name` takes part in the timing rounds: batch-1 latency and throughput at each of `batches`
        (default all), measured by `bench_rounds.time_rows`. `cuda_events`: torch and TensorRT work."""
        self.timers[name] = bench_rounds.RowTimer(name, call, inputs, cuda_events, batches or self.cfg.batch_sizes)

    def session_figures(self, name: str, session: FileSession, path: Path, static: dict) -> dict:
        """A file opened in a runtime (ONNX Runtime, or any runtime run the same way): top-1, timed later."""
        logits = session.logits(self.test, self.eval_batch)
        self.preds[name] = torch.from_numpy(logits.argmax(1))
        self.time_later(name, session.call, {b: x.cpu().numpy().astype(session.dtype) for b, x in self.inputs.items()},
                        cuda_events=False)
        return {**static, "accuracy": top1_accuracy(logits, self.labels.numpy()), "provider": session.provider,
                "file": str(path.relative_to(self.ctx.run.root)), "file_bytes": path.stat().st_size}

    def finish(self, made: list[Row | Measured], timings: dict[str, dict | str]) -> list[Row]:
        """Every row, made once: the measured ones with their timing, agreement with the same model in
        PyTorch eager, and lower precisions against fp32 in the same runtime."""
        rows: list[Row] = []
        by_name: dict[str, Row] = {}
        for item in made:
            row = item if isinstance(item, Row) else self._finished(item, timings.get(item.name), by_name)
            rows.append(row)
            by_name[row.name] = row
        return rows

    def _finished(self, item: Measured, timing: dict | str | None, done: dict[str, Row]) -> Row:
        if isinstance(timing, str):
            return item.form.row(**item.figures, status="failed", failed_in="bench", reason=timing)
        fields = {**item.figures, **(timing or {}), "status": "ok"}
        eager = row_name("branch" if item.form.model == "full_branch" else item.form.model, "pytorch")
        reference, preds = self.preds.get(eager), self.preds.get(item.name)
        if reference is not None and preds is not None:
            fields.update(agreement=float(100.0 * (preds == reference).double().mean()), images=len(preds))
        row = item.form.row(**fields)
        precisions = RUNTIMES[item.form.runtime].precisions
        if item.form.precision != "fp32" and "fp32" in precisions and len(precisions) > 1:
            # a TensorRT engine has one precision: it has no fp32 twin to compare with
            found = gain(row, done.get(row_name(item.form.model, item.form.runtime, "fp32")))
            if found:
                row = item.form.row(**fields, vs_fp32={"row": found.versus, "accuracy_delta": found.accuracy_delta,
                                                       "speedup_p50": found.speedup_p50,
                                                       "throughput_ratio": found.throughput_ratio})
        return row


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
