"""The bench's row makers, one per runtime of the table (pipeline/deploy/forms.py `RUNTIMES`): each makes
its rows, in the table's order of precisions and models, as a `Row` when it did not run (with the reason)
or a `Measured` (stages/bench_measure.py). A runtime of the table with a `session` and no maker of its
own here is run the way ONNX Runtime is (`file_rows`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch

from pipeline.deploy import openvino_runtime
from pipeline.deploy.benchfile import Row
from pipeline.deploy.forms import RUNTIMES, Runtime, engine_key, onnx_key, row_name, triton_model_name
from pipeline.deploy.guard import guard
from pipeline.deploy.onnx_io import exported_onnx
from pipeline.deploy.runtime import top1_accuracy
from pipeline.errors import StageSkipped
from pipeline.training.checkpoint import load_model
from pipeline.training.models import EnsembleNet
from stages.bench_measure import Bench, Form, Measured
from stages.bench_served import served_row

Made = list[Row | Measured]


def models_of(bench: Bench, rt: Runtime) -> list[str]:
    """The models `rt` runs in this bench: its table row's, the pruned one only with compress.enabled."""
    return [m for m in rt.models if m != "pruned" or bench.ctx.cfg.compress.enabled]


def pytorch_rows(bench: Bench, rt: Runtime) -> Made:
    """ONE-E and the full model's kept-branch output (one evaluation of the full model), the stripped branch,
    and with compress.enabled the pruned branch."""
    b, full, stripped = bench.branch, bench.full, bench.stripped
    heads = {row_name("ensemble", "pytorch"): lambda out: out.teacher,
             row_name("full_branch", "pytorch"): lambda out: out.branches[:, b]}
    accuracy: dict[str, float] = {}

    def full_row(model: str) -> dict:
        name = row_name(model, "pytorch")
        if not accuracy:
            acc = bench.evaluate(full, heads)
            accuracy.update(zip(heads, (acc["teacher"], acc["branches"][b])))
        bench.time_later(name, lambda x: heads[name](full(x)), bench.inputs, cuda_events=True)
        return {"accuracy": accuracy[name], **bench.static["ensemble"]}

    made: Made = [bench.guard(Form(m, "pytorch"), lambda m=m: full_row(m), bench.vanilla_reason())
                  for m in ("ensemble", "full_branch")]
    made.append(bench.guard(Form("branch", "pytorch"),
                            lambda: bench.eager(row_name("branch", "pytorch"), stripped, bench.static["branch"])))
    if "pruned" in models_of(bench, rt):
        made.append(_pruned_eager_row(bench))
    return made


def _pruned_eager_row(bench: Bench) -> Row | Measured:
    """The compress stage's network in PyTorch, when its guard deployed one (else why not)."""
    form = Form("pruned", "pytorch")
    not_run = bench_not_run(bench, "pruned", "compress", "model", "fp32")
    if not_run:
        return form.row(**not_run)
    path = bench.ctx.input("compress", "model")
    pruned = load_model(path)[0].to(bench.device)
    bench.static["pruned"] = bench.static_figures(pruned, path)
    return bench.guard(form, lambda: bench.eager(form.name, pruned, bench.static["pruned"]))


def compiled_rows(bench: Bench, rt: Runtime) -> Made:
    def measure(model: str) -> dict:
        if bench.device.type != "cuda":
            raise StageSkipped(f"torch.compile with CUDA graphs is measured on CUDA only; this bench runs on "
                               f"{bench.device.type}")
        net = EnsembleNet(bench.full) if model == "ensemble" else bench.stripped
        compiled = torch.compile(net, mode="reduce-overhead")  # `.spec` reads through to `net`
        return bench.eager(row_name(model, "torch.compile"), compiled, bench.static[model])

    return [bench.guard(Form(m, "torch.compile"), lambda m=m: measure(m),
                        bench.vanilla_reason() if m == "ensemble" else None)
            for m in models_of(bench, rt)]


def file_rows(bench: Bench, rt: Runtime) -> Made:
    """An exported ONNX file per precision and model, opened with the runtime's `session`."""
    return [file_row(bench, Form(m, rt.key, p)) for p in rt.precisions for m in models_of(bench, rt)]


