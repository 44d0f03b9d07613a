"""select picks on validation accuracy only; strip cuts out a branch whose logits equal the full model's."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from pipeline.config import Config
from pipeline.errors import PipelineError, UsageError
from pipeline.rundir import RunDir, sha256_file
from pipeline.runner import execute, run_stages, stage_def
from pipeline.training import checkpoint
from pipeline.training.data import load_datasets
from pipeline.training.models import ModelSpec, SingleNet, count_parameters
from stages import strip
from stages.select import choose_branch
from tests.conftest import make_ctx


def copy_run(cfg: Config, run: RunDir, dest: Path, **sections: dict) -> tuple[Config, RunDir]:
    """A private copy of a finished run, with some config sections updated."""
    shutil.copytree(run.root, dest / cfg.name)
    update = {name: getattr(cfg, name).model_copy(update=fields) for name, fields in sections.items()}
    new = cfg.model_copy(update={"output_root": dest, **update})
    return new, RunDir(new.run_dir)


def fake_train(cfg: Config, val: list[float], test: list[float], method: str = "one",
               teacher: tuple[float, float] | None = (99.0, 98.0)) -> RunDir:
    """A run whose train stage 'finished' with the given accuracies (no model file needed by select)."""
    run = RunDir(cfg.run_dir)
    val_acc, test_acc = {"branches": val}, {"branches": test}
    if teacher:
        val_acc["teacher"], test_acc["teacher"] = teacher
    run.record("train", {"status": "done", "outputs": {},
                         "summary": {"method": method, "val": val_acc, "test": test_acc}})
    return run


def with_branch(cfg: Config, root: Path, branch) -> Config:
    return cfg.model_copy(update={"output_root": root, "select": cfg.select.model_copy(update={"branch": branch})})


# --- select ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("val, expected", [([90.0, 95.0, 93.0], 1), ([90.0, 95.0, 95.0], 1),
                                           ([95.0, 95.0, 95.0], 0), ([1.0, 2.0, 3.0], 2)])
def test_choose_branch_best_validation_ties_to_lowest_index(val, expected):
    assert choose_branch(val)[0] == expected


def test_select_uses_validation_never_test(tiny_cfg, tmp_path):
    cfg = with_branch(tiny_cfg, tmp_path, "best")
    run = fake_train(cfg, val=[80.0, 85.0, 85.0], test=[99.0, 70.0, 90.0])  # test would pick 0
    result = execute(cfg, stage_def("select"), run, make_ctx(cfg, run))
    assert result == "done"
    summary = run.stage("select").summary
    assert (summary["branch"], summary["val"], summary["test"]) == (1, 85.0, 70.0)
    assert "lowest index" in summary["reason"]
    saved = json.loads(run.output("select", "selection").read_text())
    assert saved["branch"] == 1
    assert [(b["val"], b["test"]) for b in saved["branches"]] == [(80.0, 99.0), (85.0, 70.0), (85.0, 90.0)]
    assert saved["teacher"] == {"val": 99.0, "test": 98.0}


def test_select_override_and_out_of_range(tiny_cfg, tmp_path):
    cfg = with_branch(tiny_cfg, tmp_path, 2)
    run = fake_train(cfg, val=[90.0, 95.0, 80.0], test=[90.0, 95.0, 80.0])
    execute(cfg, stage_def("select"), run, make_ctx(cfg, run))
    assert run.stage("select").summary["branch"] == 2

    cfg = with_branch(tiny_cfg, tmp_path, 5)
    with pytest.raises(UsageError) as info:
        execute(cfg, stage_def("select"), run, make_ctx(cfg, run))
    assert str(info.value) == "select.branch 5 is out of range; this model has branches 0, 1, 2"
    assert run.stage("select").summary["branch"] == 2  # a failure keeps the earlier record (issue 13)


def test_select_vanilla_has_one_choice(tiny_cfg, tmp_path):
    cfg = with_branch(tiny_cfg, tmp_path, "best")
    run = fake_train(cfg, val=[70.0], test=[71.0], method="vanilla", teacher=None)
    execute(cfg, stage_def("select"), run, make_ctx(cfg, run))
    summary = run.stage("select").summary
    assert summary["branch"] == 0 and "vanilla" in summary["reason"]
    assert json.loads(run.output("select", "selection").read_text())["teacher"] is None
    cfg = with_branch(tiny_cfg, tmp_path, 1)
    with pytest.raises(UsageError, match="select.branch 1 is out of range; this model has only branch 0"):
        execute(cfg, stage_def("select"), run, make_ctx(cfg, run))


# --- strip -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def val_images(trained_run) -> torch.Tensor:
    cfg, _ = trained_run
    return next(load_datasets(cfg.data).val.batches(64))[0]


def test_strip_every_branch_equals_the_full_model(trained_run, tmp_path, val_images):
    cfg, run = copy_run(*trained_run, tmp_path)
    full, _ = checkpoint.load_model(run.output("train", "model"))
    with torch.no_grad():
        branch_logits = full(val_images).branches
    source_sha = sha256_file(run.output("train", "model"))
    for index in range(cfg.model.branches):
        cfg = with_branch(cfg, tmp_path, index)
        run_stages(cfg, run, make_ctx(cfg, run), until="strip")
        path = run.output("strip", "model")
        payload = torch.load(path, weights_only=True)  # plain tensors and primitives only
        assert payload["branch"] == index and payload["source_sha256"] == source_sha
        assert payload["spec"]["method"] == "single" and payload["data"]["class_names"]
        single, _ = checkpoint.load_model(path)
        assert isinstance(single, SingleNet)
        assert not any(k.startswith(("gate.", "branches.")) for k in payload["state_dict"])
        with torch.no_grad():
            diff = (single(val_images) - branch_logits[:, index]).abs().max().item()
        assert diff <= 1e-6, f"branch {index}: {diff}"
        summary = run.stage("strip").summary
        assert summary["max_abs_diff"] <= 1e-6
        assert summary["branch_params"] == count_parameters(single) < summary["full_params"]
        assert summary["branch_bytes"] == path.stat().st_size
    # the branches really differ, so the comparison above could tell a wrong index apart
    assert (branch_logits[:, 0] - branch_logits[:, 1]).abs().max() > 1e-3


def test_strip_fails_with_the_figure_when_the_copy_is_wrong(trained_run, tmp_path, monkeypatch):
    cfg, run = copy_run(*trained_run, tmp_path)
    real = strip.strip_branch

    def broken(model, index):
        single = real(model, index)
        with torch.no_grad():
            single.branch.fc.bias.add_(0.01)
        return single

    monkeypatch.setattr(strip, "strip_branch", broken)
    with pytest.raises(PipelineError, match=r"differs from the full model by 0\.01"):
        run_stages(cfg, run, make_ctx(cfg, run), until="strip")
    assert not run.path("strip", "branch.pt").exists()


def test_strip_vanilla_copies_the_network(tiny_cfg, tmp_path):
    cfg = with_branch(tiny_cfg, tmp_path, "best")
    run = RunDir(cfg.run_dir)
    spec = ModelSpec("resnet20", 4, 3, method="single", branches=1, width=4)
    net = SingleNet(spec).eval()
    model_path = run.path("train", "model.pt")
    data = {"dataset": "synthetic", "class_names": [f"c{i}" for i in range(4)], "mean": [0.5] * 3, "std": [0.25] * 3,
            "input_shape": [3, 16, 16]}
    checkpoint.save(model_path, {"spec": spec.to_dict(), "state_dict": net.state_dict(), "data": data})
    run.record("train", {"status": "done", "outputs": run.describe_outputs({"model": model_path}),
                         "summary": {"method": "vanilla", "val": {"branches": [60.0]}, "test": {"branches": [61.0]}}})
    for name in ("select", "strip"):
        assert execute(cfg, stage_def(name), run, make_ctx(cfg, run)) == "done"
    payload = checkpoint.load(run.output("strip", "model"))
    assert payload["branch"] == 0 and payload["data"] == data
    assert all(torch.equal(payload["state_dict"][k], v) for k, v in net.state_dict().items())
    assert run.stage("strip").summary["max_abs_diff"] == 0.0
