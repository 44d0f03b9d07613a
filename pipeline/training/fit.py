"""The one training loop of the train and compress stages: SGD steps on a loss the stage passes in, a
progress bar, Ctrl-C as a flag read after every step and after every epoch, a stop on a non-finite loss,
and `last.pt` written after every epoch and on Ctrl-C, from which the next run resumes bit for bit.

    plan = Plan(model=net, optimizer=sgd, scheduler=lr, epochs=3, batches_per_epoch=20,
                last_path=out / "last.pt", fingerprint=digest, device=device, stage="train")
    start = resume_point(ctx, plan)                     # where an interrupted run stopped (epoch 0 when none)
    history = fit(ctx, plan, start, batches, loss, record=to_json, sinks=[print_epoch_line])

`batches(epoch, skip)` yields tuples of tensors whose first is the images and second the labels;
`loss(batch, epochs_done)` gets the batch on the device and returns (loss, logits or None), the logits
(compared with the labels) being what the progress bar's accuracy shows. `record(epoch)` turns a finished
`Epoch` into the JSON kept in the history (train validates there); every sink then receives the `Epoch`
and the history so far (the epoch's record last), after the checkpoint: that is where per-epoch metrics go
(metrics.jsonl, the console's epoch line, any other writer of curves).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Literal, Sequence

import torch
from rich.markup import escape
from torch import nn

from pipeline.config import Config
from pipeline.errors import PipelineError
from pipeline.stage import StageContext
from pipeline.training import checkpoint, loop
from pipeline.training.loop import Interrupted, catch_sigint  # tests replace fit.catch_sigint

Batch = tuple[torch.Tensor, ...]
LossFn = Callable[[Batch, float], tuple[torch.Tensor, "torch.Tensor | None"]]


@dataclasses.dataclass
class Plan:
    """What one run of the loop trains, how, and where it keeps its progress."""

    model: nn.Module  # the weights last.pt holds
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    epochs: int
    batches_per_epoch: int
    last_path: Path
    fingerprint: str  # of what the weights depend on: a last.pt of another config is not this run's progress
    device: torch.device
    stage: str  # the stage whose loop this is: `--force <stage>` starts it over
    depends_on: str = "data/model/loss/train"  # the config sections the fingerprint covers, for messages
    title: str = "epoch"  # what progress and epoch lines call one epoch
    resuming: str = "resuming"  # how the message of a resumed run begins ("resuming the fine-tune")
    loss_hint: str = "lower train.lr or turn off train.amp"  # what to do when the loss is not finite
    module: nn.Module | None = None  # what the loss calls and `train()` is set on (DDP-wrapped); None: model
    accumulate: int = 1  # interleaved micro-batches per step: the split DistributedSampler makes across ranks
    amp_dtype: torch.dtype | None = None  # autocast to this (CUDA only); None: fp32
    memory_format: torch.memory_format = torch.contiguous_format  # of the images fed to the loss
    state_extra: dict[str, Any] = dataclasses.field(default_factory=dict)  # more entries for last.pt
    scaler: torch.amp.GradScaler = dataclasses.field(init=False)  # fp16 loss scaling (off otherwise)

    def __post_init__(self) -> None:
        self.module = self.module if self.module is not None else self.model
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)


@dataclasses.dataclass(frozen=True)
class Start:
    """Where the loop begins: after `epoch` finished epochs and `batch` batches of the next one."""

    epoch: int = 0
    batch: int = 0
    history: list[dict[str, Any]] = dataclasses.field(default_factory=list)


@dataclasses.dataclass(frozen=True)
class Epoch:
    """One finished epoch as the loop measured it (over this process's images; img/s over all ranks)."""

    number: int  # from 1
    loss: float  # mean over the epoch's images (of this run: a resumed epoch counts its remaining batches)
    accuracy: float | None  # top-1 % of the logits the loss returned; None when it returned none
    lr: float  # after the epoch's last step
    seconds: float
    images_per_s: float


Sink = Callable[[Epoch, list[dict[str, Any]]], None]


def setup(cfg: Config, device: torch.device) -> None:
    """train.threads and train.deterministic, for every loop (cuDNN autotunes when not deterministic)."""
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=device.type == "cuda")
        torch.backends.cudnn.benchmark = False
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True


def resume_point(ctx: StageContext, plan: Plan, *, other_config: Literal["refuse", "restart"] = "refuse") -> Start:
    """Load `plan.last_path` into the plan's model, optimizer and schedule (and the RNG) unless the run is
    fresh. A checkpoint of another config stops with the fix (`refuse`) or is ignored (`restart`: a finished
    or abandoned loop of other inputs, not this one's progress)."""
    path = plan.last_path
    if not path.exists() or ctx.fresh:
        return Start()
    if other_config == "restart" and checkpoint.load(path).get("fingerprint") != plan.fingerprint:
        return Start()
    epoch, batch, history = loop.resume(path, plan.fingerprint, plan.model, plan.optimizer, plan.scheduler,
                                        stage=plan.stage, what=plan.depends_on)
    # one line however long the path: a path folded over lines cannot be pasted
    ctx.console.print(f"{plan.resuming} from {escape(str(path))}: epoch {epoch + 1}, batch {batch}", soft_wrap=True)
    return Start(epoch, batch, history)


def remaining_batches(plan: Plan, start: Start) -> int:
    return (plan.epochs - start.epoch) * plan.batches_per_epoch - start.batch


