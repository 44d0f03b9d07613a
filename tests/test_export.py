"""export: ONNX parity with PyTorch in ONNX Runtime (CPU), metadata, fp16, int8 Q/DQ and its calibration data."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper

from pipeline.deploy import quantize
from pipeline.deploy.quantize import nonzero_zero_points, unquantized_nodes
from pipeline.errors import PipelineError
from pipeline.rundir import RunDir, sha256_file
from pipeline.runner import run_stages
from pipeline.training import checkpoint
from pipeline.training.data import load_datasets
from stages.export import _write_checked, check_onnx, compare
from tests.conftest import make_ctx

CPU = ["CPUExecutionProvider"]
INT8_MIN_AGREEMENT = 0.9  # the tiny model after 2 epochs, on all 64 validation images


class Replay(quantize.CalibrationDataReader):
    def __init__(self, batches: list[dict]):
        self.batches = iter(batches)

    def get_next(self) -> dict | None:
        return next(self.batches, None)


@pytest.fixture(scope="module")
def exported(trained_run, tmp_path_factory):
    """A copy of the trained run taken through export (fp32, fp16, int8), with every calibration batch
    that reached ONNX Runtime's quantizer recorded."""
    cfg, run = trained_run
    dest = tmp_path_factory.mktemp("export")
    shutil.copytree(run.root, dest / cfg.name)
    export = cfg.export.model_copy(update={"precisions": ["fp32", "fp16", "int8"]})
    cfg = cfg.model_copy(update={"output_root": dest, "export": export})
    run = RunDir(cfg.run_dir)
    fed: list[np.ndarray] = []
    real = quantize.quantize_static

    def spy(model_in, model_out, reader, **kwargs):
        batches = list(iter(reader.get_next, None))
        fed.extend(b["input"] for b in batches)
        return real(model_in, model_out, Replay(batches), **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(quantize, "quantize_static", spy)
        run_stages(cfg, run, make_ctx(cfg, run), until="export")
    return cfg, run, fed


@pytest.fixture(scope="module")
def reference(exported):
    """Validation images and the stripped branch's PyTorch logits for them."""
    cfg, run, _ = exported
    model, _ = checkpoint.load_model(run.output("strip", "model"))
    images = next(load_datasets(cfg.data).val.batches(64))[0]
    with torch.no_grad():
        return images, model(images).numpy()


def run_onnx(path: Path, images: torch.Tensor) -> np.ndarray:
    return ort.InferenceSession(str(path), providers=CPU).run(["logits"], {"input": images.numpy()})[0]


def test_fp32_matches_pytorch_at_other_batch_sizes(exported, reference):
    cfg, run, _ = exported
    path = run.output("export", "onnx_fp32")
    model = onnx.load(str(path))
    assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [cfg.export.opset]
    batch_dim = model.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param and not batch_dim.dim_value  # dynamic
    images, logits = reference
    assert cfg.export.check_size == 16  # the export batch; check others
    for size in (1, 5, 64):
        got = run_onnx(path, images[:size])
        assert got.shape == (size, 4)
        assert np.abs(got - logits[:size]).max() <= 1e-4
        assert (got.argmax(1) == logits[:size].argmax(1)).all()
    summary = run.stage("export")["summary"]["fp32"]
    assert summary["max_abs_diff"] <= cfg.export.atol and summary["top1_agreement"] == 1.0
    assert summary["inputs"] == [{"name": "input", "shape": ["batch", 3, 16, 16], "dtype": "float32"}]
    assert summary["outputs"] == [{"name": "logits", "shape": ["batch", 4], "dtype": "float32"}]
    assert summary["bytes"] == path.stat().st_size


def test_metadata_round_trip(exported):
    cfg, run, _ = exported
    data = load_datasets(cfg.data)
    branch = checkpoint.load(run.output("strip", "model"))
    for precision in cfg.export.precisions:
        path = run.output("export", f"onnx_{precision}")
        meta = ort.InferenceSession(str(path), providers=CPU).get_modelmeta().custom_metadata_map
        assert meta == {p.key: p.value for p in onnx.load(str(path)).metadata_props}
        assert json.loads(meta["class_names"]) == data.class_names
        assert json.loads(meta["input_shape"]) == list(data.input_shape)
        assert json.loads(meta["mean"]) == list(data.mean) and json.loads(meta["std"]) == list(data.std)
        assert meta["dataset"] == "synthetic" and meta["precision"] == precision
        assert int(meta["branch"]) == branch["branch"] == run.stage("select")["summary"]["branch"]
        assert meta["source_sha256"] == sha256_file(run.output("train", "model"))
        assert meta["checkpoint_sha256"] == sha256_file(run.output("strip", "model"))


def test_fp16_within_tolerance(exported, reference):
    cfg, run, _ = exported
    path = run.output("export", "onnx_fp16")
    model = onnx.load(str(path))
    conv_weights = {n.input[1] for n in model.graph.node if n.op_type == "Conv"}
    dtypes = {i.data_type for i in model.graph.initializer if i.name in conv_weights}
    assert dtypes == {onnx.TensorProto.FLOAT16}  # really converted...
    io = [v.type.tensor_type.elem_type for v in (*model.graph.input, *model.graph.output)]
    assert io == [onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT]  # ...with float32 input and output
    images, logits = reference
    got = run_onnx(path, images)
    assert np.abs(got - logits).max() <= cfg.export.fp16_atol == 0.05
    summary = run.stage("export")["summary"]["fp16"]
    assert summary["max_abs_diff"] <= 0.05 and summary["top1_agreement"] >= 0.9


def test_int8_has_qdq_around_every_conv_and_gemm(exported, reference):
    cfg, run, _ = exported
    path = run.output("export", "onnx_int8")
    onnx.checker.check_model(str(path), full_check=True)
    model = onnx.load(str(path))
    nodes = [n for n in model.graph.node if n.op_type in ("Conv", "Gemm")]
    assert len(nodes) == 22 and unquantized_nodes(model) == [] and nonzero_zero_points(model) == []
    weights = {i.name: i for i in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}
    for node in nodes:  # weights stored as int8 behind a DequantizeLinear
        assert weights[producers[node.input[1]].input[0]].data_type == onnx.TensorProto.INT8
    images, logits = reference
    got = run_onnx(path, images)
    agreement = float((got.argmax(1) == logits.argmax(1)).mean())
    assert agreement >= INT8_MIN_AGREEMENT, agreement
    summary = run.stage("export")["summary"]["int8"]
    assert summary["top1_agreement"] >= cfg.export.int8_min_agreement
    assert summary["calibration_images"] == cfg.export.calibration_size and summary["calibration_split"] == "train"


def test_calibration_reads_only_training_images(exported):
    cfg, _, fed = exported
    data = load_datasets(cfg.data)
    calibration = np.concatenate(fed)
    assert len(calibration) == cfg.export.calibration_size == 32

    def normalised(split) -> set[bytes]:
        return {img.numpy().tobytes() for img in split.normalise(split.images)}

    train, val, test = normalised(data.train), normalised(data.val), normalised(data.test)
    seen = {img.tobytes() for img in calibration}
    assert len(seen) == 32 and seen <= train
    assert not seen & val and not seen & test
    again = quantize.calibration_images(data.train, 32, cfg.seed)  # deterministic
    assert {img.numpy().tobytes() for img in again.normalise(again.images)} == seen


def test_qdq_check_finds_an_unquantized_conv_and_a_zero_point(exported):
    _, run, _ = exported
    model = onnx.load(str(run.output("export", "onnx_int8")))
    producers = {o: n for n in model.graph.node for o in n.output}
    conv = next(n for n in model.graph.node if n.op_type == "Conv")
    dq = producers[conv.input[0]]
    conv.input[0] = producers[dq.input[0]].input[0]  # feed the float tensor straight in
    assert unquantized_nodes(model) == [f"Conv {conv.name or conv.output[0]}"]
    zero = next(i for i in model.graph.initializer if i.name == dq.input[2])
    zero.CopyFrom(numpy_helper.from_array(np.array(3, dtype=np.int8), zero.name))
    assert len(nonzero_zero_points(model)) >= 1


def test_check_rejects_a_model_with_a_wrong_weight(exported, reference, tmp_path):
    _, run, _ = exported
    images, logits = reference
    model = onnx.load(str(run.output("export", "onnx_fp32")))
    fc = next(n for n in model.graph.node if n.op_type == "Gemm")
    bias = next(i for i in model.graph.initializer if i.name == fc.input[2])
    bias.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(bias) + np.float32(1e-3), bias.name))
    broken = tmp_path / "broken.onnx"
    onnx.save(model, str(broken))
    onnx.checker.check_model(str(broken), full_check=True)  # structurally fine: only the parity check sees it
    with pytest.raises(PipelineError, match=r"max abs logit diff \S+ > atol 0\.0001") as info:
        check_onnx(broken, images, logits, CPU, atol=1e-4, same_top1=True)
    reported = float(str(info.value).split("max abs logit diff ")[1].split()[0])
    assert reported == pytest.approx(1e-3, rel=0.05)


