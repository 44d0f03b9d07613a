"""Export the stripped branch to ONNX (fp32; fp16 and int8 converted from it) and check every file with
ONNX Runtime against PyTorch on real validation images.

    proto = export_onnx(single_net, example_batch, opset=20)   # input "input" (N dynamic), output "logits"
    figures = check_onnx(path, images, reference_logits, ["CPUExecutionProvider"], atol=1e-4, same_top1=True)

Checks (all problems are collected, then one PipelineError gives every figure):
- fp32: onnx.checker, names/types, max abs logit diff vs PyTorch <= export.atol, identical top-1;
- fp16: the same with export.fp16_atol; top-1 agreement recorded;
- int8: Q/DQ in front of every Conv/Gemm, zero points 0, top-1 agreement with PyTorch fp32 >=
  export.int8_min_agreement; max diff recorded. Calibration uses TRAINING images only.
Each check runs the check batch and a single image (a batch size other than the export's).
Every file carries metadata_props (see `onnx_metadata`) and is written atomically.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from pipeline.deploy.quantize import calibration_images, nonzero_zero_points, quantize_int8, to_fp16, unquantized_nodes
from pipeline.device import onnx_providers
from pipeline.errors import ArtifactError, PipelineError
from pipeline.rundir import atomic_path, sha256_file
from pipeline.stage import StageContext, StageResult
from pipeline.training import checkpoint
from pipeline.training.data import load_datasets

INPUT, OUTPUT = "input", "logits"
PRECISIONS = ("fp32", "fp16", "int8")
HINTS = {  # what to do when a precision fails its check
    "fp32": "the exported graph does not compute what PyTorch does: try another export.opset (or raise "
            "export.atol if the difference is only rounding)",
    "fp16": "the model loses too much in float16: deploy fp32, or raise export.fp16_atol",
    "int8": "calibrate on more images (export.calibration_size), lower export.int8_min_agreement, or deploy fp16",
}


def export_onnx(model: nn.Module, example: torch.Tensor, opset: int) -> onnx.ModelProto:
    """The dynamo export of `model` (eval mode) with a dynamic batch dimension, pinned to `opset`."""
    if len(example) < 2:  # torch.export specialises a dimension of size 1
        example = example.repeat(2, 1, 1, 1)
    try:
        program = torch.onnx.export(model.eval(), (example,), input_names=[INPUT], output_names=[OUTPUT],
                                    opset_version=opset, dynamic_shapes=({0: torch.export.Dim("batch")},),
                                    dynamo=True, optimize=True, external_data=False, verbose=False)
    except Exception as exc:  # the exporter raises many types; all mean the same to the user
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise PipelineError(f"torch.onnx.export failed at opset {opset} ({type(exc).__name__}: {first[:300]}); "
                            "try another export.opset") from exc
    proto = program.model_proto
    got = opset_of(proto)
    if got != opset:
        raise PipelineError(f"the exporter wrote opset {got} where export.opset is {opset}; pick an opset this "
                            f"torch {torch.__version__} exports (18 to 23)")
    return proto


def opset_of(proto: onnx.ModelProto) -> int | None:
    return next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)


def onnx_metadata(payload: dict[str, Any], checkpoint_sha256: str, precision: str) -> dict[str, str]:
    """What a consumer needs to feed the model and trace it back (values are strings; lists are JSON)."""
    data = payload["data"]
    return {"class_names": json.dumps(list(data["class_names"])), "input_shape": json.dumps(list(data["input_shape"])),
            "mean": json.dumps(list(data["mean"])), "std": json.dumps(list(data["std"])),
            "dataset": str(data["dataset"]), "arch": str(payload["spec"]["arch"]),
            "branch": str(payload["branch"]), "source_sha256": str(payload["source_sha256"]),
            "checkpoint_sha256": checkpoint_sha256, "precision": precision, "producer": "one-pipeline"}


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


def compare(got: np.ndarray, reference: np.ndarray, atol: float | None) -> tuple[dict[str, Any], list[str]]:
    """Figures and problems of one output against the PyTorch reference logits."""
    if got.shape != reference.shape:
        return {}, [f"output shape {list(got.shape)} where PyTorch gives {list(reference.shape)}"]
    diff = np.abs(got.astype(np.float64) - reference)
    max_diff = float(np.nan_to_num(diff, nan=np.inf).max())
    agree = got.argmax(1) == reference.argmax(1)
    problems = []
    if not np.isfinite(got).all():
        problems.append(f"{int((~np.isfinite(got)).sum())} non-finite logits")
    if atol is not None and not max_diff <= atol:
        over = int((np.nan_to_num(diff, nan=np.inf) > atol).sum())
        problems.append(f"max abs logit diff {max_diff:.3g} > atol {atol:g} ({over} of {diff.size} values over)")
    return {"max_abs_diff": max_diff, "top1_agreement": float(agree.mean()),
            "top1_mismatches": [int(i) for i in np.flatnonzero(~agree)]}, problems


def check_providers(device: torch.device) -> list:
    """`onnx_providers(device)`, with CUDA's TF32 math off: the fp32 check compares to full fp32."""
    return [(p, {"use_tf32": "0"}) if p == "CUDAExecutionProvider" else p for p in onnx_providers(device)]


def session(path: Path, providers: list) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only
    try:
        return ort.InferenceSession(str(path), options, providers=providers)
    except Exception as exc:  # ORT raises its own Fail/InvalidGraph/NotImplemented types
        raise PipelineError(f"ONNX Runtime cannot load {path.name} ({type(exc).__name__}: "
                            f"{str(exc).strip()[:300]})") from exc


