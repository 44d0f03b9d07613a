"""ONNX files as the stages share them: the export itself, the names of what export writes, and a
file's inputs, outputs and class names in Triton's terms (the triton and engine stages read them from
the file rather than assume them)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import onnx
import torch
from torch import nn

from pipeline.deploy.forms import EXPORTED, ONNX_PRECISIONS, onnx_file_name, onnx_key  # noqa: F401 (read from here)
from pipeline.errors import ArtifactError, PipelineError
from pipeline.rundir import RunDir, StageRecord
from pipeline.stage import StageContext

INPUT, OUTPUT = "input", "logits"  # the names every exported file uses

# ONNX TensorProto element type -> Triton DataType (model_config.proto)
ONNX_TO_TRITON = {
    onnx.TensorProto.FLOAT: "TYPE_FP32", onnx.TensorProto.FLOAT16: "TYPE_FP16", onnx.TensorProto.BFLOAT16: "TYPE_BF16",
    onnx.TensorProto.DOUBLE: "TYPE_FP64", onnx.TensorProto.INT8: "TYPE_INT8", onnx.TensorProto.INT16: "TYPE_INT16",
    onnx.TensorProto.INT32: "TYPE_INT32", onnx.TensorProto.INT64: "TYPE_INT64", onnx.TensorProto.UINT8: "TYPE_UINT8",
    onnx.TensorProto.UINT16: "TYPE_UINT16", onnx.TensorProto.UINT32: "TYPE_UINT32",
    onnx.TensorProto.UINT64: "TYPE_UINT64", onnx.TensorProto.BOOL: "TYPE_BOOL", onnx.TensorProto.STRING: "TYPE_STRING",
}


STACK_TRACE = "pkg.torch.onnx.stack_trace"


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
    for node in proto.graph.node:  # the exporter's source locations name this machine's paths: not shipped
        kept = [p for p in node.metadata_props if p.key != STACK_TRACE]
        del node.metadata_props[:]
        node.metadata_props.extend(kept)
    got = opset_of(proto)
    if got != opset:
        raise PipelineError(f"the exporter wrote opset {got} where export.opset is {opset}; pick an opset this "
                            f"torch {torch.__version__} exports (18 to 23)")
    return proto


def opset_of(proto: onnx.ModelProto) -> int | None:
    return next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    name: str
    data_type: str  # Triton type, e.g. TYPE_FP32
    dims: tuple[int, ...]  # without the batch dimension; -1 where dynamic


@dataclasses.dataclass(frozen=True)
class OnnxSignature:
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    class_names: tuple[str, ...] | None  # from metadata_props["class_names"], if present


def read_onnx_io(path: Path) -> OnnxSignature:
    """Inputs and outputs of an ONNX file with a dynamic first (batch) dimension, and its class names."""
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # DecodeError and friends: a truncated or foreign file
        raise ArtifactError(f"{path} is not a readable ONNX file ({type(exc).__name__}); rerun with --from export")
    initializers = {t.name for t in model.graph.initializer}

    def spec(value: onnx.ValueInfoProto) -> TensorSpec:
        tensor = value.type.tensor_type
        if tensor.elem_type not in ONNX_TO_TRITON:
            raise PipelineError(f"{path.name}: tensor '{value.name}' has ONNX type "
                                f"{onnx.TensorProto.DataType.Name(tensor.elem_type)}, which Triton cannot serve")
        dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else -1 for d in tensor.shape.dim]
        if not dims or dims[0] != -1:
            raise PipelineError(f"{path.name}: tensor '{value.name}' has shape {dims} with no dynamic batch "
                                "dimension first; Triton batching needs one: re-export with a dynamic batch")
        return TensorSpec(value.name, ONNX_TO_TRITON[tensor.elem_type], tuple(dims[1:]))

    inputs = tuple(spec(v) for v in model.graph.input if v.name not in initializers)
    outputs = tuple(spec(v) for v in model.graph.output)
    meta = {p.key: p.value for p in model.metadata_props}
    names = None
    if "class_names" in meta:
        try:
            names = json.loads(meta["class_names"])
        except json.JSONDecodeError:
            names = None
        if not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
            raise ArtifactError(f"{path.name}: metadata class_names is not a JSON list of strings; "
                                "rerun with --from export")
        names = tuple(names)
    return OnnxSignature(inputs, outputs, names)


# What the export stage writes, named once for the stages that read it. The stripped branch is the
# deployed model; the full model's gated ensemble (ONE-E) is exported beside it for like-for-like benches;
# the pruned branch (the compress stage's, when its guard deployed one) beside both.
SUBJECTS = EXPORTED  # the table's (pipeline/deploy/forms.py), with its file names and output keys
SOURCES = {"branch": ("strip", "model"), "ensemble": ("strip", "model"), "pruned": ("compress", "model")}
PRECISIONS = ONNX_PRECISIONS


def exported_from(key: str) -> tuple[str, str]:
    """(stage, output): the checkpoint export's output `key` was exported from (strip's, or compress's for
    pruned_...)."""
    return SOURCES["pruned" if key.startswith("pruned_") else "branch"]


def exported_onnx(ctx: StageContext, key: str) -> Path:
    """Export's output `key`, read through a stage's context (export's record, and the record of
    `exported_from(key)`'s stage) and checked by `checked_onnx`."""
    return checked_onnx(ctx.input("export", key), key, ctx.record(exported_from(key)[0]))


def run_exported_onnx(run: RunDir, key: str) -> Path:
    """`exported_onnx` outside any stage (the predict command, compare), read from the run directory."""
    return checked_onnx(run.output("export", key), key, run.stage(exported_from(key)[0]))


def checked_onnx(path: Path, key: str, source: StageRecord | None) -> Path:
    """Export's output `key` at `path` (sha256-checked already), refused unless its `checkpoint_sha256`
    metadata names the strip/branch.pt (compress/model.pt for the pruned files) that `source`, the record
    of `exported_from(key)`'s stage, holds now (an ONNX file of another branch or training run)."""
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # DecodeError and friends: a truncated or foreign file
        raise ArtifactError(f"{path} is not a readable ONNX file ({type(exc).__name__}); rerun with --from export")
    written_from = {p.key: p.value for p in model.metadata_props}.get("checkpoint_sha256")
    stage, output = exported_from(key)
    record = source.outputs.get(output) if source else None
    if written_from != (record.sha256 if record else None):
        raise ArtifactError(f"{path} was exported from another checkpoint (sha256 {str(written_from)[:16]}, "
                            f"{record.path if record else stage} is {str(record.sha256 if record else None)[:16]}); "
                            "rerun with --from export")
    return path
