"""The engine stage and pipeline/deploy/tensorrt_runtime.py.

CPU (always): the stage skips with a reason naming TensorRT or the GPU, and the runner records it; the
profile is read from the ONNX file; the STRONGLY_TYPED flag is passed so that 10.x and 11.x share one
path; the post-build comparison and the sidecar check fail where they must.
GPU + TensorRT (marked `tensorrt`, `gpu`; skipped with the reason elsewhere): a real build of a tiny
SingleNet, its sidecar, the reused timing cache, the runner against ONNX Runtime, a parse failure."""

from __future__ import annotations

import enum
import json
import shutil
import sys
import types
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper
from rich.console import Console

from pipeline.config import validate_config
from pipeline.deploy import tensorrt_build
from pipeline.deploy.tensorrt_runtime import check_compatible, import_tensorrt, sidecar_path
from pipeline.errors import PipelineError, StageSkipped, UsageError
from pipeline.rundir import RunDir, StageRecord, sha256_file
from pipeline.runner import execute, stage_def
from pipeline.stage import StageContext
from stages import engine


def _config(tmp_path: Path, **engine_cfg):
    return validate_config({"name": "deploy", "output_root": str(tmp_path / "runs"),
                            "data": {"dataset": "synthetic", "synthetic_size": 64, "val_size": 16},
                            "export": {"check_size": 8}, "engine": engine_cfg})


def _ctx(cfg) -> StageContext:
    return StageContext(cfg, RunDir(cfg.run_dir), torch.device("cpu"))


def _recorded_export(ctx: StageContext, onnx_path: Path) -> Path:
    """`onnx_path` copied to export/model_fp32.onnx and recorded in the manifest as export's output."""
    target = ctx.run.path("export", "model_fp32.onnx")
    target.parent.mkdir(parents=True)
    shutil.copyfile(onnx_path, target)
    ctx.run.record("export", {"status": "done", "fingerprint": "test",
                              "outputs": ctx.run.describe_outputs({"onnx_fp32": target})})
    return target


@pytest.fixture
def no_tensorrt(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # `import tensorrt` raises ImportError


@pytest.fixture
def fake_tensorrt_no_gpu(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", types.ModuleType("tensorrt"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


# --- skipping ---------------------------------------------------------------------------------------

def test_skips_naming_tensorrt_where_it_is_not_importable(tmp_path, no_tensorrt):
    with pytest.raises(StageSkipped, match="TensorRT is not importable") as info:
        engine.run(_ctx(_config(tmp_path)))
    assert "pip install -e '.[tensorrt]'" in str(info.value)


def test_skips_naming_the_gpu_where_none_is_visible(tmp_path, fake_tensorrt_no_gpu):
    with pytest.raises(StageSkipped, match="no CUDA GPU"):
        engine.run(_ctx(_config(tmp_path)))


def test_skips_when_disabled(tmp_path):
    with pytest.raises(StageSkipped, match="engine.enabled is false"):
        engine.run(_ctx(_config(tmp_path, enabled=False)))


def test_runner_records_the_skip_and_goes_on_but_the_stage_alone_fails(tmp_path, no_tensorrt):
    cfg = _config(tmp_path)
    ctx = _ctx(cfg)
    assert execute(cfg, stage_def("engine"), ctx.run, ctx) == "skipped"
    entry = ctx.run.stage("engine")
    assert entry.status == "skipped" and "TensorRT" in entry.reason and entry.outputs == {}
    with pytest.raises(StageSkipped, match="TensorRT"):
        execute(cfg, stage_def("engine"), ctx.run, ctx, strict=True)


def test_runtime_module_needs_no_tensorrt_until_a_runner_is_made(tmp_path, no_tensorrt):
    from pipeline.deploy.tensorrt_runtime import TensorRTRunner

    assert import_tensorrt()[0] is None
    with pytest.raises(PipelineError, match="TensorRT is not importable"):
        TensorRTRunner(tmp_path / "model_fp32.plan")


# --- what the build is made of (CPU) --------------------------------------------------------------------

def test_profile_reads_input_name_and_image_shape_from_the_onnx(tmp_path, tiny_onnx):
    cfg = _config(tmp_path, min_batch=2, opt_batch=8, max_batch=32).engine
    profile = tensorrt_build.batch_profile(tiny_onnx, cfg)
    assert profile.input_name == "input" and profile.sample_shape == (1, 16, 16)
    assert profile.shapes() == ((2, 1, 16, 16), (8, 1, 16, 16), (32, 1, 16, 16))
    assert profile.to_dict() == {"input": "input", "min": [2, 1, 16, 16], "opt": [8, 1, 16, 16],
                                 "max": [32, 1, 16, 16]}


def _graph(path: Path, inputs: list, output_shape: list) -> Path:
    nodes = [helper.make_node("Identity", [inputs[0].name], ["logits"])]
    graph = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info("logits", TensorProto.FLOAT,
                                                                                  output_shape)])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)]), str(path))
    return path


