"""Pretrained starts (model.pretrained) and live curves (train.tensorboard), offline: the torchvision-format
files are built here from torchvision's own (untrained, never downloaded) ResNet-18."""

import sys

import pytest
import torch
import torchvision
import yaml
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.config import validate_config
from pipeline.errors import ConfigError, UsageError
from pipeline.rundir import RunDir
from pipeline.runner import run_stages
from pipeline.training import checkpoint, curves, pretrained
from pipeline.training.fit import Epoch
from pipeline.training.models import ModelSpec, ONENet
from tests.conftest import make_ctx, tiny_dict

runner = CliRunner()
RESNET18 = {"arch": "resnet18", "branches": 3}


def torchvision_file(tmp_path, edit=None):
    torch.manual_seed(1)
    state = torchvision.models.resnet18(num_classes=10).state_dict()
    if edit:
        edit(state)
    path = tmp_path / "resnet18.pth"
    torch.save(state, path)
    return path, state


def one_net(in_channels=3):
    torch.manual_seed(0)
    return ONENet(ModelSpec("resnet18", num_classes=4, in_channels=in_channels, branches=3))


def branch_convs(net, index):
    return {k: v for k, v in net.branches[index].stage.state_dict().items() if k.endswith("weight") and v.dim() == 4}


def test_file_reaches_trunk_and_every_branch_classifiers_fresh(tmp_path):
    path, state = torchvision_file(tmp_path)
    net = one_net()
    fresh_fc = net.branches[0].fc.weight.clone()
    pretrained.start_from(net, str(path), branch_noise=0)
    assert torch.equal(net.trunk[0].weight, state["conv1.weight"])
    assert torch.equal(net.trunk[6][1].conv2.weight, state["layer3.1.conv2.weight"])
    assert torch.equal(net.trunk[1].running_var, state["bn1.running_var"])
    for branch in net.branches:
        for key, value in branch.stage.state_dict().items():
            assert torch.equal(value, state[f"layer4.{key}"]), key
    assert torch.equal(net.branches[0].fc.weight, fresh_fc)  # 4 classes of the user, not the file's 10


def test_branch_noise_sets_the_copies_apart_and_leaves_the_trunk(tmp_path):
    path, state = torchvision_file(tmp_path)
    net = one_net()
    pretrained.start_from(net, str(path), branch_noise=0.1)
    assert torch.equal(net.trunk[0].weight, state["conv1.weight"])
    copies = [branch_convs(net, i) for i in range(3)]
    for key, value in copies[0].items():
        original = state[f"layer4.{key}"]
        for other in copies:  # each copy near the file's, at about 0.1 of its spread, and all different
            assert 0.05 < (other[key] - original).std() / original.std() < 0.2, key
        assert not torch.equal(value, copies[1][key]) and not torch.equal(copies[1][key], copies[2][key])


def test_grey_network_sums_the_rgb_filters(tmp_path):
    path, state = torchvision_file(tmp_path)
    net = one_net(in_channels=1)
    pretrained.start_from(net, str(path), branch_noise=0)
    assert torch.allclose(net.trunk[0].weight, state["conv1.weight"].sum(1, keepdim=True))


@pytest.mark.parametrize("edit, named", [
    (lambda s: s.__setitem__("layer2.0.conv1.weight", torch.zeros(64, 64, 3, 3)),
     "layer2.0.conv1.weight has shape (64, 64, 3, 3) in the file but (128, 64, 3, 3)"),
    (lambda s: s.pop("layer4.1.bn2.weight"), "has no layer4.1.bn2.weight"),
    (lambda s: s.__setitem__("layer5.0.conv1.weight", torch.zeros(1)), "layer5.0.conv1.weight is not a weight"),
])
def test_a_file_that_does_not_fit_is_refused_naming_the_key(tmp_path, edit, named):
    path, _ = torchvision_file(tmp_path, edit)
    with pytest.raises(UsageError, match="model.pretrained") as error:
        pretrained.start_from(one_net(), str(path))
    assert named in str(error.value) and "\n" not in str(error.value)


def test_cli_refuses_a_mismatched_file_in_one_line(tmp_path):
    path, _ = torchvision_file(tmp_path, lambda s: s.__setitem__("bn1.weight", torch.ones(32)))
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(tiny_dict(tmp_path / "runs", model={**RESNET18, "pretrained": str(path)},
                                               train={"epochs": 1})))
    result = runner.invoke(app, ["train", str(config)])
    assert result.exit_code == 2, result.output
    assert "bn1.weight has shape (32,) in the file but (64,)" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "runs/tiny/train/model.pt").exists()


