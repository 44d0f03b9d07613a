"""triton stage: a Triton Inference Server model repository under <run>/triton/.

    triton/
      README.txt
      <name>_onnx/        config.pbtxt, labels.txt, 1/model.onnx   platform onnxruntime_onnx (fp32 ONNX)
      <name>_onnx_fp16/   ... 1/model.onnx                          (when export.precisions has fp16)
      <name>_onnx_int8/   ... 1/model.onnx                          (symmetric Q/DQ ONNX: TensorRT's form)
      <name>_onnx_int8_cpu/ ... 1/model.onnx                        (uint8 Q/DQ ONNX on CPU instances: x86's form)
      <name>_openvino_int8_cpu/ ... 1/model.onnx                    backend openvino, the int8_cpu ONNX on CPU
                                                                     instances (triton.openvino)
      <name>_trt/         ... 1/model.plan                          platform tensorrt_plan (when engine is done)
      <name>_pruned_onnx/ ... (and _fp16, _int8, _int8_cpu)         the compress stage's pruned branch, when deployed
      <name>_pruned_openvino_int8_cpu/ ...                          (likewise, with triton.openvino)
      <name>_pruned_trt/  ... 1/model.plan                          the pruned branch's engine (when engine built one)

<name> is triton.model_name or the run name. Only the models the export accuracy guard deployed are
written. Inputs and outputs (names, data types, dims without the
batch) are read from the ONNX file each model comes from (the plan: the ONNX it was built from); the
output with one value per class gets `label_filename: "labels.txt"` (class names from the ONNX
metadata `class_names`) for Triton's classification extension. The ONNX models ask for TensorRT as
the onnxruntime backend's GPU execution accelerator (triton.tensorrt_accelerator) with no
`precision_mode`: ONNX Runtime then builds a strongly typed network that keeps the precision written
in the graph (fp16 or Q/DQ int8), where precision_mode FP16/INT8 would switch to the weak-typing
flags that TensorRT 11 removed. A plan's max_batch_size is clamped to the engine's profile maximum.
Every config.pbtxt is parsed with Triton's own ModelConfig schema when tritonclient is installed.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

from rich.markup import escape

from pipeline.deploy.forms import MODELS, RUNTIMES, engine_key, onnx_key, output_prefix, triton_model_name
from pipeline.deploy.onnx_io import OnnxSignature, TensorSpec, exported_onnx, read_onnx_io
from pipeline.errors import ArtifactError, PipelineError, StageSkipped
from pipeline.rundir import atomic_path, sha256_file, write_text
from pipeline.stage import StageContext, StageResult

MARKER = "# one-pipeline"  # first line of every config.pbtxt this stage writes (stale ones are removed)
LABELS = "labels.txt"
VERSION = "1"
MODEL_FILE = {"onnxruntime_onnx": "model.onnx", "openvino": "model.onnx", "tensorrt_plan": "model.plan"}

@dataclasses.dataclass
class ModelEntry:
    name: str
    platform: str  # onnxruntime_onnx | tensorrt_plan | openvino (a backend: Triton's config says `backend:`)
    source: Path  # file copied to <name>/1/model.<ext>
    signature: OnnxSignature
    max_batch_size: int
    header: list[str]
    kind: str | None = None  # instance kind; None: KIND_AUTO (GPU where there is one, else CPU)


def label_output(signature: OnnxSignature) -> str | None:
    """The output that holds one value per class (it gets labels.txt), if class names are known."""
    if not signature.class_names:
        return None
    return next((o.name for o in signature.outputs if o.dims == (len(signature.class_names),)), None)


def config_text(entry: ModelEntry, *, dynamic_batching: bool, max_queue_delay_us: int, instance_count: int,
                tensorrt_accelerator: bool) -> str:
    """config.pbtxt (protobuf text format of Triton's ModelConfig) for one model."""
    labelled = label_output(entry.signature)

    def tensors(kind: str, specs: tuple[TensorSpec, ...]) -> list[str]:
        lines = [f"{kind} ["]
        for i, t in enumerate(specs):
            lines += ["  {", f"    name: {json.dumps(t.name)}", f"    data_type: {t.data_type}",
                      f"    dims: [ {', '.join(map(str, t.dims))} ]"]
            if t.name == labelled:
                lines.append(f'    label_filename: "{LABELS}"')
            lines.append("  }," if i < len(specs) - 1 else "  }")
        return lines + ["]"]

    runs_on = ([f'backend: "{entry.platform}"', f'default_model_filename: "{MODEL_FILE[entry.platform]}"']
               if entry.platform == "openvino" else [f'platform: "{entry.platform}"'])
    lines = [*entry.header, f"name: {json.dumps(entry.name)}", *runs_on, f"max_batch_size: {entry.max_batch_size}",
             *tensors("input", entry.signature.inputs), *tensors("output", entry.signature.outputs)]
    if dynamic_batching:
        lines += ["dynamic_batching {", f"  max_queue_delay_microseconds: {max_queue_delay_us}", "}"]
    kind = [f"    kind: {entry.kind}"] if entry.kind else []
    lines += ["instance_group [", "  {", f"    count: {instance_count}", *kind, "  }", "]"]
    if entry.platform == "openvino":  # the backend's documented latency setting: one stream per instance
        lines += [f"parameters: {{ key: {json.dumps(k)} value: {{ string_value: {json.dumps(v)} }} }}"
                  for k, v in (("NUM_STREAMS", "1"), ("PERFORMANCE_HINT", "LATENCY"))]
    if tensorrt_accelerator and entry.platform == "onnxruntime_onnx" and entry.kind != "KIND_CPU":
        lines += ["optimization {", "  execution_accelerators {", "    gpu_execution_accelerator: [",
                  '      { name: "tensorrt" }', "    ]", "  }", "}"]
    return "\n".join(lines) + "\n"


def validate_config_text(text: str, where: str = "config.pbtxt") -> bool:
    """Parse with Triton's ModelConfig schema; False when tritonclient is not installed, PipelineError
    when the text does not fit the schema."""
    try:
        from google.protobuf import text_format
        from tritonclient.grpc import model_config_pb2
    except ImportError:
        return False
    try:
        text_format.Parse(text, model_config_pb2.ModelConfig())
    except text_format.ParseError as exc:
        raise PipelineError(f"{where} does not fit Triton's ModelConfig schema: {exc}") from None
    return True


def _copy(src: Path, dst: Path) -> None:
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)