def test_profile_refuses_onnx_it_cannot_describe(tmp_path):
    cfg = _config(tmp_path).engine
    two = _graph(tmp_path / "two.onnx", [helper.make_tensor_value_info("a", TensorProto.FLOAT, ["N", 3]),
                                         helper.make_tensor_value_info("b", TensorProto.FLOAT, ["N", 3])], ["N", 3])
    with pytest.raises(PipelineError, match="exactly one"):
        tensorrt_build.batch_profile(two, cfg)
    free = _graph(tmp_path / "free.onnx", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, "H", "W"])],
                  ["N", 3, "H", "W"])
    with pytest.raises(PipelineError, match="fixed image size"):
        tensorrt_build.batch_profile(free, cfg)


@pytest.mark.parametrize("member, expected", [(1, 1 << 1), (0, 1 << 0), (None, 0)],
                         ids=["10.x (EXPLICIT_BATCH=0, STRONGLY_TYPED=1)", "11.x (STRONGLY_TYPED=0)", "no member"])
def test_strongly_typed_flag_is_passed_by_its_own_value(member, expected):
    flags = types.SimpleNamespace() if member is None else types.SimpleNamespace(STRONGLY_TYPED=member)
    value, text = tensorrt_build.network_flags(types.SimpleNamespace(NetworkDefinitionCreationFlag=flags))
    assert value == expected
    assert text.startswith("STRONGLY_TYPED" if member is not None else "none")


def test_comparison_limits_per_precision(tmp_path):
    cfg = _config(tmp_path, fp32_atol=1e-3, fp16_atol=1e-2, int8_min_agreement=0.75, fp32_rtol=0, fp16_rtol=0).engine
    reference = np.array([[0.0, 1.0, 2.0], [3.0, 1.0, 0.0], [0.0, 5.0, 1.0], [1.0, 0.0, 0.0]], np.float32)

    close = tensorrt_build.compare_outputs(reference + 5e-4, reference, "fp32", cfg)
    assert close["passed"] and close["problem"] is None and close["top1_agreement"] == 1.0
    far = tensorrt_build.compare_outputs(reference + 5e-3, reference, "fp32", cfg)
    assert not far["passed"] and "engine.fp32_atol" in far["problem"]
    assert tensorrt_build.compare_outputs(reference + 5e-3, reference, "fp16", cfg)["passed"]

    flipped = reference.copy()
    flipped[0] = [2.0, 1.0, 0.0]  # one of four top-1 changes: 75 % agreement
    assert tensorrt_build.compare_outputs(flipped, reference, "int8", cfg)["passed"]
    flipped[1] = [0.0, 3.0, 0.0]
    worse = tensorrt_build.compare_outputs(flipped, reference, "int8", cfg)
    assert not worse["passed"] and "engine.int8_min_agreement" in worse["problem"]

    nan = reference.copy()
    nan[2, 1] = np.nan
    assert "non-finite" in tensorrt_build.compare_outputs(nan, reference, "fp16", cfg)["problem"]


