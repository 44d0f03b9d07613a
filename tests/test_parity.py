"""The export parity check judges logit differences against each image's largest |logit|: the defaults pass
correct graphs of every architecture at any logit scale, and fail graphs that compute something else."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from pipeline.config import ExportConfig
from pipeline.deploy.onnx_io import export_onnx
from pipeline.deploy.quantize import to_fp16
from pipeline.errors import PipelineError
from pipeline.training.models import ARCHS, EnsembleNet, ModelSpec, ONENet, SingleNet
from stages.export import check_onnx

CPU = ["CPUExecutionProvider"]
DEFAULTS = ExportConfig()
CLASSIFIER = re.compile(r"(^|\.)branch(es\.\d+)?\.fc\.(weight|bias)$")  # not the gate's fc


def _scale_classifiers(model: torch.nn.Module, proto: onnx.ModelProto, factor: float) -> None:
    """Multiply every branch classifier's weight and bias by `factor`, in the network and in its ONNX graph alike
    (the logits of a network trained into large activations, as a resnet18 is after one epoch: up to 8e4)."""
    names = []
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if CLASSIFIER.search(name):
                parameter.mul_(factor)
                names.append(name)
    scaled = [i for i in proto.graph.initializer if i.name in names]
    assert names and len(scaled) == len(names), (names, [i.name for i in proto.graph.initializer][:20])
    for init in scaled:
        init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * np.float32(factor), init.name))


def _check(proto: onnx.ModelProto, path: Path, images: torch.Tensor, reference: np.ndarray, **limits) -> dict:
    onnx.save(proto, str(path))
    return check_onnx(path, images, reference, CPU, **limits)


@pytest.fixture(scope="module")
def large_logits(tmp_path_factory):
    """A tiny branch whose logits reach thousands, its ONNX, 16 images and PyTorch's logits of them."""
    torch.manual_seed(0)
    net = SingleNet(ModelSpec("resnet20", num_classes=4, in_channels=1, width=4).single()).eval()
    images = torch.randn(16, 1, 16, 16)
    proto = export_onnx(net, images, DEFAULTS.opset)
    _scale_classifiers(net, proto, 1e4)
    with torch.no_grad():
        reference = net(images).double().numpy()
    assert np.abs(reference).max() > 1e3
    return proto, images, reference


def test_large_logits_pass_the_default_bounds_that_an_absolute_bound_fails(large_logits, tmp_path):
    proto, images, reference = large_logits
    figures = _check(proto, tmp_path / "fp32.onnx", images, reference, atol=DEFAULTS.atol, rtol=DEFAULTS.rtol,
                     same_top1=True)
    assert figures["max_abs_diff"] > DEFAULTS.atol and figures["top1_mismatches"] == 0  # only rounding, scaled
    with pytest.raises(PipelineError, match=r"max abs logit diff \S+ > atol 0\.0001 \+ rtol 0 x"):
        _check(proto, tmp_path / "fp32.onnx", images, reference, atol=DEFAULTS.atol, rtol=0.0)
    _check(to_fp16(proto), tmp_path / "fp16.onnx", images, reference, atol=DEFAULTS.fp16_atol,
           rtol=DEFAULTS.fp16_rtol)


def test_the_default_bounds_fail_a_graph_that_computes_something_else(large_logits, tmp_path):
    proto, images, reference = large_logits
    off = onnx.ModelProto()
    off.CopyFrom(proto)
    conv = next(n for n in off.graph.node if n.op_type == "Conv")
    weight = next(i for i in off.graph.initializer if i.name == conv.input[1])
    weight.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weight) * np.float32(1.001), weight.name))
    with pytest.raises(PipelineError, match="max abs logit diff"):  # one layer 0.1% off
        _check(off, tmp_path / "off.onnx", images, reference, atol=DEFAULTS.atol, rtol=DEFAULTS.rtol)
    other = np.roll(reference, 1, axis=0)  # another image's logits: another model's answer, the same scale
    for precision, atol, rtol in (("fp32", DEFAULTS.atol, DEFAULTS.rtol), ("fp16", DEFAULTS.fp16_atol,
                                                                         DEFAULTS.fp16_rtol)):
        with pytest.raises(PipelineError, match=r"max abs logit diff .* on \d+ of 16 images"):
            _check(proto if precision == "fp32" else to_fp16(proto), tmp_path / f"{precision}.onnx", images, other,
                   atol=atol, rtol=rtol)


def one_e(arch: str) -> tuple[EnsembleNet, torch.Tensor]:
    """ONE-E (trunk, two branches, gate) of `arch`, fresh from initialisation, and 16 images for it."""
    torch.manual_seed(0)
    net = EnsembleNet(ONENet(ModelSpec(arch, num_classes=10, in_channels=3, branches=2, width=8))).eval()
    return net, torch.randn(16, 3, 32, 32)


def exported_one_e(arch: str) -> bytes:
    """one_e's export, made in a worker process while earlier tests run: tracing a resnet110 ONE-E takes 15 s."""
    net, images = one_e(arch)
    return export_onnx(net, images, DEFAULTS.opset).SerializeToString()


@pytest.mark.slow
@pytest.mark.parametrize("arch", [pytest.param(a, marks=pytest.mark.prefetch(exported_one_e, a)) for a in ARCHS])
def test_every_architecture_passes_the_default_bounds_untrained_and_at_large_logits(arch, prefetched, tmp_path):
    """one_e of each architecture (the test's own net, the worker's export of the same weights), then with
    logits ten thousand times larger; fp16 at the untrained scale."""
    net, images = one_e(arch)
    proto = onnx.load_from_string(prefetched)
    with torch.no_grad():
        reference = net(images).double().numpy()
    fp32 = {"atol": DEFAULTS.atol, "rtol": DEFAULTS.rtol, "same_top1": True}
    _check(proto, tmp_path / "fp32.onnx", images, reference, **fp32)
    fp16 = {"atol": DEFAULTS.fp16_atol, "rtol": DEFAULTS.fp16_rtol, "label": "fp16"}
    if np.abs(reference).max() < np.finfo(np.float16).max:
        _check(to_fp16(proto), tmp_path / "fp16.onnx", images, reference, **fp16)
    else:  # an untrained resnet110's activations grow past float16's range: no bound passes infinities
        with pytest.raises(PipelineError, match="non-finite logits"):
            _check(to_fp16(proto), tmp_path / "fp16.onnx", images, reference, **fp16)
    _scale_classifiers(net, proto, 1e4)
    with torch.no_grad():
        reference = net(images).double().numpy()
    assert np.abs(reference).max() > 1e3
    _check(proto, tmp_path / "large.onnx", images, reference, **fp32)