def _onnx_models(ctx: StageContext, base: str) -> list[ModelEntry]:
    """The ONNX models the export accuracy guard deployed of every model the table serves (the branch as
    <base>_onnx..., the pruned branch as <base>_pruned_onnx...); the x86 int8 form on CPU instances."""
    entries = []
    export = ctx.record("export")
    deployed = export.outputs if export else {}
    for subject in [m for m, spec in MODELS.items() if spec.triton_suffix is not None]:
        for precision in [p for p in RUNTIMES["onnxruntime"].precisions if onnx_key(subject, p) in deployed]:
            path = exported_onnx(ctx, onnx_key(subject, precision))
            header = [f"{MARKER}: {precision} ONNX from {path.relative_to(ctx.run.root)} "
                      f"(sha256 {sha256_file(path)[:16]})"]
            entries.append(ModelEntry(triton_model_name(base, subject, "onnxruntime", precision), "onnxruntime_onnx",
                                      path, read_onnx_io(path), ctx.cfg.triton.max_batch_size, header,
                                      "KIND_CPU" if precision == "int8_cpu" else None))
            openvino = triton_model_name(base, subject, "openvino", precision)
            if openvino and ctx.cfg.triton.openvino:
                # OpenVINO's backend has no f32 hint: on a bfloat16 CPU its float layers (the int8 file's first
                # conv and classifier) run in bf16, where the bench's OpenVINO rows are compiled at f32
                entries.append(ModelEntry(openvino, "openvino", path, entries[-1].signature,
                                          ctx.cfg.triton.max_batch_size,
                                          [*header, "# OpenVINO backend: float layers may run in bf16 on CPUs "
                                                    "with bfloat16 (the backend sets no f32 hint)"], "KIND_CPU"))
    return entries


def _plan_model(ctx: StageContext, base: str, notes: list[str]) -> list[ModelEntry]:
    """A tensorrt_plan model for every engine the engine stage built of a model the table serves in TensorRT
    (the kept branch, and its pruned form where compress deployed one)."""
    entry = ctx.record("engine")
    if not entry or not entry.done:
        why = ("has not run" if not entry else f"was skipped: {entry.reason}"
               if entry.status == "skipped" else f"is {entry.status}: {entry.error}")
        notes.append(f"no TensorRT plan model: the engine stage {why}")
        return []
    built = [m for m in RUNTIMES["tensorrt"].triton_models if engine_key(m) in entry.outputs]
    return [e for e in (_plan_entry(ctx, base, model, notes) for model in built) if e is not None]


