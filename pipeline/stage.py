"""What every stage receives and returns. A stage is a module in `stages/` with one function,
`run(ctx: StageContext) -> StageResult`; it raises `StageSkipped(reason)` when it cannot run on this
machine (no TensorRT, no GPU) and `PipelineError` when it fails."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from pipeline.config import Config
from pipeline.rundir import RunDir


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

    def input(self, stage: str, key: str) -> Path:
        """An earlier stage's output, checked against the sha256 in the manifest."""
        return self.run.output(stage, key)

    def summary(self, stage: str) -> dict[str, Any]:
        entry = self.run.stage(stage) or {}
        return entry.get("summary", {})

    def stage_dir(self, stage: str) -> Path:
        return self.run.stage_dir(stage)
