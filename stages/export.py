"""Export the stripped branch (and the full model's ONE-E output) to ONNX, convert it to lower
precisions, and judge every file with ONNX Runtime on real validation images.

    proto = export_onnx(single_net, example_batch, opset=20)   # input "input" (N dynamic), output "logits"
    figures = check_onnx(path, images, reference_logits, ["CPUExecutionProvider"], atol=1e-4, rtol=1e-4,
                         same_top1=True)

Checks, per subject (the branch; ONE-E when export.ensemble and the run is ONE; the pruned branch when the
compress stage deployed one, its int8 recipes searched anew):
- fp32: onnx.checker, names/types, per image max abs logit diff vs PyTorch <= export.atol + export.rtol x
  that image's largest |logit| (rounding grows with the logits' scale: see runtime.py `parity`), identical
  top-1 (a failure stops the stage: the graph does not compute what the network does);
- fp16: the same bound with export.fp16_atol and export.fp16_rtol, then the accuracy guard;
- int8 (TensorRT form) and int8_cpu (ONNX Runtime x86 form): Q/DQ structure, finite logits, then the
  accuracy guard, over a search of calibration recipes (pipeline/deploy/quantize.py `recipes`): the first
  within the bound is kept; every recipe tried is recorded. ONE-E's int8 twin uses the recipe the branch
  kept. Calibration uses TRAINING images only.
The accuracy guard: top-1 over the whole validation split against the fp32 ONNX on the same split; a
model that loses more than export.max_accuracy_drop points is not written (not deployed), and the
summary says why. Every file carries metadata_props (see `onnx_metadata`) and is written atomically.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx
import torch
from rich.markup import escape
from torch import nn

from pipeline.deploy.forms import EXPORTED as SUBJECTS
from pipeline.deploy.forms import ONNX_PRECISIONS as PRECISIONS
from pipeline.deploy.forms import onnx_file_name, onnx_key
from pipeline.deploy.guard import Verdict, guard
from pipeline.deploy.onnx_io import INPUT, OUTPUT, export_onnx, opset_of
from pipeline.deploy.quantize import (
    INT8_TARGETS,
    Recipe,
    calibration_images,
    nonzero_zero_points,
    quantize_int8,
    recipes,
    to_fp16,
    unquantized_nodes,
)
from pipeline.deploy.runtime import ort_session, parity, run_split, top1_accuracy
from pipeline.device import onnx_providers
from pipeline.errors import ArtifactError, PipelineError
from pipeline.rundir import atomic_path, sha256_file
from pipeline.stage import StageContext, StageResult
from pipeline.training import checkpoint
from pipeline.training.data import ImageSet, load_datasets
from pipeline.training.models import EnsembleNet

HINT = ("the exported graph does not compute what PyTorch does: try another export.opset (or raise export.rtol if "
        "the difference is only rounding)")


class Rejected(Exception):
    """A converted model that the accuracy guard does not deploy; the message says why."""

    def __init__(self, reason: str, trials: list[dict[str, Any]] = ()):
        super().__init__(reason)
        self.trials = list(trials)


def onnx_metadata(payload: dict[str, Any], checkpoint_sha256: str) -> dict[str, str]:
    """What a consumer needs to feed the model and trace it back (values are strings; lists are JSON)."""
    data = payload["data"]
    return {"class_names": json.dumps(list(data["class_names"])), "input_shape": json.dumps(list(data["input_shape"])),
            "mean": json.dumps(list(data["mean"])), "std": json.dumps(list(data["std"])),
            "dataset": str(data["dataset"]), "arch": str(payload["spec"]["arch"]),
            "branch": str(payload["branch"]), "source_sha256": str(payload["source_sha256"]),
            "checkpoint_sha256": checkpoint_sha256, "producer": "one-pipeline"}


def set_metadata(proto: onnx.ModelProto, metadata: dict[str, str]) -> None:
    kept = [(p.key, p.value) for p in proto.metadata_props if p.key not in metadata]
    del proto.metadata_props[:]
    for key, value in [*kept, *metadata.items()]:
        proto.metadata_props.add(key=key, value=value)


def describe_io(proto: onnx.ModelProto) -> dict[str, list[dict[str, Any]]]:
    """{"inputs": [{name, shape, dtype}], "outputs": [...]}; a dynamic dimension shows its name."""
    def one(value: onnx.ValueInfoProto) -> dict[str, Any]:
        tensor = value.type.tensor_type
        shape = [d.dim_param or d.dim_value for d in tensor.shape.dim]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).name
        return {"name": value.name, "shape": shape, "dtype": dtype}
    return {"inputs": [one(v) for v in proto.graph.input], "outputs": [one(v) for v in proto.graph.output]}


def check_onnx(path: Path, images: torch.Tensor, reference: np.ndarray, providers: list, *,
               atol: float | None, rtol: float = 0.0, same_top1: bool = False,
               label: str = "fp32") -> dict[str, Any]:
    """Run `path` with ONNX Runtime on `images` and on the first image alone; every problem against
    `reference` (PyTorch fp32 logits) is collected into one PipelineError. Returns the figures.

    Top-1 (`same_top1`) is judged beside the logit bound rather than instead of it: it does not depend on a
    tolerance a user may raise. Rounding flips a top-1 only where the reference's two best logits lie within
    twice the rounding; at fp32 (about 1e-6 of the scale) that is rare enough to stay strict."""
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise PipelineError(f"{label} ONNX fails onnx.checker ({str(exc).strip().splitlines()[0][:300]}); the "
                            "converter wrote an invalid graph: try another export.opset") from exc
    sess = ort_session(path, providers)
    problems = []
    inputs, outputs = sess.get_inputs(), sess.get_outputs()
    if [i.name for i in inputs] != [INPUT] or [o.name for o in outputs] != [OUTPUT]:
        problems.append(f"I/O names {[i.name for i in inputs]} -> {[o.name for o in outputs]}, expected "
                        f"['{INPUT}'] -> ['{OUTPUT}']")
    elif inputs[0].type != "tensor(float)" or outputs[0].type != "tensor(float)":
        problems.append(f"I/O types {inputs[0].type} -> {outputs[0].type}, expected float32")
    figures: dict[str, Any] = {}
    if not problems:
        batch = images.numpy()
        for size, feed, ref in ((len(batch), batch, reference), (1, batch[:1], reference[:1])):
            got = sess.run([OUTPUT], {INPUT: feed})[0]
            found, issues = parity(got, ref, atol, rtol)
            problems += [f"batch {size}: {issue}" for issue in issues]
            if size == len(batch):
                figures = found
            elif found:
                figures["max_abs_diff"] = max(figures.get("max_abs_diff", 0.0), found["max_abs_diff"])
        mismatches = figures.get("top1_mismatches", [])
        if same_top1 and mismatches:
            problems.append(f"top-1 differs on {len(mismatches)} of {len(batch)} images (indices "
                            f"{', '.join(map(str, mismatches[:10]))})")
    if problems:
        raise PipelineError(f"{label} ONNX check failed on {len(images)} validation images: {'; '.join(problems)}; "
                            + (HINT if label.startswith("fp32") else f"leave {label} out of export.precisions"))
    return {**figures, "top1_mismatches": len(figures["top1_mismatches"]), "check_batches": [len(images), 1]}


def _write_checked(proto: onnx.ModelProto, path: Path, metadata: dict[str, str],
                   check: Callable[[Path], dict[str, Any]]) -> dict[str, Any]:
    """Save with metadata to a temporary file, check it, then rename it into place (nothing is left
    behind when the check raises, Rejected included)."""
    set_metadata(proto, metadata)
    with atomic_path(path) as tmp:
        onnx.save(proto, str(tmp))
        figures = check(tmp)
    return {**figures, "bytes": path.stat().st_size, "opset": opset_of(proto), **describe_io(proto)}


def check_providers(device: torch.device) -> list:
    """`onnx_providers(device)`, with CUDA's TF32 math off: the fp32 check compares to full fp32."""
    return [(p, {"use_tf32": "0"}) if p == "CUDAExecutionProvider" else p for p in onnx_providers(device)]