def test_check_rejects_an_invalid_graph(exported, reference, tmp_path):
    _, run, _ = exported
    images, logits = reference
    model = onnx.load(str(run.output("export", "onnx_fp32")))
    del model.graph.node[-1]  # the output 'logits' is no longer produced
    broken = tmp_path / "invalid.onnx"
    onnx.save(model, str(broken))
    with pytest.raises(PipelineError, match="fails onnx.checker"):
        check_onnx(broken, images, logits, CPU, atol=1e-4)


def test_check_collects_every_mismatch(exported, reference):
    _, run, _ = exported
    images, logits = reference
    shuffled = np.roll(logits, 1, axis=1)  # every top-1 changes, values far off
    with pytest.raises(PipelineError) as info:
        check_onnx(run.output("export", "onnx_fp32"), images[:8], shuffled[:8], CPU, atol=1e-4, same_top1=True)
    message = str(info.value)
    assert "batch 8: max abs logit diff" in message and "batch 1: max abs logit diff" in message
    assert "top-1 differs on 8 of 8 images" in message and "export.opset" in message
    with pytest.raises(PipelineError, match=r"agreement with fp32 0\.0% < 90\.0%.*calibration_size"):
        check_onnx(run.output("export", "onnx_int8"), images[:8], shuffled[:8], CPU, atol=None, min_agreement=0.9,
                   label="int8")
    figures, problems = compare(logits[:4], logits[:4], atol=1e-4)
    assert problems == [] and figures["top1_agreement"] == 1.0 and figures["max_abs_diff"] == 0.0


