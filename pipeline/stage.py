"""What every stage receives and returns. A stage is a module in `stages/` with one function,
`run(ctx: StageContext) -> StageResult`; it raises `StageSkipped(reason)` when it cannot run on this
machine (no TensorRT, no GPU) and `PipelineError` when it fails.

A stage reads other stages only through its context (`record`, `input`, `summary`), and only the stages
its row of the runner's table (pipeline/runner.py) declares: those are the stages whose outputs its
fingerprint covers, so an undeclared read could serve it stale results. The runner binds the context to
the stage it runs (`for_stage`); a read of any other stage raises `UndeclaredRead`."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from pipeline.config import Config
from pipeline.errors import UndeclaredRead
from pipeline.rundir import RunDir, StageRecord


@dataclasses.dataclass
class StageResult:
    outputs: dict[str, Path]  # files the stage wrote under the run directory, by name
    summary: dict[str, Any] = dataclasses.field(default_factory=dict)  # JSON-able figures for status/report


@dataclasses.dataclass
class StageContext:
    cfg: Config
    run: RunDir
    device: torch.device
    console: Console = dataclasses.field(default_factory=lambda: Console(quiet=True))
    rank: int = 0  # under torchrun: this process's rank (only rank 0 writes)
    world: int = 1
    fresh: bool = False  # --from train: start over instead of resuming from the last checkpoint
    label: str = ""  # put before progress descriptions (compare: which of its runs this is)
    stage: str | None = None  # the stage running with this context; None: no stage (the CLI's, compare's)
    reads: tuple[str, ...] = ()  # the stages `stage` may read: its row's `reads` in the runner's table

    def for_stage(self, stage: str, reads: tuple[str, ...]) -> StageContext:
        """This context for running `stage`, which may read only the stages `reads`."""
        return dataclasses.replace(self, stage=stage, reads=tuple(reads))

    def record(self, stage: str) -> StageRecord | None:
        """An earlier stage's record in the manifest; None when it has not run."""
        self._check_read(stage)
        return self.run.stage(stage)

    def input(self, stage: str, key: str) -> Path:
        """An earlier stage's output, checked against the sha256 in the manifest."""
        self._check_read(stage)
        return self.run.output(stage, key)

    def summary(self, stage: str) -> dict[str, Any]:
        """An earlier stage's summary; empty when it has not finished."""
        entry = self.record(stage)
        return entry.summary if entry else {}

    def stage_dir(self, stage: str) -> Path:
        return self.run.stage_dir(stage)

    def _check_read(self, stage: str) -> None:
        if self.stage is not None and stage not in self.reads:
            raise UndeclaredRead(f"stage '{self.stage}' read stage '{stage}', which its row in the runner's table "
                                 f"(pipeline/runner.py) does not declare (reads: {', '.join(self.reads) or 'none'}); "
                                 f"add '{stage}' to its reads so its fingerprint covers that input")
