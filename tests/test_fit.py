"""The one training loop (pipeline/training/fit.py) on its own: a tiny network, a loss passed in, Ctrl-C
mid-epoch, resume from last.pt to the weights of an uninterrupted run, sinks called once per epoch."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pipeline.errors import PipelineError, UsageError
from pipeline.rundir import RunDir
from pipeline.stage import StageContext
from pipeline.training import fit, loop
from tests.conftest import press_ctrl_c_at, tiny_dict

EPOCHS, BATCHES = 3, 4
IMAGES = torch.randn(BATCHES * 8, 1, 4, 4, generator=torch.Generator().manual_seed(0))
LABELS = torch.arange(len(IMAGES)) % 3


def _ctx(root) -> StageContext:
    from pipeline.config import validate_config

    cfg = validate_config(tiny_dict(root))
    return StageContext(cfg, RunDir(cfg.run_dir), torch.device("cpu"))


def _plan(ctx: StageContext, last_path, fingerprint: str = "f") -> fit.Plan:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.Dropout(0.5), nn.Linear(8, 3))  # dropout draws RNG
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return fit.Plan(model=model, optimizer=optimizer, scheduler=loop.scheduler(optimizer, "cosine", EPOCHS, BATCHES),
                    epochs=EPOCHS, batches_per_epoch=BATCHES, last_path=last_path, fingerprint=fingerprint,
                    device=ctx.device, stage="train", accumulate=2)


def _batches(epoch: int, skip: int):
    order = torch.randperm(len(IMAGES), generator=torch.Generator().manual_seed(epoch))
    for start in range(skip * 8, len(IMAGES), 8):
        idx = order[start:start + 8]
        yield IMAGES[idx], LABELS[idx]


def _run(ctx: StageContext, plan: fit.Plan, seen: list | None = None) -> list[dict]:
    def loss(batch, epochs_done):
        logits = plan.module(batch[0])
        return nn.functional.cross_entropy(logits, batch[1]), logits

    def record(epoch: fit.Epoch) -> dict:
        return {"epoch": epoch.number, "loss": epoch.loss, "acc": epoch.accuracy}

    start = fit.resume_point(ctx, plan)
    sinks = [lambda epoch, history: seen.append((epoch.number, len(history)))] if seen is not None else []
    return fit.fit(ctx, plan, start, _batches, loss, record=record, sinks=sinks)


def test_ctrl_c_then_resume_ends_with_the_weights_of_an_uninterrupted_run(tmp_path, monkeypatch):
    ctx = _ctx(tmp_path)
    whole = _plan(ctx, tmp_path / "whole.pt")
    history = _run(ctx, whole)
    assert [r["epoch"] for r in history] == [1, 2, 3] and all(r["acc"] is not None for r in history)

    interrupted = _plan(ctx, tmp_path / "last.pt")
    press_ctrl_c_at(monkeypatch, BATCHES + 1 + 2)  # epoch 1's 4 steps, the check after it, 2 steps of epoch 2
    with pytest.raises(fit.Interrupted, match="interrupted at epoch 2, batch 2"):
        _run(ctx, interrupted)
    saved = torch.load(tmp_path / "last.pt", weights_only=True)
    assert (saved["epoch"], saved["batch"]) == (1, 2)
    monkeypatch.undo()
    resumed, seen = _plan(ctx, tmp_path / "last.pt"), []
    again = _run(ctx, resumed, seen)
    assert seen == [(2, 2), (3, 3)]  # the sinks see each remaining epoch once, with the history so far
    assert again[0] == history[0]  # epoch 1's record as it was written before Ctrl-C
    a, b = whole.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_ctrl_c_after_an_epoch_stops_and_a_checkpoint_of_another_config_is_refused(tmp_path, monkeypatch):
    ctx = _ctx(tmp_path)
    press_ctrl_c_at(monkeypatch, BATCHES + 1)
    with pytest.raises(fit.Interrupted, match="interrupted after epoch 1"):
        _run(ctx, _plan(ctx, tmp_path / "last.pt"))
    monkeypatch.undo()
    with pytest.raises(UsageError, match="--from train"):
        fit.resume_point(ctx, _plan(ctx, tmp_path / "last.pt", fingerprint="other"))
    assert fit.resume_point(ctx, _plan(ctx, tmp_path / "last.pt", fingerprint="other"),
                            other_config="restart") == fit.Start()


def test_a_non_finite_loss_stops_with_the_hint(tmp_path):
    ctx = _ctx(tmp_path)
    plan = _plan(ctx, tmp_path / "last.pt")
    plan.loss_hint = "lower compress.lr"

    def exploding(batch, epochs_done):
        return plan.module(batch[0]).sum() * float("inf"), None

    with pytest.raises(PipelineError, match=r"the loss became (inf|nan|-inf) at epoch 1; lower compress.lr"):
        fit.fit(ctx, plan, fit.Start(), _batches, exploding, record=lambda epoch: {})
