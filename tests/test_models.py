import pytest
import torch

from pipeline.training.models import ModelSpec, ONENet, SingleNet, build_model, count_parameters


@pytest.mark.parametrize("arch,one_m,single_m", [("resnet32", 1.19, 0.47), ("resnet110", 4.36, 1.73)])
def test_parameter_counts_match_the_paper_on_cifar100(arch, one_m, single_m):
    spec = ModelSpec(arch, num_classes=100, in_channels=3, branches=3)
    assert count_parameters(build_model(spec)) / 1e6 == pytest.approx(one_m, abs=0.005)
    assert count_parameters(build_model(spec.single())) / 1e6 == pytest.approx(single_m, abs=0.005)


@pytest.mark.parametrize("arch,side,channels", [("resnet20", 28, 1), ("resnet56", 32, 3), ("resnet18", 64, 3)])
def test_one_outputs_and_gate(arch, side, channels):
    torch.manual_seed(0)
    model = build_model(ModelSpec(arch, num_classes=7, in_channels=channels, branches=4)).eval()
    out = model(torch.randn(5, channels, side, side))
    assert out.branches.shape == (5, 4, 7) and out.gate.shape == (5, 4) and out.teacher.shape == (5, 7)
    assert torch.allclose(out.gate.sum(1), torch.ones(5))
    manual = sum(out.gate[:, i:i + 1] * out.branches[:, i] for i in range(4))
    assert torch.allclose(out.teacher, manual, atol=1e-6)


def test_gate_reads_the_trunk_output():
    model = ONENet(ModelSpec("resnet20", 10, 3, branches=3))
    assert model.gate.fc.in_features == 32  # stage-2 channels of a width-16 CIFAR ResNet
    assert isinstance(build_model(ModelSpec("resnet20", 10, 3).single()), SingleNet)


def test_resnet110_is_the_bottleneck_variant():
    model = SingleNet(ModelSpec("resnet110", 100, 3).single())
    blocks = [m for m in model.modules() if type(m).__name__ == "Bottleneck"]
    assert len(blocks) == 3 * 18
