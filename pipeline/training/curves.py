"""Live curves (train.tensorboard): a `fit` sink writing TensorBoard event files, per epoch, of the loss,
the learning rate, the training top-1 and, where the epoch validated, every branch's and ONE-E's top-1.

    sinks = [*curves.sinks(ctx, "train"), ...]   # empty when train.tensorboard is off: nothing imported

Watch them with `tensorboard --logdir artifacts/<name>` (train/tb and compress/tb are two runs).
"""

from __future__ import annotations

from typing import Any

from pipeline.errors import UsageError
from pipeline.stage import StageContext
from pipeline.training.fit import Epoch, Sink

INSTALL_HINT = "pip install -e '.[tensorboard]'"


def sinks(ctx: StageContext, stage: str) -> list[Sink]:
    """[the event-file sink] under <run>/<stage>/tb when train.tensorboard is on (rank 0 only), else []."""
    if not ctx.cfg.train.tensorboard or ctx.rank != 0:
        return []
    try:
        from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package
    except ImportError:
        raise UsageError(f"train.tensorboard needs the tensorboard package: {INSTALL_HINT} "
                         "(or set train.tensorboard false)") from None
    writer = SummaryWriter(log_dir=str(ctx.stage_dir(stage) / "tb"))

    def write(epoch: Epoch, history: list[dict[str, Any]]) -> None:
        for tag, value in scalars(epoch, history[-1]).items():
            writer.add_scalar(tag, value, epoch.number)
        writer.flush()  # live: readable while the next epoch runs
    return [write]


def scalars(epoch: Epoch, record: dict[str, Any]) -> dict[str, float]:
    """The curves of one epoch, by TensorBoard tag."""
    values = {"loss/train": epoch.loss, "lr": epoch.lr}
    if epoch.accuracy is not None:
        values["top1/train"] = epoch.accuracy
    val = record.get("val") or {}
    values |= {f"top1/val_branch{i}": acc for i, acc in enumerate(val.get("branches", ()))}
    if "teacher" in val:
        values["top1/val_one_e"] = val["teacher"]
    return values