def check_onnx(path: Path, images: torch.Tensor, reference: np.ndarray, providers: list, *,
               atol: float | None, same_top1: bool = False, min_agreement: float | None = None,
               label: str = "fp32") -> dict[str, Any]:
    """Run `path` with ONNX Runtime on `images` and on the first image alone; every problem against
    `reference` (PyTorch fp32 logits) is collected into one PipelineError. Returns the figures."""
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise PipelineError(f"{label} ONNX fails onnx.checker ({str(exc).strip().splitlines()[0][:300]}); the "
                            "converter wrote an invalid graph: try another export.opset") from exc
    sess = session(path, providers)
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
            found, issues = compare(got, ref, atol)
            problems += [f"batch {size}: {issue}" for issue in issues]
            if size == len(batch):
                figures = found
            elif found:
                figures["max_abs_diff"] = max(figures.get("max_abs_diff", 0.0), found["max_abs_diff"])
        mismatches = figures.get("top1_mismatches", [])
        if same_top1 and mismatches:
            problems.append(f"top-1 differs on {len(mismatches)} of {len(batch)} images (indices "
                            f"{', '.join(map(str, mismatches[:10]))})")
        if min_agreement is not None and figures and figures["top1_agreement"] < min_agreement:
            problems.append(f"top-1 agreement with fp32 {figures['top1_agreement']:.1%} < "
                            f"{min_agreement:.1%} (export.int8_min_agreement)")
    if problems:
        raise PipelineError(f"{label} ONNX check failed on {len(images)} validation images: {'; '.join(problems)}; "
                            f"{HINTS.get(label, 'see the figures above')}")
    return {**figures, "top1_mismatches": len(figures["top1_mismatches"]), "check_batches": [len(images), 1]}


def _write_checked(proto: onnx.ModelProto, path: Path, metadata: dict[str, str],
                   check: Callable[[Path], dict[str, Any]]) -> dict[str, Any]:
    """Save with metadata to a temporary file, check it, then rename it into place."""
    set_metadata(proto, metadata)
    with atomic_path(path) as tmp:
        onnx.save(proto, str(tmp))
        figures = check(tmp)
    return {**figures, "bytes": path.stat().st_size, "opset": opset_of(proto), **describe_io(proto)}


def run(ctx: StageContext) -> StageResult:
    cfg = ctx.cfg.export
    branch_path = ctx.input("strip", "model")
    model, payload = checkpoint.load_model(branch_path)
    if payload["spec"]["method"] != "single" or "branch" not in payload:
        raise ArtifactError(f"{branch_path} is not a stripped branch; rerun with --force strip")
    branch_sha = sha256_file(branch_path)
    data = load_datasets(ctx.cfg.data)
    images, _ = next(data.val.batches(min(cfg.check_size, len(data.val))))
    with torch.no_grad():
        reference = model(images).double().numpy()
    providers = check_providers(ctx.device)
    out_dir = ctx.stage_dir("export")
    outputs: dict[str, Path] = {}
    summary: dict[str, Any] = {"check_images": len(images), "providers": onnx_providers(ctx.device),
                               "opset": cfg.opset, "branch": payload["branch"]}

    def produce(precision: str, make: Callable[[], onnx.ModelProto], **limits: Any) -> None:
        started = time.perf_counter()
        path = out_dir / f"model_{precision}.onnx"
        try:
            proto = make()
        except PipelineError:
            raise
        except Exception as exc:  # converters raise many types; all mean the same to the user
            raise PipelineError(f"{precision} conversion failed ({type(exc).__name__}: {str(exc)[:300]}); leave "
                                f"{precision} out of export.precisions") from exc
        figures = _write_checked(proto, path, onnx_metadata(payload, branch_sha, precision),
                                 lambda tmp: check_onnx(tmp, images, reference, providers, label=precision, **limits))
        outputs[f"onnx_{precision}"] = path
        summary[precision] = {**figures, "atol": limits.get("atol"), "seconds": round(time.perf_counter() - started, 2)}
        ctx.console.print(f"{precision}: max abs logit diff {figures['max_abs_diff']:.3g}, top-1 agreement "
                          f"{figures['top1_agreement']:.1%}, {figures['bytes'] / 1e6:.2f} MB")

    for precision in set(PRECISIONS) - set(cfg.precisions):  # no stale file from an earlier config
        (out_dir / f"model_{precision}.onnx").unlink(missing_ok=True)
    produce("fp32", lambda: export_onnx(model, images, cfg.opset), atol=cfg.atol, same_top1=True)
    if "fp16" in cfg.precisions:
        produce("fp16", lambda: to_fp16(onnx.load(str(outputs["onnx_fp32"]))), atol=cfg.fp16_atol)
    if "int8" in cfg.precisions:
        calibration = calibration_images(data.train, cfg.calibration_size, ctx.cfg.seed)
        produce("int8", lambda: _int8(outputs["onnx_fp32"], calibration), atol=None,
                min_agreement=cfg.int8_min_agreement)
        summary["int8"].update(calibration_images=len(calibration), calibration_split="train",
                               min_agreement=cfg.int8_min_agreement)
    return StageResult(outputs=outputs, summary=summary)


def _int8(fp32_path: Path, calibration) -> onnx.ModelProto:
    with tempfile.TemporaryDirectory(prefix="one-int8-") as tmp:
        quantized = Path(tmp) / "model_int8.onnx"
        quantize_int8(fp32_path, quantized, calibration, INPUT)
        proto = onnx.load(str(quantized))
    missing, asymmetric = unquantized_nodes(proto), nonzero_zero_points(proto)
    if missing or asymmetric:
        raise PipelineError(f"the int8 model is not fully Q/DQ-quantized: {len(missing)} Conv/Gemm without Q/DQ "
                            f"({', '.join(missing[:5])}), {len(asymmetric)} non-zero zero points; TensorRT needs both")
    return proto