def file_row(bench: Bench, form: Form) -> Row | Measured:
    rt = RUNTIMES[form.runtime]
    source = rt.source(form.precision)
    not_run = bench_not_run(bench, form.model, rt.made_by, onnx_key(form.model, source), source)
    if not_run:
        return form.row(**not_run)
    path = exported_onnx(bench.ctx, onnx_key(form.model, source))
    return bench.guard(form, lambda: bench.session_figures(form.name, rt.session(path, bench.threads, bench.device),
                                                           path, bench.static[form.model]),
                       **_triton(bench, form))


def _triton(bench: Bench, form: Form) -> dict:
    """The Triton model that serves this form, where the triton stage writes one."""
    name = triton_model_name(bench.triton_base, form.model, form.runtime, form.precision) if bench.triton_base \
        else None
    return {"triton_model": name} if name else {}


def openvino_rows(bench: Bench, rt: Runtime) -> Made:
    return [openvino_row(bench, m, p) for p in rt.precisions for m in models_of(bench, rt)]


def openvino_row(bench: Bench, model: str, precision: str) -> Row | Measured:
    """An exported ONNX file compiled by OpenVINO for the CPU (pipeline/deploy/openvino_runtime.py)."""
    form = Form(model, "openvino", precision)
    if not bench.cfg.openvino:
        return form.row(status="skipped", reason="bench.openvino is false in the config")
    source = RUNTIMES["openvino"].source(precision)
    not_run = bench_not_run(bench, model, "export", onnx_key(model, source), source)
    if not_run:
        return form.row(**not_run)
    path = exported_onnx(bench.ctx, onnx_key(model, source))
    return bench.guard(form, lambda: _openvino(bench, form, path), **_triton(bench, form))


def _openvino(bench: Bench, form: Form, path: Path) -> dict:
    compiled = openvino_runtime.compile_onnx(path, form.precision, bench.threads)
    # the export accuracy guard, for OpenVINO too: bf16 is a precision of its own, and a runtime that
    # computes a file's graph wrongly (seen: ONE-E's int8_cpu file at chance level, docs/DEPLOY.md) is not
    # deployed
    val = bench.datasets.val
    accuracy = top1_accuracy(openvino_runtime.run_split(compiled, val.batches(bench.eval_batch)), val.labels.numpy())
    fp32 = bench.ctx.summary("export")[form.model]["fp32"]["val_accuracy"]
    verdict = guard(f"OpenVINO {form.precision}", accuracy, fp32, len(val), bench.ctx.cfg.export.max_accuracy_drop)
    if not verdict.passed:
        raise StageSkipped(f"not deployed: {verdict.reason}")
    logits = openvino_runtime.run_split(compiled, bench.test.batches(bench.eval_batch))
    bench.preds[form.name] = torch.from_numpy(logits.argmax(1))
    bench.time_later(form.name, compiled, {b: x.cpu().numpy() for b, x in bench.inputs.items()}, cuda_events=False)
    return {**bench.static[form.model], "accuracy": top1_accuracy(logits, bench.labels.numpy()), "provider": "CPU",
            "file": str(path.relative_to(bench.ctx.run.root)), "file_bytes": path.stat().st_size,
            "properties": compiled.properties}


def tensorrt_rows(bench: Bench, rt: Runtime) -> Made:
    return [tensorrt_row(bench, m) for m in models_of(bench, rt)]


def tensorrt_row(bench: Bench, model: str) -> Row | Measured:
    entry = bench.ctx.record("engine")
    info = (entry.summary.get(model) if entry else None) or {}
    precision = info.get("precision") or "fp32"
    form = Form(model, "tensorrt", precision)
    key = engine_key(model)
    not_run = bench_not_run(bench, model, "engine", key, precision)
    if not_run:
        return form.row(**not_run)
    return bench.guard(form, lambda: _run_tensorrt(bench, form.name, bench.ctx.input("engine", key),
                                                   bench.static[model]), **_triton(bench, form))