def test_failed_check_writes_nothing(exported, tmp_path):
    _, run, _ = exported
    model = onnx.load(str(run.output("export", "onnx_fp32")))
    target = tmp_path / "model_fp32.onnx"

    def failing(path: Path) -> dict:
        assert path.exists() and path != target
        raise PipelineError("check failed")

    with pytest.raises(PipelineError):
        _write_checked(model, target, {"precision": "fp32"}, failing)
    assert list(tmp_path.iterdir()) == []


def test_summary_per_precision(exported):
    cfg, run, _ = exported
    summary = run.stage("export")["summary"]
    assert set(run.stage("export")["outputs"]) == {"onnx_fp32", "onnx_fp16", "onnx_int8"}
    for precision in ("fp32", "fp16", "int8"):
        figures = summary[precision]
        assert figures["opset"] == cfg.export.opset
        assert figures["bytes"] == run.output("export", f"onnx_{precision}").stat().st_size
        assert 0.0 <= figures["top1_agreement"] <= 1.0 and figures["max_abs_diff"] >= 0.0
    assert summary["int8"]["bytes"] < summary["fp32"]["bytes"]


def test_calibration_ranges_cover_every_batch(exported, tmp_path):
    """The input's int8 scale comes from all calibration batches, the first one included."""
    cfg, run, _ = exported
    train = load_datasets(cfg.data).train
    images = quantize.calibration_images(train, 4 * quantize.CALIBRATION_BATCH, cfg.seed)
    images.images[0] = 255  # the brightest image, in the first batch only
    out = tmp_path / "int8.onnx"
    quantize.quantize_int8(run.output("export", "onnx_fp32"), out, images)
    model = onnx.load(str(out))
    scales = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    node = next(n for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == "input")
    expected = float(images.normalise(images.images).abs().max()) / 127
    assert float(scales[node.input[1]]) == pytest.approx(expected, rel=1e-3)
