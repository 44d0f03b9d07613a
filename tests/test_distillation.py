"""The distillation that training and compress promise, judged by what reaches the loss and the weights:
ONE's KL term moves the trained weights; compress's fine-tune takes its targets from the teacher that
compress.teacher names (ONE-E, the unpruned branch) and from nobody for `none`.

The fine-tune's loss is watched through `pipeline.training.loss.distill_loss` wherever the project binds
it (`spy_everywhere`), so the tests hold whichever module runs the loop; the teachers' own logits are
computed here from the run's model files, on un-augmented training images (so each has one answer)."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import sys

import pytest
import torch

import pipeline
import stages
from pipeline.config import validate_config
from pipeline.rundir import RunDir
from pipeline.runner import run_stages
from pipeline.training import checkpoint, loss
from pipeline.training.data import load_datasets
from pipeline.training.models import EnsembleNet
from tests.conftest import copy_run, make_ctx, tiny_dict

# the tiny net's fine-tune, as tests/test_compress.py runs it: 6 batches of 16
FINE_TUNE = {"enabled": True, "channel_multiple": 2, "epochs": 1, "images_per_epoch": 96, "batch_size": 16,
             "lr": 0.02, "max_accuracy_drop": 100}


def spy_everywhere(monkeypatch, function) -> list[dict]:
    """Replace `function` in every module of the project that binds it (its own module, and each one that
    imported it by name), recording every call's arguments by parameter name (tensors detached). Every
    module is imported first: one imported later (the runner loads stages lazily) would bind the spy for
    good, past this test's undo."""
    for package in (pipeline, stages):
        for found in pkgutil.walk_packages(package.__path__, f"{package.__name__}."):
            importlib.import_module(found.name)
    signature, calls = inspect.signature(function), []

    def spy(*args, **kwargs):
        arguments = signature.bind(*args, **kwargs).arguments
        calls.append({k: v.detach().clone() if isinstance(v, torch.Tensor) else v for k, v in arguments.items()})
        return function(*args, **kwargs)

    for name, module in list(sys.modules.items()):
        if name.split(".")[0] in ("pipeline", "stages"):
            for attribute, value in list(vars(module).items()):
                if value is function:
                    monkeypatch.setattr(module, attribute, spy)
    return calls


@pytest.fixture(scope="module")
def unaugmented(tmp_path_factory):
    """The tiny run without augmentation, through strip: a training image always gives its teacher the same input."""
    cfg = validate_config(tiny_dict(tmp_path_factory.mktemp("unaugmented"), data={"augment": False}))
    run = RunDir(cfg.run_dir)
    run_stages(cfg, run, make_ctx(cfg, run), until="strip")
    return cfg, run


def _teacher_tables(cfg, run) -> dict[str, torch.Tensor]:
    """Each possible teacher's logits for every training image, in the training set's order."""
    train = load_datasets(cfg.data).train
    teachers = {"one_e": EnsembleNet(checkpoint.load_model(run.output("train", "model"))[0]),
                "branch": checkpoint.load_model(run.output("strip", "model"))[0]}
    with torch.no_grad():
        return {kind: torch.cat([net.eval()(x) for x, _ in train.batches(64)]) for kind, net in teachers.items()}


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["one_e", "branch"])
def test_the_fine_tune_distils_from_the_teacher_it_names(unaugmented, tmp_path, monkeypatch, kind):
    """Every target the fine-tune's loss receives is the named teacher's logits of an image of the batch's
    class, and not the other teacher's: a fine-tune that passed no target (CE only) or the wrong teacher fails."""
    calls = spy_everywhere(monkeypatch, loss.distill_loss)
    cfg, run = copy_run(unaugmented, tmp_path, "compress", compress={**FINE_TUNE, "teacher": kind})
    assert run.stage("compress").summary["teacher"] == kind
    assert len(calls) == 6, "the fine-tune's loss was not computed by pipeline.training.loss.distill_loss"
    tables = _teacher_tables(cfg, run)
    labels = load_datasets(cfg.data).train.labels
    other = "branch" if kind == "one_e" else "one_e"
    # two teachers the test can tell apart (on most images: the gate may weigh one branch nearly alone)
    assert (tables[kind] - tables[other]).abs().amax(1).median() > 0.1
    for call in calls:
        target = call["teacher"]
        assert target is not None, f"compress.teacher {kind}: the loss got no teacher's logits (CE only)"
        distance, index = torch.cdist(target.double(), tables[kind].double()).min(1)
        assert distance.max() < 1e-3, f"targets that are not compress.teacher {kind}'s logits"
        assert torch.equal(labels[index], call["target"])  # those of the batch's own images, as far as labels say
        assert torch.cdist(target.double(), tables[other].double()).min(1).values.max() > 0.1


@pytest.mark.slow
def test_teacher_none_is_cross_entropy_only(trained_run, tmp_path, monkeypatch):
    """`none`: no teacher's logits reach the loss, and the fine-tune ends in the weights of a fine-tune from the
    branch whose distillation is weighted 0 (the loss adds nothing to the CE)."""
    calls = spy_everywhere(monkeypatch, loss.distill_loss)
    _, alone = copy_run(trained_run, tmp_path / "none", "compress", compress={**FINE_TUNE, "teacher": "none"})
    assert len(calls) == 6 and all(call["teacher"] is None for call in calls)
    monkeypatch.undo()
    _, muted = copy_run(trained_run, tmp_path / "muted", "compress",
                        compress={**FINE_TUNE, "teacher": "branch", "kd_weight": 0})
    _, taught = copy_run(trained_run, tmp_path / "taught", "compress", compress={**FINE_TUNE, "teacher": "branch"})
    weights = {name: torch.load(r.path("compress/model.pt"), weights_only=True)["state_dict"]
               for name, r in (("none", alone), ("muted", muted), ("taught", taught))}
    assert all(torch.equal(weights["none"][k], weights["muted"][k]) for k in weights["none"])
    assert not all(torch.equal(weights["none"][k], weights["taught"][k]) for k in weights["none"])


@pytest.mark.slow
def test_ones_kl_term_reaches_the_trained_weights(tmp_path):
    """ONE's loss is CE of every branch + CE of the gated teacher + T^2 KL(teacher || branch): training with the
    KL term weighted 0 must end elsewhere than with it (a training loop that dropped it would not)."""
    small = {"data": {"synthetic_size": 96, "val_size": 32}, "train": {"epochs": 1, "milestones": []}}
    states = []
    for kd_weight in (1.0, 0.0):
        cfg = validate_config(tiny_dict(tmp_path / str(kd_weight), **small, loss={"rampup": 0, "kd_weight": kd_weight}))
        run = RunDir(cfg.run_dir)
        run_stages(cfg, run, make_ctx(cfg, run), until="train")
        states.append(torch.load(run.path("train/model.pt"), weights_only=True)["state_dict"])
    with_kl, without = states
    branch_weights = [k for k in with_kl if k.startswith("branches.") and k.endswith("weight")]
    assert branch_weights and any(not torch.equal(with_kl[k], without[k]) for k in branch_weights)