def test_comparison_bound_scales_with_the_logits_and_fails_another_models_answer(tmp_path):
    """The default bounds (atol + rtol x each image's largest |logit|) take TF32/fp16-sized rounding of logits in
    the tens of thousands (a resnet18 after one epoch reaches 8e4), which an absolute bound alone fails, and
    still fail another model's logits of the same scale."""
    cfg = _config(tmp_path).engine
    rng = np.random.default_rng(0)
    reference = (rng.normal(0, 1, (8, 10)) * 2e4).astype(np.float32)
    rounded = (reference * (1 + rng.normal(0, 1e-3, reference.shape))).astype(np.float32)
    another = np.roll(reference, 1, axis=0)
    for precision in ("fp32", "fp16"):
        close = tensorrt_build.compare_outputs(rounded, reference, precision, cfg)
        assert close["passed"] and close["rtol"] == getattr(cfg, f"{precision}_rtol") > 0, close
        far = tensorrt_build.compare_outputs(another, reference, precision, cfg)
        assert not far["passed"] and f"engine.{precision}_atol, engine.{precision}_rtol" in far["problem"], far
        assert "on 8 of 8 images" in far["problem"]
    absolute = _config(tmp_path, fp32_rtol=0).engine
    assert not tensorrt_build.compare_outputs(rounded, reference, "fp32", absolute)["passed"]
    assert "output shape" in tensorrt_build.compare_outputs(reference[:, :2], reference, "fp32", cfg)["problem"]


def test_validation_images_fit_the_profile(tmp_path):
    cfg = _config(tmp_path, min_batch=1, opt_batch=4, max_batch=4)
    profile = tensorrt_build.BatchProfile("input", (3, 16, 16), 1, 4, 4)
    assert engine.validation_images(cfg, profile).shape == (4, 3, 16, 16)  # export.check_size 8, clamped to 4
    big = tensorrt_build.BatchProfile("input", (3, 16, 16), 24, 32, 64)  # more than the 16 validation images
    images = engine.validation_images(cfg, big)
    assert images.shape[0] == 24 and torch.equal(images[16:], images[:8])


def test_a_plan_is_refused_on_another_gpu_or_tensorrt_version():
    info = {"tensorrt": "10.13.0", "gpu": "NVIDIA H100 80GB HBM3"}
    check_compatible(info, "10.13.0", "NVIDIA H100 80GB HBM3")
    with pytest.raises(PipelineError, match="NVIDIA L4.*rebuild it here"):
        check_compatible(info, "10.13.0", "NVIDIA L4")
    with pytest.raises(PipelineError, match="TensorRT 11.4.0"):
        check_compatible(info, "11.4.0", "NVIDIA H100 80GB HBM3")


def test_sidecar_sits_beside_the_plan():
    assert sidecar_path(Path("run/engine/model_int8.plan")) == Path("run/engine/model_int8.plan.json")


# --- the build's control flow, against a stand-in for the TensorRT API (CPU) -----------------------------

def fake_tensorrt(*, plan: bytes | None = b"PLAN", parse_errors: tuple[str, ...] = (), cache_fits: bool = True):
    """Only the TensorRT calls the engine stage makes (names and signatures as documented for 10.x/11.x),
    recording them. `plan=None`: build_serialized_network fails as TensorRT does, returning None."""
    calls: list[tuple] = []

    class Severity(enum.IntEnum):
        INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = range(5)

    class ILogger:
        def __init__(self):
            pass

    ILogger.Severity = Severity
    BuilderFlag = enum.Enum("BuilderFlag", ["TF32", "DEBUG"])

    class Cache:
        def __init__(self, data: bytes):
            self.data = data

        def serialize(self) -> bytes:
            return b"timings"

    class Config:
        builder_optimization_level = 3

        def __init__(self):
            self.pools: dict = {}

        def set_memory_pool_limit(self, pool, size):
            calls.append(("workspace", pool, size))
            self.pools[pool] = size

        def get_memory_pool_limit(self, pool):
            return self.pools[pool]

        def get_flag(self, flag):
            return flag is BuilderFlag.TF32

        def add_optimization_profile(self, profile):
            calls.append(("profile", *profile.shape))
            return 0

        def create_timing_cache(self, data):
            calls.append(("create_timing_cache", bytes(data)))
            return Cache(bytes(data))

        def set_timing_cache(self, cache, ignore_mismatch):
            calls.append(("set_timing_cache", cache.data, ignore_mismatch))
            return cache_fits or not cache.data

    class Profile:
        def set_shape(self, name, low, opt, high):
            self.shape = (name, tuple(low), tuple(opt), tuple(high))

    def tensor(name, shape):
        return types.SimpleNamespace(name=name, dtype=types.SimpleNamespace(name="FLOAT"), shape=shape)

    class Network:
        num_inputs = num_outputs = 1

        def get_input(self, i):
            return tensor("input", (-1, 1, 16, 16))

        def get_output(self, i):
            return tensor("logits", (-1, 4))

    class Builder:
        def __init__(self, logger):
            self.logger = logger

        def create_network(self, flags):
            calls.append(("create_network", flags))
            return Network()

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            self.logger.log(Severity.INFO, "[MemUsageChange] building")
            self.logger.log(Severity.VERBOSE, "tactic chatter")
            if plan is None:
                self.logger.log(Severity.ERROR, "no implementation for layer /conv1")
            return plan

    class OnnxParser:
        def __init__(self, network, logger):
            self.num_errors = len(parse_errors)

        def parse_from_file(self, path):
            calls.append(("parse_from_file", path))
            return not parse_errors

        def get_error(self, index):
            return parse_errors[index]

    trt = types.SimpleNamespace(__version__="11.4.0", ILogger=ILogger, BuilderFlag=BuilderFlag, Builder=Builder,
                                OnnxParser=OnnxParser, NetworkDefinitionCreationFlag=types.SimpleNamespace(
                                    STRONGLY_TYPED=0), MemoryPoolType=types.SimpleNamespace(WORKSPACE="WORKSPACE"))
    return trt, calls