def fit(ctx: StageContext, plan: Plan, start: Start, batches: Callable[[int, int], Iterable[Batch]], loss: LossFn,
        *, record: Callable[[Epoch], dict[str, Any]], sinks: Sequence[Sink] = ()) -> list[dict[str, Any]]:
    """Train from `start` to `plan.epochs`; returns the history (one record per epoch, resumed ones kept)."""
    history = list(start.history)
    with loop.progress_bar(ctx) as progress, catch_sigint() as interrupted:
        task = progress.add_task(plan.title, total=remaining_batches(plan, start))

        def after_step(epoch: int, step: int, tally: _Tally) -> None:
            progress.update(task, advance=1, description=f"{ctx.label}{plan.title} {epoch + 1}/{plan.epochs} "
                                                         f"{tally.text(ctx.world)}")
            if interrupted():
                _save(ctx, plan, epoch, step + 1, history)
                raise Interrupted(f"interrupted at {plan.title} {epoch + 1}, batch {step + 1}; checkpoint saved to "
                                  f"{plan.last_path}: run the same command again to resume")

        for number in range(start.epoch, plan.epochs):
            skip = start.batch if number == start.epoch else 0
            epoch = _epoch(ctx, plan, number, batches(number, skip), skip, loss, after_step)
            history.append(record(epoch))
            _save(ctx, plan, number + 1, 0, history)
            for sink in sinks:
                sink(epoch, history)
            if interrupted():  # Ctrl-C during the epoch's end (validation): stop here too, even after the last
                raise Interrupted(f"interrupted after {plan.title} {number + 1}; checkpoint saved to "
                                  f"{plan.last_path}: run the same command again to resume")
    return history


def epoch_line(title: str, epoch: Epoch, detail: str = "") -> str:
    """The line printed after each epoch, e.g. 'epoch 3: loss 0.412, val ..., 950 img/s'."""
    return f"{title} {epoch.number}: loss {epoch.loss:.3f}{detail}, {epoch.images_per_s:.0f} img/s"


class _Tally:
    """Loss, correct top-1 and images over an epoch's steps so far."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.loss = self.correct = 0.0
        self.images = 0
        self.scored = False

    def add(self, loss: torch.Tensor, logits: torch.Tensor | None, labels: torch.Tensor) -> None:
        self.loss += loss.item() * len(labels)
        self.images += len(labels)
        if logits is not None:
            self.correct += (logits.argmax(1) == labels).sum().item()
            self.scored = True

    def text(self, world: int) -> str:
        acc = f" acc {100 * self.correct / self.images:.1f}%" if self.scored else ""
        speed = self.images * world / max(time.perf_counter() - self.started, 1e-9)
        return f"loss {self.loss / self.images:.3f}{acc} {speed:.0f} img/s"


def _epoch(ctx: StageContext, plan: Plan, number: int, batches: Iterable[Batch], skip: int, loss: LossFn,
           after_step: Callable[[int, int, _Tally], None]) -> Epoch:
    plan.module.train()
    tally = _Tally()
    for step, batch in enumerate(itertools.islice(batches, plan.batches_per_epoch - skip), start=skip):
        _step(plan, batch, loss, number, number + step / plan.batches_per_epoch, tally)
        after_step(number, step, tally)
    if plan.device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - tally.started
    return Epoch(number=number + 1, loss=tally.loss / max(tally.images, 1),
                 accuracy=100 * tally.correct / max(tally.images, 1) if tally.scored else None,
                 lr=plan.optimizer.param_groups[0]["lr"], seconds=round(seconds, 2),
                 images_per_s=round(tally.images * ctx.world / max(seconds, 1e-9), 1))


def _step(plan: Plan, batch: Batch, loss_fn: LossFn, epoch: int, epochs_done: float, tally: _Tally) -> None:
    """One optimizer step over `plan.accumulate` micro-batches; DDP syncs gradients on the last one only."""
    plan.optimizer.zero_grad(set_to_none=True)
    for part in range(plan.accumulate):
        micro = _to_device(tuple(t[part::plan.accumulate] for t in batch), plan)
        last_part = part == plan.accumulate - 1
        syncing = last_part or not isinstance(plan.module, nn.parallel.DistributedDataParallel)
        with contextlib.nullcontext() if syncing else plan.module.no_sync():
            with torch.autocast(plan.device.type, dtype=plan.amp_dtype, enabled=plan.amp_dtype is not None):
                loss, logits = loss_fn(micro, epochs_done)
            if not torch.isfinite(loss):
                raise PipelineError(f"the loss became {loss.item()} at {plan.title} {epoch + 1}; {plan.loss_hint}")
            plan.scaler.scale(loss / plan.accumulate).backward()
        tally.add(loss, logits, micro[1])
    plan.scaler.step(plan.optimizer)
    plan.scaler.update()
    plan.scheduler.step()


def _to_device(batch: Batch, plan: Plan) -> Batch:
    images, *rest = batch
    return (images.to(plan.device, non_blocking=True, memory_format=plan.memory_format),
            *(t.to(plan.device, non_blocking=True) for t in rest))


def _save(ctx: StageContext, plan: Plan, epoch: int, batch: int, history: list[dict[str, Any]]) -> None:
    if ctx.rank == 0:  # under torchrun only rank 0 writes
        loop.save_state(plan.last_path, plan.model, plan.optimizer, plan.scheduler, epoch=epoch, batch=batch,
                        fingerprint=plan.fingerprint, history=history, **plan.state_extra)
