"""What the train and compress stages' training loops share: the per-step learning-rate schedule, the
last.pt checkpoint they resume from, Ctrl-C as a flag read after each step, and the progress bar."""

from __future__ import annotations

import contextlib
import json
import math
import signal
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from torch import nn

from pipeline.errors import PipelineError, UsageError
from pipeline.stage import StageContext
from pipeline.training import checkpoint


class Interrupted(PipelineError):
    """Ctrl-C during training: a checkpoint was saved; running again resumes."""

    exit_code = 130


def scheduler(optimizer: torch.optim.Optimizer, schedule: str, epochs: int, steps_per_epoch: int,
              milestones: Sequence[int] = (), gamma: float = 0.1) -> torch.optim.lr_scheduler.LambdaLR:
    """Stepped after every optimizer step: cosine anneals to 0 within the run (short runs end annealed);
    multistep multiplies by gamma at the start of each milestone epoch; constant keeps the rate."""
    def factor(step: int) -> float:
        epochs_done = step / steps_per_epoch
        if schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(epochs_done / epochs, 1.0)))
        if schedule == "constant":
            return 1.0
        return gamma ** sum(m <= epochs_done for m in milestones)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def save_state(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler, *, epoch: int,
               batch: int, fingerprint: str, history: list, **extra: Any) -> None:
    """Everything a resumed run needs to continue bit for bit: weights, optimizer, schedule, RNG."""
    checkpoint.save(path, {
        "state_dict": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
        "epoch": epoch, "batch": batch, "fingerprint": fingerprint, "history": json.dumps(history),
        "rng_cpu": torch.get_rng_state(),
        "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [], **extra})


def resume(path: Path, fingerprint: str, model: nn.Module, optimizer, scheduler, *,
           stage: str = "train", what: str = "data/model/loss/train") -> tuple[int, int, list]:
    """Load `save_state`'s file into the model, optimizer and schedule; (epoch, batch, history)."""
    state = checkpoint.load(path)
    if state.get("fingerprint") != fingerprint:
        raise UsageError(f"{path} was written by a run with another {what} config; run with "
                         f"--from {stage} to start over (or use another run name)")
    try:
        model.load_state_dict(state["state_dict"])
    except RuntimeError:
        raise UsageError(f"{path} holds an incompatible architecture; run with --from {stage} to start "
                         "over") from None
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng_cpu"])
    if torch.cuda.is_available() and state["rng_cuda"]:
        torch.cuda.set_rng_state_all(state["rng_cuda"])
    return state["epoch"], state["batch"], json.loads(state["history"])


@contextlib.contextmanager
def catch_sigint() -> Iterator[Callable[[], bool]]:
    """Turn the first Ctrl-C into a flag read after each step; a second one stops at once."""
    hits = []

    def handler(signum, frame):
        if hits:
            raise KeyboardInterrupt
        hits.append(signum)

    try:
        previous = signal.signal(signal.SIGINT, handler)
    except ValueError:  # not the main thread: leave signals alone
        yield lambda: False
        return
    try:
        yield lambda: bool(hits)
    finally:
        signal.signal(signal.SIGINT, previous)


def progress_bar(ctx: StageContext) -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                    TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=ctx.console,
                    disable=ctx.console.quiet or ctx.rank != 0, transient=False)