def _build(trt, onnx_path: Path, out: Path):
    profile = tensorrt_build.BatchProfile("input", (1, 16, 16), 1, 4, 8)
    return tensorrt_build.build_engine(trt, onnx_path, out / "model_fp32.plan", profile, workspace_mb=64,
                               timing_cache=out / "timing.cache", log_path=out / "build.log",
                               console=Console(quiet=True))


def test_build_makes_the_documented_calls_and_logs_the_config_first(tmp_path, tiny_onnx):
    trt, calls = fake_tensorrt()
    figures = _build(trt, tiny_onnx, tmp_path)
    assert calls == [
        ("create_network", 1 << 0),  # STRONGLY_TYPED
        ("parse_from_file", str(tiny_onnx)),
        ("workspace", "WORKSPACE", 64 << 20),
        ("profile", "input", (1, 1, 16, 16), (4, 1, 16, 16), (8, 1, 16, 16)),
        ("create_timing_cache", b""), ("set_timing_cache", b"", False),
    ]
    assert (tmp_path / "model_fp32.plan").read_bytes() == b"PLAN"
    assert (tmp_path / "timing.cache").read_bytes() == b"timings"
    log = (tmp_path / "build.log").read_text().splitlines()
    assert log[0] == "TensorRT 11.4.0: building with this configuration"
    assert "  builder flags      | [TF32]" in log and "  memory pools       | WORKSPACE 64 MiB" in log
    assert "[INFO] [MemUsageChange] building" in log and not any("tactic chatter" in line for line in log)
    assert figures["timing_cache"] == "timing.cache new" and figures["network_flags"] == "STRONGLY_TYPED"

    trt, calls = fake_tensorrt()
    assert _build(trt, tiny_onnx, tmp_path)["timing_cache"] == "timing.cache reused (7 bytes)"
    assert ("set_timing_cache", b"timings", False) in calls


def test_a_timing_cache_from_another_gpu_is_replaced(tmp_path, tiny_onnx):
    (tmp_path / "timing.cache").write_bytes(b"other gpu")
    trt, calls = fake_tensorrt(cache_fits=False)
    assert "another GPU" in _build(trt, tiny_onnx, tmp_path)["timing_cache"]
    assert [c for c in calls if c[0] == "create_timing_cache"] == [("create_timing_cache", b"other gpu"),
                                                                 ("create_timing_cache", b"")]


def test_a_failed_build_is_one_error_naming_the_log(tmp_path, tiny_onnx):
    trt, _ = fake_tensorrt(plan=None)
    with pytest.raises(PipelineError, match="build_serialized_network returned None") as info:
        _build(trt, tiny_onnx, tmp_path)
    assert str(tmp_path / "build.log") in str(info.value)
    assert "[ERROR] no implementation for layer /conv1" in (tmp_path / "build.log").read_text()
    assert not (tmp_path / "model_fp32.plan").exists() and not (tmp_path / "timing.cache").exists()