def _run_tensorrt(bench: Bench, name: str, path: Path, static: dict) -> dict:
    if bench.device.type != "cuda":
        raise StageSkipped(f"a TensorRT engine runs on a CUDA GPU only; this bench runs on {bench.device.type}")
    from pipeline.deploy.tensorrt_runtime import TensorRTRunner

    runner = TensorRTRunner(path)
    lo, hi = runner.min_batch, runner.max_batch
    batches = bench.test.batches(min(bench.eval_batch, hi))
    bench.preds[name] = torch.cat([runner(images.to(bench.device)).argmax(1).cpu() for images, _ in batches])
    fits = [b for b in bench.cfg.batch_sizes if lo <= b <= hi]
    outside = sorted(set(bench.cfg.batch_sizes) - set(fits))
    note = f"batch sizes {outside} are outside the engine's profile {lo}..{hi}" if outside else None
    bench.time_later(name, runner, bench.inputs, cuda_events=True, batches=fits)
    return {**static, "accuracy": float(100.0 * (bench.preds[name] == bench.labels).double().mean()),
            "provider": "tensorrt", "file": str(path.relative_to(bench.ctx.run.root)),
            "file_bytes": path.stat().st_size, "note": note}


def triton_rows(bench: Bench, rt: Runtime) -> Made:
    """The fp32 ONNX model through a real Triton server (stages/bench_served.py)."""
    def measure() -> dict:
        images = np.concatenate([x.numpy() for x, _ in bench.test.batches(bench.eval_batch)])
        figures = served_row(bench.ctx, images, bench.labels.numpy())
        bench.preds[row_name("branch", "triton")] = torch.from_numpy(figures.pop("predictions"))
        return {**bench.static["branch"], **figures}

    return [bench.guard(Form("branch", "triton"), measure)]


# the runtimes with a maker of their own; the others of the table are run from their `session`
MAKERS: dict[str, Callable[[Bench, Runtime], Made]] = {"pytorch": pytorch_rows, "torch.compile": compiled_rows,
                                                      "openvino": openvino_rows, "tensorrt": tensorrt_rows,
                                                      "triton": triton_rows}


def runtime_rows(bench: Bench) -> Made:
    """Every runtime's rows, in the table's order."""
    return [row for key, rt in RUNTIMES.items() for row in MAKERS.get(key, file_rows)(bench, rt)]


# --- what did not run, and why ------------------------------------------------------------------
def bench_not_run(bench: Bench, model: str, stage: str, key: str, precision: str) -> dict | None:
    """None when `stage` recorded `key`; else the row's status and reason."""
    ctx = bench.ctx
    if model == "ensemble" and bench.method == "vanilla":
        return {"status": "skipped", "reason": bench.vanilla_reason()}
    compress = ctx.record("compress")
    if model == "pruned" and not (compress and compress.summary.get("deployed")):
        why = (compress and (compress.summary.get("reason") or compress.reason)) or "compress has not run"
        return {"status": "skipped", "reason": f"no pruned network: {why}"}
    entry = ctx.record(stage)
    if entry is None:
        return {"status": "skipped", "reason": f"the {stage} stage has not run"}
    if entry.status == "skipped":
        return {"status": "skipped", "reason": f"{stage} skipped: {entry.reason}"}
    if not entry.done:
        return {"status": "failed", "failed_in": "export", "reason": f"{stage} failed: {entry.error}"}
    if key in entry.outputs:
        return None
    figures = (entry.summary.get(model) or {}).get(precision) or {}
    if stage == "export" and figures.get("passed") is False:
        return {"status": "skipped", "reason": f"not deployed: {figures.get('reason', 'rejected')}"}
    if stage == "export" and precision not in entry.config.get("export", {}).get("precisions", []):
        return {"status": "skipped", "reason": f"not exported: {precision} is not in export.precisions"}
    if model == "ensemble" and not entry.config.get(stage, {}).get("ensemble", True):
        return {"status": "skipped", "reason": f"{stage}.ensemble is false in the config"}
    return {"status": "failed", "failed_in": "export", "reason": f"{stage} recorded no {key}"}