class _Export:
    """One subject (the branch or ONE-E) through every requested precision."""

    def __init__(self, ctx: StageContext, subject: str, model: nn.Module, metadata: dict[str, str],
                 check_images: torch.Tensor, data: Any, calibration: ImageSet | None):
        self.ctx, self.cfg, self.subject, self.model = ctx, ctx.cfg.export, subject, model
        self.metadata, self.check_images, self.val, self.calibration = metadata, check_images, data.val, calibration
        self.val_labels = self.val.labels.numpy()
        self.providers = check_providers(ctx.device)
        self.out_dir = ctx.stage_dir("export")
        with torch.no_grad():
            self.reference = model(check_images).double().numpy()
        self.figures: dict[str, Any] = {}
        self.outputs: dict[str, Path] = {}

    def path(self, precision: str) -> Path:
        return self.out_dir / onnx_file_name(self.subject, precision)

    def val_accuracy(self, path: Path) -> float:
        logits = run_split(ort_session(path, self.providers), self.val, self.ctx.cfg.train.eval_batch_size)
        return top1_accuracy(logits, self.val_labels)

    def write(self, precision: str, proto: onnx.ModelProto, verdict: Verdict | None = None,
              **limits: Any) -> dict[str, Any]:
        """Check `proto` (parity with PyTorch, then the guard unless its `verdict` is known) and write it."""
        def check(tmp: Path) -> dict[str, Any]:
            figures = check_onnx(tmp, self.check_images, self.reference, self.providers,
                                 label=f"{precision} ({self.subject})", **limits)
            if precision == "fp32":
                return {**figures, "val_accuracy": self.val_accuracy(tmp)}
            judged = verdict or self.judge(precision, tmp)
            if not judged.passed:
                raise Rejected(judged.reason)
            return {**figures, **judged.summary()}

        figures = _write_checked(proto, self.path(precision), {**self.metadata, "precision": precision}, check)
        self.outputs[onnx_key(self.subject, precision)] = self.path(precision)
        return figures

    def judge(self, precision: str, path: Path) -> Verdict:
        return guard(precision, self.val_accuracy(path), self.figures["fp32"]["val_accuracy"], len(self.val),
                     self.cfg.max_accuracy_drop)

    def produce(self, precision: str, make: Callable[[], dict[str, Any]]) -> None:
        started = time.perf_counter()
        try:
            figures = make()
        except Rejected as exc:  # not deployed: no file, not even one an earlier run wrote
            self.path(precision).unlink(missing_ok=True)
            figures = {"passed": False, "reason": str(exc), **({"trials": exc.trials} if exc.trials else {})}
        except PipelineError:
            raise
        except Exception as exc:  # converters raise many types; all mean the same to the user
            raise PipelineError(f"{precision} conversion of the {self.subject} failed ({type(exc).__name__}: "
                                f"{str(exc)[:300]}); leave {precision} out of export.precisions") from exc
        self.figures[precision] = {**figures, "seconds": round(time.perf_counter() - started, 2)}
        self.report(precision)

    def report(self, precision: str) -> None:
        f, who = self.figures[precision], f"{self.subject} {precision}"
        if not f.get("passed", True):
            self.ctx.console.print(f"[yellow]{escape(who)} not deployed:[/yellow] {escape(f['reason'])}")
            return
        drop = f" ({0.0 - f['drop']:+.2f} points vs fp32)" if "drop" in f else ""
        self.ctx.console.print(escape(f"{who}: validation top-1 {f['val_accuracy']:.2f}%{drop}, max abs logit diff "
                                      f"{f['max_abs_diff']:.3g} on {len(self.check_images)} images, "
                                      f"{f['bytes'] / 1e6:.2f} MB"))

    def fp32(self) -> dict[str, Any]:
        proto = export_onnx(self.model, self.check_images, self.cfg.opset)
        return self.write("fp32", proto, atol=self.cfg.atol, rtol=self.cfg.rtol, same_top1=True)

    def fp16(self) -> dict[str, Any]:
        return self.write("fp16", to_fp16(onnx.load(str(self.path("fp32")))), atol=self.cfg.fp16_atol,
                          rtol=self.cfg.fp16_rtol)

    def int8(self, target: str, candidates: list[Recipe]) -> dict[str, Any]:
        """Try `candidates` in order; write the first the guard passes. Every trial is recorded."""
        trials: list[dict[str, Any]] = []
        with tempfile.TemporaryDirectory(prefix="one-int8-") as tmp:
            for recipe in candidates:
                candidate = Path(tmp) / f"{target}.onnx"
                kept = quantize_int8(self.path("fp32"), candidate, self.calibration, INPUT, target=target,
                                     recipe=recipe)
                _check_structure(onnx.load(str(candidate)), target, kept)
                verdict = self.judge(target, candidate)
                trials.append({"recipe": recipe.label, "method": recipe.method, "kept_float": kept,
                               "val_accuracy": verdict.accuracy, "drop": verdict.drop, "passed": verdict.passed})
                if verdict.passed:
                    figures = self.write(target, onnx.load(str(candidate)), verdict, atol=None)
                    return {**figures, "recipe": {**dataclasses.asdict(recipe), "label": recipe.label},
                            "kept_float": kept, "trials": trials,
                            "target": INT8_TARGETS[target], "calibration_images": len(self.calibration),
                            "calibration_split": "train"}
        best = max(trials, key=lambda t: t["val_accuracy"]) if trials else None
        reason = (f"no calibration recipe kept {target} within export.max_accuracy_drop "
                  f"{self.cfg.max_accuracy_drop:g} top-1 points of fp32 on {len(self.val)} validation images "
                  f"(best: {best['recipe']}, -{best['drop']:.2f} points)" if best else
                  f"not tried: the branch's {target} search kept no recipe")
        raise Rejected(reason, trials)


