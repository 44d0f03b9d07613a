"""Model files: a dict of tensors and primitives, loadable with `torch.load(weights_only=True)`,
carrying the `ModelSpec` and data facts needed to rebuild and feed the model without the config."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.errors import ArtifactError
from pipeline.rundir import atomic_path
from pipeline.training.models import ModelSpec, build_model


def save(path: Path, payload: dict[str, Any]) -> None:
    """Equal payloads give equal bytes: `torch.save` names the zip's records after the file it writes, and
    the temporary file's name is random, so serialise in memory (records under "archive/") and write
    the bytes ourselves; a full disk then raises OSError(ENOSPC), not the zip writer's RuntimeError."""
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buffer.getbuffer())


def load(path: Path) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ArtifactError(f"{path} not found") from None
    except Exception as exc:  # truncated zip, wrong format, disallowed global: never used
        raise ArtifactError(f"{path} is not a readable checkpoint ({type(exc).__name__}); it may be truncated or "
                            "corrupted: rerun the stage that wrote it with --force") from None


def load_model(path: Path) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a model (in eval mode) from a model file; returns it and the file's payload."""
    payload = load(path)
    spec = ModelSpec.from_dict(payload["spec"])
    model = build_model(spec)
    try:
        model.load_state_dict(payload["state_dict"])
    except RuntimeError as exc:
        first = str(exc).splitlines()[1].strip() if len(str(exc).splitlines()) > 1 else str(exc)
        raise ArtifactError(f"{path} does not fit architecture {spec.arch} ({first}); it comes from another "
                            "model: rerun with --from train") from None
    return model.eval(), payload
