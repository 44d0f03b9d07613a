"""The triton stage: every config.pbtxt fits Triton's own ModelConfig schema (tritonclient) and agrees with
the ONNX file it serves; batching, instances, the TensorRT accelerator and the plan model follow the config
and the engine's profile. Real files: a tiny SingleNet exported with torch.onnx, and hand-made graphs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from pipeline.config import validate_config
from pipeline.deploy.onnx_io import read_onnx_io
from pipeline.errors import ArtifactError, PipelineError
from pipeline.rundir import RunDir, sha256_file
from pipeline.stage import StageContext
from stages import triton
from stages.triton import validate_config_text
from tests.conftest import TINY_ONNX_CLASSES

model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2",
                                       reason="tests validate with Triton's schema: pip install 'tritonclient[grpc]'")
text_format = pytest.importorskip("google.protobuf.text_format")

CLASSES = TINY_ONNX_CLASSES
# written independently of stages/triton.py: numpy dtype of the ONNX tensor -> Triton type name
TRITON_TYPE = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "int64": "TYPE_INT64", "int32": "TYPE_INT32",
               "int8": "TYPE_INT8", "uint8": "TYPE_UINT8", "bool": "TYPE_BOOL"}


def _with_metadata(model: onnx.ModelProto, classes: list[str] | None) -> onnx.ModelProto:
    if classes is not None:
        model.metadata_props.add(key="class_names", value=json.dumps(classes))
    return model


def flatten_onnx(path: Path, *, dtype: int = TensorProto.FLOAT16, batch: str | int = "N",
                 classes: list[str] | None = None) -> Path:
    """input [batch, 3, 2, 2] -> Flatten -> logits [batch, 12], in `dtype` (hand-made, opset 20)."""
    graph = helper.make_graph([helper.make_node("Flatten", ["input"], ["logits"], axis=1)], "flatten",
                              [helper.make_tensor_value_info("input", dtype, [batch, 3, 2, 2])],
                              [helper.make_tensor_value_info("logits", dtype, [batch, 12])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    onnx.checker.check_model(model)
    onnx.save(_with_metadata(model, classes), str(path))
    return path


def make_run(tmp_path: Path, onnx_files: dict[str, Path], **sections) -> StageContext:
    """A run whose manifest records the export stage as done with these ONNX files (copied in place)."""
    raw = {"name": "deploy", "output_root": str(tmp_path / "runs"),
           "export": {"precisions": list(onnx_files)}, "engine": {"precision": "fp32"}, **sections}
    cfg = validate_config(raw)
    run = RunDir(cfg.run_dir)
    outputs = {}
    for precision, source in onnx_files.items():
        target = run.path("export", f"model_{precision}.onnx")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
        outputs[f"onnx_{precision}"] = target
    run.record("export", {"status": "done", "fingerprint": "test", "outputs": run.describe_outputs(outputs)})
    return StageContext(cfg, run, torch.device("cpu"))


def record_engine(ctx: StageContext, *, min_batch: int = 1, max_batch: int = 16, onnx_sha: str | None = None) -> Path:
    """The engine stage's outputs as it writes them (the plan's bytes are opaque to the triton stage)."""
    run, onnx_path = ctx.run, ctx.run.path("export", "model_fp32.onnx")
    plan = run.path("engine", "model_fp32.plan")
    plan.parent.mkdir(parents=True, exist_ok=True)
    plan.write_bytes(b"serialized engine bytes")
    sample = [1, 16, 16]
    info = {"tensorrt": "10.13.0", "gpu": "NVIDIA H100", "compute_capability": "9.0", "precision": "fp32",
            "profile": {"input": "input", "min": [min_batch, *sample], "opt": [max_batch, *sample],
                        "max": [max_batch, *sample]},
            "onnx_sha256": onnx_sha or sha256_file(onnx_path)}
    sidecar = run.path("engine", "model_fp32.plan.json")
    sidecar.write_text(json.dumps(info))
    log = run.path("engine", "build.log")
    log.write_text("log\n")
    run.record("engine", {"status": "done", "fingerprint": "test", "outputs": run.describe_outputs(
        {"engine": plan, "engine_info": sidecar, "build_log": log})})
    return plan


def parse(config: Path):
    message = model_config_pb2.ModelConfig()
    text_format.Parse(config.read_text(), message)
    return message


def onnx_io(path: Path) -> tuple[list, list]:
    """(name, Triton type, dims without batch) of every input and output, read here with onnx alone."""
    model = onnx.load(str(path))

    def one(v):
        t = v.type.tensor_type
        dims = [d.dim_value if d.dim_value > 0 else -1 for d in t.shape.dim][1:]
        return v.name, TRITON_TYPE[str(helper.tensor_dtype_to_np_dtype(t.elem_type))], dims
    return [one(v) for v in model.graph.input], [one(v) for v in model.graph.output]


def config_io(message) -> tuple[list, list]:
    def one(t):
        return t.name, model_config_pb2.DataType.Name(t.data_type), list(t.dims)
    return [one(t) for t in message.input], [one(t) for t in message.output]


def test_every_config_fits_tritons_schema_and_the_onnx_it_serves(tmp_path, tiny_onnx):
    fp16 = flatten_onnx(tmp_path / "flat.onnx", classes=[f"c{i}" for i in range(12)])
    ctx = make_run(tmp_path, {"fp32": tiny_onnx, "fp16": fp16})
    result = triton.run(ctx)

    repo = ctx.run.path("triton")
    assert result.summary["models"] == {"deploy_onnx": "onnxruntime_onnx", "deploy_onnx_fp16": "onnxruntime_onnx"}
    assert result.summary["validated_with_tritonclient"] is True
    for name, source in (("deploy_onnx", tiny_onnx), ("deploy_onnx_fp16", fp16)):
        message = parse(repo / name / "config.pbtxt")
        assert message.name == name and message.platform == "onnxruntime_onnx"
        assert config_io(message) == onnx_io(source)
        assert (repo / name / "1" / "model.onnx").read_bytes() == source.read_bytes()
        assert result.outputs[f"{name}/config.pbtxt"] == repo / name / "config.pbtxt"
        assert result.outputs[f"{name}/1/model.onnx"] == repo / name / "1" / "model.onnx"
    assert config_io(parse(repo / "deploy_onnx_fp16" / "config.pbtxt")) == (
        [("input", "TYPE_FP16", [3, 2, 2])], [("logits", "TYPE_FP16", [12])])
    # labels for Triton's classification extension, referenced from the class output
    fp32 = parse(repo / "deploy_onnx" / "config.pbtxt")
    assert fp32.output[0].label_filename == "labels.txt"
    assert (repo / "deploy_onnx" / "labels.txt").read_text().splitlines() == CLASSES
    assert "deploy_onnx" in (repo / "README.txt").read_text()


def test_tensorrt_accelerator_block_follows_the_config(tmp_path, tiny_onnx):
    on = make_run(tmp_path / "on", {"fp32": tiny_onnx})
    triton.run(on)
    accelerators = parse(on.run.path("triton", "deploy_onnx", "config.pbtxt")).optimization.execution_accelerators
    assert [a.name for a in accelerators.gpu_execution_accelerator] == ["tensorrt"]
    assert not accelerators.gpu_execution_accelerator[0].parameters  # no precision_mode: the graph keeps its types

    off = make_run(tmp_path / "off", {"fp32": tiny_onnx}, triton={"tensorrt_accelerator": False})
    triton.run(off)
    assert not parse(off.run.path("triton", "deploy_onnx", "config.pbtxt")).HasField("optimization")


def test_batching_and_instances_come_from_the_config(tmp_path, tiny_onnx):
    ctx = make_run(tmp_path / "a", {"fp32": tiny_onnx}, triton={
        "model_name": "edge.v2", "max_batch_size": 7, "max_queue_delay_us": 250, "instance_count": 3})
    triton.run(ctx)
    message = parse(ctx.run.path("triton", "edge.v2_onnx", "config.pbtxt"))
    assert message.max_batch_size == 7
    assert message.dynamic_batching.max_queue_delay_microseconds == 250
    assert [(g.count, model_config_pb2.ModelInstanceGroup.Kind.Name(g.kind)) for g in message.instance_group] == [
        (3, "KIND_AUTO")]

    plain = make_run(tmp_path / "b", {"fp32": tiny_onnx}, triton={"dynamic_batching": False})
    triton.run(plain)
    assert not parse(plain.run.path("triton", "deploy_onnx", "config.pbtxt")).HasField("dynamic_batching")


def test_plan_model_is_clamped_to_the_engine_profile(tmp_path, tiny_onnx):
    ctx = make_run(tmp_path, {"fp32": tiny_onnx}, triton={"max_batch_size": 64})
    plan = record_engine(ctx, max_batch=16)
    result = triton.run(ctx)

    folder = ctx.run.path("triton", "deploy_trt")
    message = parse(folder / "config.pbtxt")
    assert result.summary["models"]["deploy_trt"] == "tensorrt_plan"
    assert message.platform == "tensorrt_plan" and message.max_batch_size == 16
    assert result.summary["max_batch_size"] == {"deploy_onnx": 64, "deploy_trt": 16}
    assert any("clamped from triton.max_batch_size 64" in n for n in result.summary["notes"])
    assert config_io(message) == onnx_io(tiny_onnx)
    assert [model_config_pb2.ModelInstanceGroup.Kind.Name(g.kind) for g in message.instance_group] == ["KIND_GPU"]
    assert not message.HasField("optimization")
    assert (folder / "1" / "model.plan").read_bytes() == plan.read_bytes()
    assert "TensorRT 10.13.0" in (folder / "config.pbtxt").read_text()  # where it may run, for the reader


def test_plan_within_the_profile_keeps_the_configured_batch(tmp_path, tiny_onnx):
    ctx = make_run(tmp_path, {"fp32": tiny_onnx}, triton={"max_batch_size": 8})
    record_engine(ctx, max_batch=16)
    result = triton.run(ctx)
    assert result.summary["max_batch_size"]["deploy_trt"] == 8
    assert not any("clamped" in n for n in result.summary["notes"])


def test_plan_whose_profile_starts_above_one_is_left_out(tmp_path, tiny_onnx):
    ctx = make_run(tmp_path, {"fp32": tiny_onnx})
    record_engine(ctx, min_batch=4, max_batch=16)
    result = triton.run(ctx)
    assert "deploy_trt" not in result.summary["models"]
    assert not ctx.run.path("triton", "deploy_trt").exists()
    assert any("engine.min_batch=1" in n for n in result.summary["notes"])


def test_skipped_engine_removes_an_earlier_plan_model_and_keeps_foreign_folders(tmp_path, tiny_onnx):
    ctx = make_run(tmp_path, {"fp32": tiny_onnx})
    record_engine(ctx)
    triton.run(ctx)
    assert ctx.run.path("triton", "deploy_trt", "1", "model.plan").exists()
    foreign = ctx.run.path("triton", "hand_made")
    foreign.mkdir()
    (foreign / "config.pbtxt").write_text('name: "hand_made"\n')

    ctx.run.record("engine", {"status": "skipped", "reason": "TensorRT is not importable here", "outputs": {}})
    result = triton.run(ctx)
    assert list(result.summary["models"]) == ["deploy_onnx"]
    assert not ctx.run.path("triton", "deploy_trt").exists()
    assert foreign.exists()
    assert any("skipped: TensorRT is not importable" in n for n in result.summary["notes"])


def test_plan_built_from_another_onnx_is_refused(tmp_path, tiny_onnx):
    ctx = make_run(tmp_path, {"fp32": tiny_onnx})
    record_engine(ctx, onnx_sha="0" * 64)
    with pytest.raises(ArtifactError, match="--from engine"):
        triton.run(ctx)


def record_pruned_engine(ctx: StageContext, pruned_onnx: Path, *, max_batch: int = 8,
                         onnx_sha: str | None = None) -> Path:
    """compress's network exported (export/pruned_fp32.onnx) and its engine built next to the branch's, as the
    export and engine stages record them (the plan's bytes are opaque to the triton stage)."""
    run = ctx.run
    export = run.stage("export").model_dump(mode="json")
    onnx_path = run.path("export", "pruned_fp32.onnx")
    shutil.copyfile(pruned_onnx, onnx_path)
    outputs = {key: run.root / entry["path"] for key, entry in export["outputs"].items()}
    run.record("export", {**export, "outputs": run.describe_outputs({**outputs, "pruned_onnx_fp32": onnx_path})})
    engine = run.stage("engine").model_dump(mode="json")
    plan = run.path("engine", "pruned_fp32.plan")
    plan.write_bytes(b"serialized pruned engine bytes")
    sample = [3, 2, 2]
    info = {"tensorrt": "10.13.0", "gpu": "NVIDIA H100", "compute_capability": "9.0", "precision": "fp32",
            "profile": {"input": "input", "min": [1, *sample], "opt": [max_batch, *sample],
                        "max": [max_batch, *sample]},
            "onnx_sha256": onnx_sha or sha256_file(onnx_path)}
    sidecar = run.path("engine", "pruned_fp32.plan.json")
    sidecar.write_text(json.dumps(info))
    log = run.path("engine", "pruned_build.log")
    log.write_text("log\n")
    outputs = {key: run.root / entry["path"] for key, entry in engine["outputs"].items()}
    run.record("engine", {**engine, "outputs": run.describe_outputs(
        {**outputs, "pruned_engine": plan, "pruned_engine_info": sidecar, "pruned_build_log": log})})
    return plan


def test_the_pruned_engine_is_served_as_its_own_plan_model(tmp_path, tiny_onnx):
    ctx = make_run(tmp_path, {"fp32": tiny_onnx}, triton={"max_batch_size": 64})
    record_engine(ctx, max_batch=16)
    pruned_onnx = flatten_onnx(tmp_path / "pruned.onnx", dtype=TensorProto.FLOAT, classes=list("abcdefghijkl"))
    plan = record_pruned_engine(ctx, pruned_onnx, max_batch=8)
    result = triton.run(ctx)

    assert result.summary["models"] == {"deploy_onnx": "onnxruntime_onnx", "deploy_pruned_onnx": "onnxruntime_onnx",
                                        "deploy_trt": "tensorrt_plan", "deploy_pruned_trt": "tensorrt_plan"}
    assert result.summary["max_batch_size"] == {"deploy_onnx": 64, "deploy_pruned_onnx": 64, "deploy_trt": 16,
                                                "deploy_pruned_trt": 8}
    assert any(n.startswith("deploy_pruned_trt: max_batch_size clamped from triton.max_batch_size 64 to the "
                            "engine's profile maximum 8") for n in result.summary["notes"])
    folder = ctx.run.path("triton", "deploy_pruned_trt")
    message = parse(folder / "config.pbtxt")
    assert message.name == "deploy_pruned_trt" and message.platform == "tensorrt_plan"
    assert message.max_batch_size == 8
    assert config_io(message) == onnx_io(pruned_onnx)  # the pruned file's tensors, not the branch's
    assert [model_config_pb2.ModelInstanceGroup.Kind.Name(g.kind) for g in message.instance_group] == ["KIND_GPU"]
    assert (folder / "1" / "model.plan").read_bytes() == plan.read_bytes()
    assert "export/pruned_fp32.onnx" in (folder / "config.pbtxt").read_text()
    assert (folder / "labels.txt").read_text().splitlines() == list("abcdefghijkl")


def test_a_pruned_plan_built_from_another_onnx_is_refused(tmp_path, tiny_onnx):
    ctx = make_run(tmp_path, {"fp32": tiny_onnx})
    record_engine(ctx)
    record_pruned_engine(ctx, flatten_onnx(tmp_path / "pruned.onnx", dtype=TensorProto.FLOAT), onnx_sha="0" * 64)
    with pytest.raises(ArtifactError, match="pruned_fp32.plan was built from another pruned_fp32.onnx"):
        triton.run(ctx)


def test_io_is_read_from_the_file_not_assumed(tmp_path):
    signature = read_onnx_io(flatten_onnx(tmp_path / "i64.onnx", dtype=TensorProto.INT64))
    assert [(t.name, t.data_type, t.dims) for t in signature.inputs + signature.outputs] == [
        ("input", "TYPE_INT64", (3, 2, 2)), ("logits", "TYPE_INT64", (12,))]
    assert signature.class_names is None


def test_fixed_batch_onnx_is_rejected(tmp_path):
    with pytest.raises(PipelineError, match="dynamic batch"):
        read_onnx_io(flatten_onnx(tmp_path / "fixed.onnx", batch=1))


def test_no_labels_without_matching_class_names(tmp_path):
    ctx = make_run(tmp_path, {"fp32": flatten_onnx(tmp_path / "f.onnx", dtype=TensorProto.FLOAT, classes=["a"])})
    result = triton.run(ctx)
    assert not parse(ctx.run.path("triton", "deploy_onnx", "config.pbtxt")).output[0].label_filename
    assert "deploy_onnx/labels.txt" not in result.outputs
    assert any("no labels.txt" in n for n in result.summary["notes"])


def test_schema_check_rejects_what_triton_would(tmp_path):
    assert validate_config_text('name: "m"\nplatform: "onnxruntime_onnx"\nmax_batch_size: 4\n') is True
    with pytest.raises(PipelineError, match="ModelConfig schema"):
        validate_config_text('name: "m"\nmax_batch_sise: 4\n')
    with pytest.raises(PipelineError, match="ModelConfig schema"):
        validate_config_text('name: "m"\ninput [ { name: "x" data_type: TYPE_FLOAT32 } ]\n')


def test_disabled_stage_is_skipped(tmp_path, tiny_onnx):
    from pipeline.errors import StageSkipped

    ctx = make_run(tmp_path, {"fp32": tiny_onnx}, triton={"enabled": False})
    with pytest.raises(StageSkipped, match="triton.enabled"):
        triton.run(ctx)


@pytest.mark.slow
def test_after_the_real_export(tmp_path, exported_run):
    """The chain export (every precision) -> engine -> triton on a copy of the tiny run: one model per
    deployed file, each config agreeing with its file, the x86 int8 form on CPU instances."""
    from pipeline.deploy.tensorrt_runtime import import_tensorrt
    from tests.conftest import copy_run

    _, copy = copy_run(exported_run[:2], tmp_path / "runs", "triton")
    has_engine = import_tensorrt()[0] is not None and torch.cuda.is_available()
    assert copy.stage("engine").status == ("done" if has_engine else "skipped")
    summary = copy.stage("triton").summary
    expected = {"tiny_onnx": "fp32", "tiny_onnx_fp16": "fp16", "tiny_onnx_int8": "int8",
                "tiny_onnx_int8_cpu": "int8_cpu"}
    assert summary["models"] == {**{m: "onnxruntime_onnx" for m in expected}, "tiny_openvino_int8_cpu": "openvino",
                                 **({"tiny_trt": "tensorrt_plan"} if has_engine else {})}
    openvino = parse(copy.path("triton", "tiny_openvino_int8_cpu", "config.pbtxt"))  # the backend's documented keys
    assert (openvino.backend, openvino.platform, openvino.default_model_filename) == ("openvino", "", "model.onnx")
    assert {k: v.string_value for k, v in openvino.parameters.items()} == {"NUM_STREAMS": "1",
                                                                           "PERFORMANCE_HINT": "LATENCY"}
    assert [g.kind for g in openvino.instance_group] == [model_config_pb2.ModelInstanceGroup.KIND_CPU]
    assert config_io(openvino) == onnx_io(copy.output("export", "onnx_int8_cpu"))
    assert copy.path("triton", "tiny_openvino_int8_cpu", "1", "model.onnx").read_bytes() == \
        copy.output("export", "onnx_int8_cpu").read_bytes()
    for model, precision in expected.items():
        onnx_path = copy.output("export", f"onnx_{precision}")
        message = parse(copy.path("triton", model, "config.pbtxt"))
        assert config_io(message) == onnx_io(onnx_path)
        cpu_only = precision == "int8_cpu"  # uint8 activations: ONNX Runtime's x86 form, not for TensorRT
        kinds = model_config_pb2.ModelInstanceGroup
        assert [g.kind for g in message.instance_group] == [kinds.KIND_CPU if cpu_only else kinds.KIND_AUTO]
        assert bool(message.optimization.execution_accelerators.gpu_execution_accelerator) is not cpu_only
        labels = copy.path("triton", model, "labels.txt").read_text().splitlines()
        meta = {p.key: p.value for p in onnx.load(str(onnx_path)).metadata_props}
        assert labels == json.loads(meta["class_names"]) and len(labels) == message.output[0].dims[0]
        assert np.array_equal(np.frombuffer(copy.path("triton", model, "1", "model.onnx").read_bytes(), np.uint8),
                              np.frombuffer(onnx_path.read_bytes(), np.uint8))