def _check_structure(proto: onnx.ModelProto, target: str, kept_float: list[str]) -> None:
    """Q/DQ in front of every Conv/Gemm not kept in float; the TensorRT form also needs zero points 0."""
    missing = unquantized_nodes(proto, kept_float)
    asymmetric = nonzero_zero_points(proto) if target == "int8" else []
    if missing or asymmetric:
        raise PipelineError(f"the {target} model is not fully Q/DQ-quantized: {len(missing)} Conv/Gemm without Q/DQ "
                            f"({', '.join(missing[:5])}), {len(asymmetric)} non-zero zero points (TensorRT needs "
                            "none); leave it out of export.precisions")


def run(ctx: StageContext) -> StageResult:
    cfg = ctx.cfg.export
    branch_path = ctx.input("strip", "model")
    branch, payload = checkpoint.load_model(branch_path)
    if payload["spec"]["method"] != "single" or "branch" not in payload:
        raise ArtifactError(f"{branch_path} is not a stripped branch; rerun with --from strip")
    models: dict[str, nn.Module] = {"branch": branch}
    if cfg.ensemble and ctx.summary("train").get("method", ctx.cfg.model.method) == "one":
        full, _ = checkpoint.load_model(ctx.input("train", "model"))
        models["ensemble"] = EnsembleNet(full)
    pruned_path, compress_note = pruned_model(ctx)
    if pruned_path is not None:
        models["pruned"] = checkpoint.load_model(pruned_path)[0]
    data = load_datasets(ctx.cfg.data)
    check_images, _ = next(data.val.batches(min(cfg.check_size, len(data.val))))
    int8_targets = [p for p in PRECISIONS if p.startswith("int8") and p in cfg.precisions]
    calibration = calibration_images(data.train, cfg.calibration_size, ctx.cfg.seed) if int8_targets else None
    metadata = onnx_metadata(payload, sha256_file(branch_path))
    out_dir = ctx.stage_dir("export")
    for subject in SUBJECTS:  # no stale file from an earlier config
        for precision in PRECISIONS:
            if subject not in models or precision not in cfg.precisions:
                (out_dir / onnx_file_name(subject, precision)).unlink(missing_ok=True)
    summary: dict[str, Any] = {"check_images": len(check_images), "validation_images": len(data.val),
                               "providers": onnx_providers(ctx.device), "opset": cfg.opset, "branch": payload["branch"],
                               "max_accuracy_drop": cfg.max_accuracy_drop, "compress": compress_note}
    outputs: dict[str, Path] = {}
    kept_recipes: dict[str, list[Recipe]] = {}
    for subject, model in models.items():
        meta = {**metadata, "model": {"ensemble": "one-e"}.get(subject, subject)}
        if subject == "pruned":
            meta["checkpoint_sha256"] = sha256_file(pruned_path)
        job = _Export(ctx, subject, model, meta, check_images, data, calibration)
        job.produce("fp32", job.fp32)
        if "fp16" in cfg.precisions:
            job.produce("fp16", job.fp16)
        for target in int8_targets:
            candidates = kept_recipes.get(target, recipes(cfg.calibration_methods)) if subject == "ensemble" else \
                recipes(cfg.calibration_methods)  # the pruned network searches its own
            job.produce(target, lambda t=target, c=candidates: job.int8(t, c))
            recipe = job.figures[target].get("recipe")
            if subject == "branch":  # ONE-E's twin is quantized the way the branch was
                kept_recipes[target] = [Recipe(recipe["method"], recipe["keep_float"])] if recipe else []
        summary[subject] = job.figures
        outputs.update(job.outputs)
    summary["deployed"] = [p for p in PRECISIONS if onnx_key("branch", p) in outputs]
    summary["pruned_deployed"] = [p for p in PRECISIONS if onnx_key("pruned", p) in outputs]
    return StageResult(outputs=outputs, summary=summary)


def pruned_model(ctx: StageContext) -> tuple[Path | None, dict[str, Any]]:
    """compress/model.pt when the compress stage deployed one, and what export says about it either way."""
    entry = ctx.record("compress")
    if entry is None or not entry.done:
        return None, {"deployed": False, "reason": (entry and entry.reason) or "the compress stage did not run"}
    summary = entry.summary
    if not summary.get("deployed"):
        return None, {"deployed": False, "reason": summary.get("reason", "compress deployed no network")}
    return ctx.input("compress", "model"), {"deployed": True, "flops_ratio": summary.get("flops_ratio"),
                                            "teacher": summary.get("teacher")}