def test_pretrained_needs_resnet18_and_keeps_fingerprints():
    with pytest.raises(ConfigError, match="needs arch resnet18"):
        validate_config({"model": {"arch": "resnet20", "pretrained": "x.pth"}})
    plain = validate_config({})
    assert plain.section_hash("model") == validate_config({"model": {"pretrained": None}}).section_hash("model")
    assert plain.section_hash("train") == validate_config({"train": {"tensorboard": True}}).section_hash("train")


def test_not_a_state_dict_is_refused(tmp_path):
    (tmp_path / "junk.pth").write_bytes(b"not a zip")
    with pytest.raises(UsageError, match="is not a PyTorch state dict"):
        pretrained.read_state(str(tmp_path / "junk.pth"))
    with pytest.raises(UsageError, match="is not a file"):
        pretrained.read_state(str(tmp_path / "missing.pth"))


def train_from_file(tmp_path, noise):
    path, state = torchvision_file(tmp_path)
    # lr tiny: after the epoch the branches are where the start put them, give or take the steps
    raw = tiny_dict(tmp_path / f"runs{noise}", model={**RESNET18, "pretrained": str(path),
                                                      "pretrained_branch_noise": noise},
                    data={"synthetic_size": 64, "val_size": 16}, train={"epochs": 1, "lr": 1e-4})
    cfg = validate_config(raw)
    run = RunDir(cfg.run_dir)
    run_stages(cfg, run, make_ctx(cfg, run), until="train")
    weights = checkpoint.load(run.path("train/model.pt"))["state_dict"]
    return weights, state


def branch_gap(weights, key="stage.1.conv2.weight"):
    """The largest relative distance between two branches' copies of one layer4 conv."""
    copies = [weights[f"branches.{i}.{key}"] for i in range(3)]
    return max(((a - b).norm() / a.norm()).item() for a in copies for b in copies)


@pytest.mark.slow
def test_branches_differ_after_training_with_symmetry_breaking_only(tmp_path):
    broken, state = train_from_file(tmp_path, None)  # None: the default noise
    identical, _ = train_from_file(tmp_path, 0.0)
    assert branch_gap(broken) > 0.05  # ~0.14 for noise 0.1
    assert branch_gap(identical) < 0.01  # a few steps of lr 1e-4 barely move the copies apart
    assert broken["trunk.0.weight"].shape == state["conv1.weight"].shape  # the synthetic set is RGB
    assert torch.allclose(broken["trunk.0.weight"], state["conv1.weight"], atol=1e-2)


def test_curves_cost_nothing_when_off_and_say_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # importing it now raises ImportError
    off = make_ctx(validate_config(tiny_dict(tmp_path)))
    assert curves.sinks(off, "train") == []
    on = make_ctx(validate_config(tiny_dict(tmp_path, train={"tensorboard": True})))
    with pytest.raises(UsageError, match=r"pip install -e '\.\[tensorboard\]'"):
        curves.sinks(on, "train")


def test_curves_tags():
    epoch = Epoch(number=2, loss=0.5, accuracy=80.0, lr=0.01, seconds=1.0, images_per_s=10.0)
    tags = curves.scalars(epoch, {"val": {"branches": [70.0, 71.0], "teacher": 72.0, "average": 70.5}})
    assert tags == {"loss/train": 0.5, "lr": 0.01, "top1/train": 80.0, "top1/val_branch0": 70.0,
                    "top1/val_branch1": 71.0, "top1/val_one_e": 72.0}


def test_event_files_written_when_asked(tmp_path):
    pytest.importorskip("tensorboard", reason="the tensorboard package is not installed (pip install -e "
                                              "'.[tensorboard]')")
    cfg = validate_config(tiny_dict(tmp_path, train={"epochs": 1, "tensorboard": True}))
    run = RunDir(cfg.run_dir)
    run_stages(cfg, run, make_ctx(cfg, run), until="train")
    assert list(run.path("train/tb").glob("events.out.tfevents.*"))


def test_no_event_files_when_off(tmp_path):
    cfg = validate_config(tiny_dict(tmp_path, train={"epochs": 1}))
    run = RunDir(cfg.run_dir)
    run_stages(cfg, run, make_ctx(cfg, run), until="train")
    assert not run.path("train/tb").exists()  # no import when off: see test_curves_cost_nothing_when_off