def test_parser_errors_are_read_out(tmp_path, tiny_onnx):
    trt, _ = fake_tensorrt(parse_errors=("node /conv1: unsupported op", "node /fc: bad weights"))
    with pytest.raises(PipelineError, match=r"cannot parse model_fp32.onnx: node /conv1: unsupported op \(and 1 more"):
        _build(trt, tiny_onnx, tmp_path)
    log = (tmp_path / "build.log").read_text()
    assert "parser error: node /conv1" in log and "parser error: node /fc" in log


def test_stage_writes_plan_sidecar_and_log(tmp_path, tiny_onnx, monkeypatch):
    trt, _ = fake_tensorrt()
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    cfg = _config(tmp_path, min_batch=1, opt_batch=4, max_batch=8, verify=False)
    ctx = _ctx(cfg)
    target = _recorded_export(ctx, tiny_onnx)

    result = engine.run(ctx)
    assert {k: p.name for k, p in result.outputs.items()} == {
        "engine": "model_fp32.plan", "engine_info": "model_fp32.plan.json", "build_log": "build.log"}
    info = json.loads(result.outputs["engine_info"].read_text())
    assert {k: info[k] for k in ("tensorrt", "gpu", "compute_capability", "precision", "onnx")} == {
        "tensorrt": "11.4.0", "gpu": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0", "precision": "fp32",
        "onnx": "export/model_fp32.onnx"}
    assert info["onnx_sha256"] == sha256_file(target) and info["plan_sha256"] == sha256_file(result.outputs["engine"])
    assert info["profile"]["max"] == [8, 1, 16, 16] and info["check"] is None
    assert result.outputs["engine"].read_bytes() == b"PLAN"  # nothing added to the plan itself
    assert result.summary["branch"]["gpu"] == "NVIDIA H100 80GB HBM3"
    assert info["precision_why"] == result.summary["why"] == "int8 not exported; fp16 not exported; auto: fp32"


def _export_entry(deployed: list[str], rejected: dict[str, str]) -> StageRecord:
    output = {"path": "export/model.onnx", "sha256": "0" * 64, "bytes": 1}
    return StageRecord(status="done", outputs={f"onnx_{p}": output for p in deployed},
                       summary={"branch": {**{p: {"passed": True, "drop": 0.1} for p in deployed},
                                           **{p: {"passed": False, "reason": why} for p, why in rejected.items()}}})


@pytest.mark.parametrize("setting, deployed, rejected, expected", [
    ("auto", ["fp32", "fp16", "int8"], {}, ("int8", "auto: int8 passed the export accuracy guard (-0.10 top-1 "
                                                    "points vs fp32 on validation)")),
    ("auto", ["fp32", "fp16"], {"int8": "int8 loses 3 points"},
     ("fp16", "int8 not deployed (int8 loses 3 points); auto: fp16 passed the export accuracy guard (-0.10 top-1 "
              "points vs fp32 on validation)")),
    ("auto", ["fp32", "int8_cpu"], {}, ("fp32", "int8 not exported; fp16 not exported; auto: fp32")),
    ("fp16", ["fp32", "fp16", "int8"], {}, ("fp16", "engine.precision in the config")),
])
def test_engine_precision_is_the_lowest_the_guard_deployed(tmp_path, setting, deployed, rejected, expected):
    cfg = validate_config({"export": {"precisions": ["fp32", "fp16", "int8"]}, "engine": {"precision": setting}})
    assert engine.choose_precision(cfg.engine, _export_entry(deployed, rejected)) == expected


def test_an_engine_is_never_built_from_a_model_the_guard_rejected(tmp_path):
    raw = {"name": "deploy", "output_root": str(tmp_path), "export": {"precisions": ["fp32", "int8"]},
           "engine": {"precision": "int8"}}
    with pytest.raises(PipelineError, match=r"engine.precision int8: that ONNX is not deployed \(int8 loses 3 "
                                            r"points\); set engine.precision: auto"):
        engine.choose_precision(validate_config(raw).engine, _export_entry(["fp32"], {"int8": "int8 loses 3 points"}))


# --- GPU + TensorRT ---------------------------------------------------------------------------------

