import contextlib
import json

import pytest
import torch

from pipeline.config import validate_config
from pipeline.errors import UsageError
from pipeline.rundir import RunDir
from pipeline.runner import run_stages
from pipeline.training import checkpoint, fit
from stages import train as train_stage
from tests.conftest import make_ctx, press_ctrl_c_at, tiny_dict


def _train(cfg):
    run = RunDir(cfg.run_dir)
    run_stages(cfg, run, make_ctx(cfg, run), until="train")
    return run


def _count_steps(monkeypatch) -> list:
    """A list that grows by one per training step (the loss of each micro-batch; the tiny config has one)."""
    steps, real = [], train_stage._loss
    monkeypatch.setattr(train_stage, "_loss", lambda *args: steps.append(1) or real(*args))
    return steps


def test_train_records_every_head_and_checkpoints(trained_run):
    cfg, run = trained_run
    summary = run.stage("train").summary
    assert len(summary["val"]["branches"]) == 3 and {"teacher", "average"} <= summary["val"].keys()
    # learnt something: chance is 25%; the tiny set lands at 50-60% depending on the thread count's rounding
    assert min(summary["test"]["branches"]) >= 40
    lines = run.path("train/metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2, 3]
    payload = torch.load(run.path("train/model.pt"), weights_only=True)
    assert payload["spec"]["branches"] == 3 and payload["data"]["input_shape"] == [3, 16, 16]
    last = torch.load(run.path("train/last.pt"), weights_only=True)
    assert {"optimizer", "scheduler", "rng_cpu", "epoch"} <= last.keys() and last["epoch"] == 3


def test_interrupted_run_resumes_to_the_same_weights(trained_run, tmp_path, monkeypatch):
    """Ctrl-C mid-epoch saves a checkpoint; the resumed run ends bit-identical to an uninterrupted one (the
    session's trained run: the same tiny config)."""
    _, whole = trained_run
    cfg = validate_config(tiny_dict(tmp_path / "b"))
    press_ctrl_c_at(monkeypatch, 30)
    with pytest.raises(fit.Interrupted, match="run the same command again to resume") as err:
        _train(cfg)
    assert err.value.exit_code == 130
    saved = torch.load(cfg.run_dir / "train/last.pt", weights_only=True)
    # 20 batches per epoch, each followed by a check, and one more after validation: stopped inside epoch 2
    assert (saved["epoch"], saved["batch"]) == (1, 9)
    first_epoch = (cfg.run_dir / "train/metrics.jsonl").read_text()
    monkeypatch.undo()
    steps = _count_steps(monkeypatch)
    resumed = _train(cfg)
    # only the remaining work ran: 60 steps in all, 20 + 9 of them before Ctrl-C; epoch 1's record is kept
    # as written (its time differs in any rerun)
    assert len(steps) == 60 - 29
    assert resumed.path("train/metrics.jsonl").read_text().startswith(first_epoch) and first_epoch.count("\n") == 1
    a = torch.load(whole.path("train/model.pt"), weights_only=True)["state_dict"]
    b = torch.load(resumed.path("train/model.pt"), weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.stage("train").summary["test"] == whole.stage("train").summary["test"]


def test_eval_every_validates_the_last_epoch_resumes_and_trains_the_same_weights(tmp_path, monkeypatch,
                                                                                  trained_run):
    """train.eval_every 2 of 3 epochs: validation after epochs 2 and 3 only; interrupted and resumed, the run
    ends with the weights and the validation figures of the every-epoch run (validation changes no weights)."""
    _, every_epoch = trained_run
    cfg = validate_config(tiny_dict(tmp_path, train={"eval_every": 2}))
    press_ctrl_c_at(monkeypatch, 30)
    with pytest.raises(fit.Interrupted):
        _train(cfg)
    assert torch.load(cfg.run_dir / "train/last.pt", weights_only=True)["epoch"] == 1  # stopped inside epoch 2
    monkeypatch.undo()
    run = _train(cfg)
    records = [json.loads(line) for line in run.path("train/metrics.jsonl").read_text().splitlines()]
    assert [(r["epoch"], "val" in r, "val_seconds" in r) for r in records] == [
        (1, False, False), (2, True, True), (3, True, True)]
    summary = run.stage("train").summary
    assert summary["val"] == records[-1]["val"] == every_epoch.stage("train").summary["val"]
    a = torch.load(every_epoch.path("train/model.pt"), weights_only=True)["state_dict"]
    b = torch.load(run.path("train/model.pt"), weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_refuses_a_checkpoint_of_another_config(tmp_path):
    cfg = validate_config(tiny_dict(tmp_path, train={"epochs": 1}))
    run = _train(cfg)
    run.forget("train")  # as if it had been interrupted
    other = validate_config(tiny_dict(tmp_path, train={"epochs": 1}, model={"arch": "resnet32"}))
    with pytest.raises(UsageError, match="--from train"):
        _train(other)


def test_vanilla_trains_one_plain_network(tmp_path):
    cfg = validate_config(tiny_dict(tmp_path, model={"method": "vanilla"}, train={"epochs": 1}))
    run = _train(cfg)
    summary = run.stage("train").summary
    assert summary["method"] == "vanilla" and list(summary["val"]) == ["branches"]
    model, _ = checkpoint.load_model(run.path("train/model.pt"))
    assert type(model).__name__ == "SingleNet" and summary["spec"]["method"] == "single"


def test_ctrl_c_during_the_last_validation_pass_stops_and_resumes(tmp_path, monkeypatch):
    """Ctrl-C while the last epoch is validated must not be ignored (training would finish and `run` go on)."""
    cfg = validate_config(tiny_dict(tmp_path, train={"epochs": 1}))
    pressed = []
    real_evaluate = train_stage.evaluate

    def evaluate_then_ctrl_c(*args, **kwargs):
        pressed.append(True)
        return real_evaluate(*args, **kwargs)

    @contextlib.contextmanager
    def flag():
        yield lambda: bool(pressed)

    monkeypatch.setattr(train_stage, "evaluate", evaluate_then_ctrl_c)
    monkeypatch.setattr(fit, "catch_sigint", flag)
    with pytest.raises(fit.Interrupted, match="after epoch 1"):
        _train(cfg)
    assert torch.load(cfg.run_dir / "train/last.pt", weights_only=True)["epoch"] == 1
    metrics = (cfg.run_dir / "train/metrics.jsonl").read_text()
    monkeypatch.undo()
    steps = _count_steps(monkeypatch)
    run = _train(cfg)
    assert run.stage("train").status == "done" and run.stage("train").summary["epochs"] == 1
    assert steps == [] and run.path("train/metrics.jsonl").read_text() == metrics  # nothing trained again


@pytest.mark.parametrize("size,batch_size,world,accumulate,expected", [
    (320, 16, 1, 1, 20),   # no remainder
    (321, 16, 1, 1, 20),   # a last batch of one image is dropped
    (322, 16, 1, 1, 21),   # two images train BatchNorm: kept
    (325, 16, 1, 4, 20),   # 5 images in 4 micro-batches: one of them would hold one image
    (328, 16, 1, 4, 21),   # 8 images: 2 per micro-batch
    (55041, 128, 1, 1, 430),  # Fashion-MNIST with val_size 4959: 55041 = 430 x 128 + 1
    (33, 16, 2, 1, 1),     # 17 per rank (DistributedSampler pads): the one left over is dropped
    (1, 16, 1, 1, 0),      # too small for any batch
])
def test_training_batches_never_leave_a_micro_batch_of_one(size, batch_size, world, accumulate, expected):
    from pipeline.training.data import training_batches

    assert training_batches(size, batch_size, world, accumulate) == expected


def test_a_last_batch_of_one_image_trains(tmp_path):
    """385 synthetic images - 64 for validation = 321 = 20 x 16 + 1: the gate's BatchNorm1d got one image."""
    run = _train(validate_config(tiny_dict(tmp_path, data={"synthetic_size": 385}, train={"epochs": 1})))
    assert run.stage("train").status == "done"