def _plan_entry(ctx: StageContext, base: str, model: str, notes: list[str]) -> ModelEntry | None:
    """One engine as a Triton model: checked against the ONNX exported now (its sidecar's sha256), its
    max_batch_size clamped to the engine's profile, on GPU instances."""
    plan = ctx.input("engine", engine_key(model))
    info = json.loads(ctx.input("engine", f"{output_prefix(model)}engine_info").read_text())
    onnx_path = exported_onnx(ctx, onnx_key(model, info["precision"]))
    if info.get("onnx_sha256") != sha256_file(onnx_path):
        raise ArtifactError(f"{plan} was built from another {onnx_path.name} than the one exported now; "
                            "rerun with --from engine")
    low, high = info["profile"]["min"][0], info["profile"]["max"][0]
    name = triton_model_name(base, model, "tensorrt", info["precision"])
    if low > 1:
        notes.append(f"no {name} model: the engine's profile starts at batch {low}, and Triton sends batches "
                     "from 1; rebuild with engine.min_batch=1")
        return None
    max_batch = ctx.cfg.triton.max_batch_size
    if max_batch > high:
        notes.append(f"{name}: max_batch_size clamped from triton.max_batch_size {max_batch} to the engine's "
                     f"profile maximum {high} (engine.max_batch)")
        max_batch = high
    header = [f"{MARKER}: TensorRT {info['tensorrt']} plan ({info['precision']}) built on {info['gpu']} "
              f"(compute capability {info['compute_capability']}) from {onnx_path.relative_to(ctx.run.root)};",
              "# it runs only with that TensorRT version on that GPU model: pick the Triton image that ships it"]
    return ModelEntry(name, "tensorrt_plan", plan, read_onnx_io(onnx_path), max_batch, header, "KIND_GPU")


def _remove_stale(repo: Path, keep: set[str]) -> list[str]:
    """Model folders this stage wrote earlier that are not part of the repository any more."""
    removed = []
    for child in sorted(repo.iterdir()):
        config = child / "config.pbtxt"
        if child.is_dir() and child.name not in keep and config.is_file():
            if config.read_text(errors="replace").startswith(MARKER):
                shutil.rmtree(child)
                removed.append(child.name)
    return removed


def _readme(entries: list[ModelEntry], notes: list[str]) -> str:
    lines = ["Triton Inference Server model repository written by one-pipeline (triton stage).", "",
             "Serve it:  tritonserver --model-repository <this folder>   (see docs/DEPLOY.md)",
             "CPU-only:  add --exit-on-error=false --strict-readiness=false when a tensorrt_plan model is here",
             "           (it needs a GPU; the ONNX models are served, the plan model stays UNAVAILABLE)", "",
             "Models:"]
    for e in entries:
        ins = ", ".join(f"{t.name} {t.data_type} {list(t.dims)}" for t in e.signature.inputs)
        outs = ", ".join(f"{t.name} {t.data_type} {list(t.dims)}" for t in e.signature.outputs)
        lines.append(f"  {e.name:<28} {e.platform:<17} max_batch_size {e.max_batch_size}: {ins} -> {outs}")
    lines += ["", *(f"Note: {n}" for n in notes)] if notes else []
    return "\n".join(lines) + "\n"


def run(ctx: StageContext) -> StageResult:
    cfg = ctx.cfg.triton
    if not cfg.enabled:
        raise StageSkipped("triton.enabled is false in the config")
    base = cfg.model_name or ctx.cfg.name
    notes: list[str] = []
    entries = _onnx_models(ctx, base)
    compress = ctx.summary("export").get("compress") or {}
    if ctx.cfg.compress.enabled and not compress.get("deployed"):
        notes.append(f"no {base}_pruned models: {compress.get('reason', 'the compress stage did not run')}")
    entries += _plan_model(ctx, base, notes)
    repo = ctx.stage_dir("triton")
    outputs: dict[str, Path] = {}
    validated = False
    for e in entries:
        text = config_text(e, dynamic_batching=cfg.dynamic_batching, max_queue_delay_us=cfg.max_queue_delay_us,
                           instance_count=cfg.instance_count, tensorrt_accelerator=cfg.tensorrt_accelerator)
        validated = validate_config_text(text, f"{e.name}/config.pbtxt")
        folder = repo / e.name
        model_file = folder / VERSION / MODEL_FILE[e.platform]
        _copy(e.source, model_file)
        outputs[f"{e.name}/{VERSION}/{model_file.name}"] = model_file
        labels = folder / LABELS
        if label_output(e.signature):
            write_text(labels, "\n".join(e.signature.class_names) + "\n")
            outputs[f"{e.name}/{LABELS}"] = labels
        else:
            labels.unlink(missing_ok=True)
            notes.append(f"{e.name}: no labels.txt (no class_names metadata matching an output)")
        write_text(folder / "config.pbtxt", text)  # last: a folder with a config is a complete model
        outputs[f"{e.name}/config.pbtxt"] = folder / "config.pbtxt"
    removed = _remove_stale(repo, {e.name for e in entries})
    if removed:
        notes.append(f"removed models written by an earlier run: {', '.join(removed)}")
    write_text(repo / "README.txt", _readme(entries, notes))
    outputs["README.txt"] = repo / "README.txt"
    for note in notes:
        ctx.console.print(f"[yellow]note:[/yellow] {escape(note)}")
    models = {e.name: e.platform for e in entries}
    ctx.console.print("models: " + ", ".join(f"{n} ({p})" for n, p in models.items()))
    summary: dict[str, Any] = {"models": models, "max_batch_size": {e.name: e.max_batch_size for e in entries},
                               "validated_with_tritonclient": validated, "notes": notes}
    return StageResult(outputs=outputs, summary=summary)
