"""export: ONNX parity with PyTorch in ONNX Runtime (CPU), metadata, fp16, int8 Q/DQ and its calibration data."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper

from pipeline.deploy import quantize
from pipeline.deploy.guard import guard
from pipeline.deploy.quantize import Recipe, calibration_images, nonzero_zero_points, unquantized_nodes
from pipeline.deploy.runtime import parity
from pipeline.errors import PipelineError
from pipeline.rundir import sha256_file
from pipeline.training import checkpoint
from pipeline.training.data import load_datasets
from stages.export import _write_checked, check_onnx
from tests.conftest import ANY_ACCURACY, copy_run

CPU = ["CPUExecutionProvider"]


def export_copy(trained_run, dest: Path, **export) -> tuple:
    """A copy of the trained run taken through export with `export` settings."""
    return copy_run(trained_run, dest, "export", export=export)


@pytest.fixture(scope="module")
def exported(exported_run):
    return exported_run


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
    summary = run.stage("export").summary["branch"]["fp32"]
    assert summary["max_abs_diff"] <= cfg.export.atol and summary["top1_agreement"] == 1.0
    assert summary["inputs"] == [{"name": "input", "shape": ["batch", 3, 16, 16], "dtype": "float32"}]
    assert summary["outputs"] == [{"name": "logits", "shape": ["batch", 4], "dtype": "float32"}]
    assert summary["bytes"] == path.stat().st_size


def test_one_e_onnx_equals_the_full_models_gated_ensemble(exported, reference):
    cfg, run, _ = exported
    full, _ = checkpoint.load_model(run.output("train", "model"))
    images, _ = reference
    with torch.no_grad():
        teacher = full.eval()(images).teacher.numpy()
    got = run_onnx(run.output("export", "ensemble_onnx_fp32"), images)
    assert np.abs(got - teacher).max() <= cfg.export.atol
    assert (got.argmax(1) == teacher.argmax(1)).all()
    assert not np.allclose(teacher, reference[1], atol=1e-2)  # the ensemble, not the kept branch
    assert set(run.stage("export").summary["ensemble"]) == {"fp32", "fp16", "int8", "int8_cpu"}


def test_metadata_round_trip(exported):
    cfg, run, _ = exported
    data = load_datasets(cfg.data)
    branch = checkpoint.load(run.output("strip", "model"))
    for key in run.stage("export").outputs:
        path = run.output("export", key)
        meta = ort.InferenceSession(str(path), providers=CPU).get_modelmeta().custom_metadata_map
        assert meta == {p.key: p.value for p in onnx.load(str(path)).metadata_props}
        assert json.loads(meta["class_names"]) == data.class_names
        assert json.loads(meta["input_shape"]) == list(data.input_shape)
        assert json.loads(meta["mean"]) == list(data.mean) and json.loads(meta["std"]) == list(data.std)
        assert meta["dataset"] == "synthetic" and meta["precision"] == key.rsplit("onnx_", 1)[1]
        assert meta["model"] == ("one-e" if key.startswith("ensemble") else "branch")
        assert int(meta["branch"]) == branch["branch"] == run.stage("select").summary["branch"]
        assert meta["source_sha256"] == sha256_file(run.output("train", "model"))
        assert meta["checkpoint_sha256"] == sha256_file(run.output("strip", "model"))
        # no source locations: a shipped file names no path of the machine that exported it
        assert str(Path(__file__).resolve().parent.parent).encode() not in path.read_bytes()


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
    summary = run.stage("export").summary["branch"]["fp16"]
    assert summary["max_abs_diff"] <= 0.05 and summary["passed"]


def _conv_gemm(model: onnx.ModelProto) -> list:
    return [n for n in model.graph.node if n.op_type in ("Conv", "Gemm")]


def test_tensorrt_int8_has_symmetric_qdq_around_every_conv_and_gemm(exported):
    cfg, run, _ = exported
    path = run.output("export", "onnx_int8")
    onnx.checker.check_model(str(path), full_check=True)
    model = onnx.load(str(path))
    assert len(_conv_gemm(model)) == 22 and unquantized_nodes(model) == [] and nonzero_zero_points(model) == []
    weights = {i.name: i for i in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}
    for node in _conv_gemm(model):  # weights stored as int8 behind a DequantizeLinear
        assert weights[producers[node.input[1]].input[0]].data_type == onnx.TensorProto.INT8
    summary = run.stage("export").summary["branch"]["int8"]
    assert summary["recipe"]["label"] == "minmax, every layer int8"  # the first recipe: any accuracy passes
    assert summary["calibration_images"] == cfg.export.calibration_size and summary["calibration_split"] == "train"


def test_cpu_int8_runs_every_conv_as_an_integer_kernel_after_ort_optimisation(exported, tmp_path):
    """The x86 form: uint8 activations (asymmetric), int8 weights; ONNX Runtime fuses every Q/DQ Conv into
    QLinearConv (the TensorRT form keeps some in float on x86, which is why both forms exist)."""
    _, run, _ = exported
    path = run.output("export", "onnx_int8_cpu")
    model = onnx.load(str(path))
    assert unquantized_nodes(model) == [] and len(nonzero_zero_points(model)) > 0  # asymmetric activations
    activations = {n.input[2] for n in model.graph.node if n.op_type == "QuantizeLinear"}
    types = {i.data_type for i in model.graph.initializer if i.name in activations}
    assert types == {onnx.TensorProto.UINT8}
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(tmp_path / "optimised.onnx")
    ort.InferenceSession(str(path), options, providers=CPU)
    optimised = [n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node]
    convs = sum(n.op_type == "Conv" for n in model.graph.node)
    assert convs == 21 and optimised.count("QLinearConv") == convs and "Conv" not in optimised


def test_lower_precision_accuracy_is_measured_on_the_whole_validation_split(exported):
    cfg, run, _ = exported
    data = load_datasets(cfg.data)
    summary = run.stage("export").summary
    assert summary["validation_images"] == len(data.val) == 64
    fp32 = summary["branch"]["fp32"]["val_accuracy"]
    for precision in ("fp16", "int8", "int8_cpu"):
        figures = summary["branch"][precision]
        logits = run_onnx(run.output("export", f"onnx_{precision}"), data.val.normalise(data.val.images))
        accuracy = float(100.0 * (logits.argmax(1) == data.val.labels.numpy()).mean())
        assert figures["val_accuracy"] == pytest.approx(accuracy) and figures["fp32_val_accuracy"] == fp32
        assert figures["drop"] == pytest.approx(fp32 - accuracy, abs=1e-3)
        assert figures["passed"] and figures["max_accuracy_drop"] == ANY_ACCURACY
    assert summary["deployed"] == ["fp32", "fp16", "int8", "int8_cpu"]


def test_calibration_reads_only_training_images_balanced_over_classes(exported):
    cfg, _, fed = exported
    data = load_datasets(cfg.data)
    calibration = np.concatenate(fed)
    assert cfg.export.calibration_size == 32 and len(calibration) == 4 * 32  # int8, int8_cpu; branch, ONE-E

    def normalised(split) -> set[bytes]:
        return {img.numpy().tobytes() for img in split.normalise(split.images)}

    train, val, test = normalised(data.train), normalised(data.val), normalised(data.test)
    seen = {img.tobytes() for img in calibration}
    assert len(seen) == 32 and seen <= train
    assert not seen & val and not seen & test
    again = calibration_images(data.train, 32, cfg.seed)  # deterministic
    assert {img.numpy().tobytes() for img in again.normalise(again.images)} == seen
    assert again.labels.bincount().tolist() == [8, 8, 8, 8]  # balanced over the 4 classes
    assert len(calibration_images(data.train, 10_000, cfg.seed)) == len(data.train)  # all, if fewer


def test_the_guard_s_verdict_is_typed_and_export_records_it_as_before():
    """Within the bound (its edge included) the verdict passes with no reason; beyond it, the reason names
    the model, the drop, both accuracies and the config field. `summary()` is the JSON export records."""
    edge = guard("int8", 89.5, 90.0, 64, 0.5)
    assert edge.passed and edge.reason is None and edge.drop == 0.5
    assert edge.summary() == {"val_accuracy": 89.5, "fp32_val_accuracy": 90.0, "drop": 0.5,
                              "max_accuracy_drop": 0.5, "passed": True}
    lost = guard("the pruned network", 80.0, 90.0, 64, 0.5, against="the kept branch",
                 setting="compress.max_accuracy_drop")
    assert not lost.passed and lost.drop == 10.0
    assert lost.reason == ("the pruned network loses 10.00 top-1 points on 64 validation images (80.00% vs the "
                           "kept branch 90.00%) > compress.max_accuracy_drop 0.5")
    assert list(lost.summary()) == ["val_accuracy", "fp32_val_accuracy", "drop", "max_accuracy_drop", "passed",
                                    "reason"] and lost.summary()["passed"] is False
    assert guard("fp16", 91.0, 90.0, 64, 0.0).passed  # a gain is no loss


def test_guard_rejects_a_damaged_quantization_and_nothing_deploys_it(trained_run, tmp_path, monkeypatch):
    """Calibration on four black images loses tens of points on the tiny model, far beyond any CPU's kernel
    differences: the guard rejects it with the bound and the measured drop."""
    black = load_datasets(trained_run[0].data).train.subset(range(4))
    black.images = torch.zeros_like(black.images)
    monkeypatch.setattr("stages.export.calibration_images", lambda *args: black)
    cfg, run = export_copy(trained_run, tmp_path, precisions=["fp32", "int8"], calibration_methods=["minmax"])
    entry = run.stage("export")
    figures = entry.summary["branch"]["int8"]
    assert entry.status == "done" and figures["passed"] is False
    assert re.fullmatch(r"no calibration recipe kept int8 within export\.max_accuracy_drop 0\.5 top-1 points of "
                        r"fp32 on 64 validation images \(best: .+, -(\d+\.\d\d) points\)", figures["reason"])
    assert [t["passed"] for t in figures["trials"]] == [False, False]  # minmax; minmax keeping layers float
    assert min(t["drop"] for t in figures["trials"]) > cfg.export.max_accuracy_drop
    assert "onnx_int8" not in entry.outputs and not run.path("export", "model_int8.onnx").exists()
    assert entry.summary["deployed"] == ["fp32"]
    assert entry.summary["ensemble"]["int8"]["reason"] == "not tried: the branch's int8 search kept no recipe"


def test_guard_rejects_a_damaged_fp16_model_and_nothing_deploys_it(trained_run, tmp_path, monkeypatch):
    """fp16 goes through the same guard: a converter that negated the logits (top-1 becomes the least
    likely class, tens of points lost) passes the logit check under a huge export.fp16_atol; the guard
    must still reject it."""
    real = quantize.to_fp16

    def negating_to_fp16(model):
        converted = real(model)
        graph = converted.graph
        producer = next(n for n in graph.node if "logits" in n.output)
        producer.output[list(producer.output).index("logits")] = "logits_before_neg"
        graph.node.append(onnx.helper.make_node("Neg", ["logits_before_neg"], ["logits"]))
        return converted

    monkeypatch.setattr("stages.export.to_fp16", negating_to_fp16)
    cfg, run = export_copy(trained_run, tmp_path, precisions=["fp32", "fp16"], fp16_atol=1e9, ensemble=False)
    entry = run.stage("export")
    figures = entry.summary["branch"]["fp16"]
    assert entry.status == "done" and figures["passed"] is False
    drop = re.fullmatch(r"fp16 loses (\d+\.\d\d) top-1 points on 64 validation images \(.+\) > "
                        r"export\.max_accuracy_drop 0\.5", figures["reason"])
    assert drop and float(drop.group(1)) > 20
    assert "onnx_fp16" not in entry.outputs and not run.path("export", "model_fp16.onnx").exists()
    assert entry.summary["deployed"] == ["fp32"]


def test_search_keeps_the_first_recipe_that_passes_and_records_every_trial(trained_run, tmp_path, monkeypatch):
    """The first recipe is made to calibrate on black images (about 44 points lost); the second, real, loses
    a few points at most on any CPU: with a 15-point bound the search must keep the second."""
    real = quantize.quantize_int8

    def damaged_minmax(fp32_path, out_path, images, input_name="input", *, target, recipe):
        if recipe.method == "minmax":
            images = images.subset(range(4))
            images.images = torch.zeros_like(images.images)
        return real(fp32_path, out_path, images, input_name, target=target, recipe=recipe)

    monkeypatch.setattr("stages.export.quantize_int8", damaged_minmax)
    _, run = export_copy(trained_run, tmp_path, precisions=["fp32", "int8_cpu"], max_accuracy_drop=15.0,
                         calibration_methods=["minmax", "percentile"], ensemble=False)
    figures = run.stage("export").summary["branch"]["int8_cpu"]
    assert [(t["method"], t["passed"]) for t in figures["trials"]] == [("minmax", False), ("percentile", True)]
    assert figures["recipe"] == {"method": "percentile", "keep_float": False, "label": "percentile, every layer int8"}
    assert figures["trials"][0]["drop"] > 15.0 >= figures["drop"] == figures["trials"][1]["drop"]
    assert run.output("export", "onnx_int8_cpu").exists() and "ensemble" not in run.stage("export").summary


def test_keeping_sensitive_layers_in_float_leaves_them_unquantized(exported, tmp_path):
    cfg, run, _ = exported
    images = calibration_images(load_datasets(cfg.data).train, 32, cfg.seed)
    out = tmp_path / "kept.onnx"
    kept = quantize.quantize_int8(run.output("export", "onnx_fp32"), out, images, target="int8",
                                  recipe=Recipe("minmax", keep_float=True))
    model = onnx.load(str(out))
    first_conv = next(n for n in model.graph.node if n.op_type == "Conv")
    classifier = [n for n in model.graph.node if n.op_type == "Gemm"][-1]
    assert kept == [first_conv.name, classifier.name]
    assert unquantized_nodes(model) == [f"Conv {first_conv.name}", f"Gemm {classifier.name}"]
    assert unquantized_nodes(model, kept) == []


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
    figures, problems = parity(logits[:4], logits[:4], atol=1e-4)
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
    """Each model's parity figures are recomputed here: its logits against its PyTorch model's on the check
    images (as a batch and the first alone, like the check)."""
    cfg, run, _ = exported
    summary = run.stage("export").summary
    images = next(load_datasets(cfg.data).val.batches(cfg.export.check_size))[0]
    full, _ = checkpoint.load_model(run.output("train", "model"))
    branch, _ = checkpoint.load_model(run.output("strip", "model"))
    with torch.no_grad():
        torch_logits = {"branch": branch(images).double().numpy(), "ensemble": full(images).teacher.double().numpy()}
    assert set(run.stage("export").outputs) == {f"{prefix}onnx_{p}" for prefix in ("", "ensemble_")
                                                   for p in ("fp32", "fp16", "int8", "int8_cpu")}
    for subject in ("branch", "ensemble"):
        for precision in ("fp32", "fp16", "int8", "int8_cpu"):
            figures = summary[subject][precision]
            prefix = "" if subject == "branch" else "ensemble_"
            assert figures["opset"] == cfg.export.opset
            assert figures["bytes"] == run.output("export", f"{prefix}onnx_{precision}").stat().st_size
            path = run.output("export", f"{prefix}onnx_{precision}")
            logits = torch_logits[subject]
            batch, first = run_onnx(path, images), run_onnx(path, images[:1])
            assert figures["top1_agreement"] == float(np.mean(batch.argmax(1) == logits.argmax(1)))
            assert figures["max_abs_diff"] == pytest.approx(max(np.abs(batch - logits).max(),
                                                                np.abs(first - logits[:1]).max()), rel=1e-6)
        assert summary[subject]["fp32"]["top1_agreement"] == 1.0
        assert summary[subject]["fp32"]["max_abs_diff"] <= cfg.export.atol
        assert summary[subject]["fp16"]["max_abs_diff"] <= cfg.export.fp16_atol
        assert summary[subject]["int8"]["bytes"] < summary[subject]["fp32"]["bytes"]


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
