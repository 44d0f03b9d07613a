"""Where things run: the torch device and the ONNX Runtime providers."""

from __future__ import annotations

import torch

from pipeline.errors import UsageError


def resolve_device(choice: str) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise UsageError("train.device is 'cuda' but no CUDA GPU is visible; use device: auto or cpu")
    if choice == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda")


def onnx_providers(device: torch.device) -> list[str]:
    """CUDA only where a GPU really is: onnxruntime-gpu lists it even without one, then logs errors."""
    if device.type == "cuda":
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]