def _tensorrt_or_skip():
    trt, reason = import_tensorrt()
    if trt is None:
        pytest.skip(reason)
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU visible: a TensorRT engine is built and run on a GPU")
    return trt


@pytest.fixture
def built(tmp_path, tiny_onnx):
    """The engine stage run for real on the tiny ONNX (export recorded as done in the manifest)."""
    _tensorrt_or_skip()
    cfg = _config(tmp_path, min_batch=1, opt_batch=4, max_batch=8, workspace_mb=256)
    ctx = _ctx(cfg)
    _recorded_export(ctx, tiny_onnx)
    return ctx, engine.run(ctx)


@pytest.mark.tensorrt
@pytest.mark.gpu
def test_build_writes_plan_sidecar_log_and_a_reusable_timing_cache(built):
    import tensorrt as trt

    ctx, result = built
    plan, info_path, log = (result.outputs[k] for k in ("engine", "engine_info", "build_log"))
    assert plan.name == "model_fp32.plan" and info_path.name == "model_fp32.plan.json"
    info = json.loads(info_path.read_text())
    assert info["tensorrt"] == trt.__version__ and info["gpu"] == torch.cuda.get_device_name()
    assert info["compute_capability"] == "{}.{}".format(*torch.cuda.get_device_capability())
    assert info["profile"] == {"input": "input", "min": [1, 1, 16, 16], "opt": [4, 1, 16, 16], "max": [8, 1, 16, 16]}
    assert info["check"]["passed"] and info["check"]["images"] == 8
    assert b"compute_capability" not in plan.read_bytes()  # the metadata lives beside the plan, not in it
    text = log.read_text()
    assert text.startswith(f"TensorRT {trt.__version__}: building with this configuration")
    assert "WORKSPACE 256 MiB" in text and "STRONGLY_TYPED" in text
    assert ctx.run.path("engine", "timing.cache").stat().st_size > 0

    again = engine.run(ctx)
    assert "reused" in again.summary["timing_cache"]


@pytest.mark.tensorrt
@pytest.mark.gpu
def test_runner_matches_onnx_runtime_across_the_profile(built, tiny_onnx):
    import onnxruntime as ort

    from pipeline.deploy.tensorrt_runtime import TensorRTRunner

    _, result = built
    runner = TensorRTRunner(result.outputs["engine"])
    assert (runner.min_batch, runner.opt_batch, runner.max_batch) == (1, 4, 8)
    assert runner.input_name == "input" and runner.outputs == ["logits"]
    session = ort.InferenceSession(str(tiny_onnx), providers=["CPUExecutionProvider"])
    for batch in (1, 3, 8):
        x = torch.randn(batch, 1, 16, 16)
        got = runner(x.cuda())
        torch.cuda.synchronize()
        expected = session.run(None, {"input": x.numpy()})[0]
        assert got.shape == (batch, 4)
        np.testing.assert_allclose(got.cpu().numpy(), expected, atol=1e-2)
    assert runner.stream is not None and runner.stream != torch.cuda.default_stream()  # its own stream
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):  # the caller's current stream is honoured: results ready on it
        x = torch.randn(8, 1, 16, 16, device="cuda")
        again = runner(x)
        copied = again.cpu()
    np.testing.assert_allclose(copied.numpy(), session.run(None, {"input": x.cpu().numpy()})[0], atol=1e-2)
    with pytest.raises(UsageError, match="outside the engine's profile"):
        runner(torch.randn(9, 1, 16, 16).cuda())
    with pytest.raises(UsageError, match="CUDA tensor"):
        runner(torch.randn(1, 1, 16, 16))


@pytest.mark.tensorrt
@pytest.mark.gpu
def test_parse_failure_is_one_error_and_the_log_is_kept(tmp_path):
    trt = _tensorrt_or_skip()
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not an onnx file")
    profile = tensorrt_build.BatchProfile("input", (1, 16, 16), 1, 1, 1)
    log = tmp_path / "build.log"
    with pytest.raises(PipelineError, match="cannot parse broken.onnx"):
        tensorrt_build.build_engine(trt, broken, tmp_path / "model.plan", profile, workspace_mb=64,
                            timing_cache=tmp_path / "timing.cache", log_path=log, console=Console(quiet=True))
    assert "parser error" in log.read_text()
    assert not (tmp_path / "model.plan").exists()
