"""Top-1 accuracy of every head of a model over a split, exact across torchrun ranks."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from pipeline.training.models import ONEOutput
from pipeline.training.splits import Split


@torch.no_grad()
def evaluate(model: nn.Module, data: Split, device: torch.device, batch_size: int = 512,
             rank: int = 0, world: int = 1, channels_last: bool = False) -> dict:
    """{"branches": [acc per branch], "teacher": acc, "average": acc} for ONE, {"branches": [acc]} for
    one network; in percent. Each sample is counted once, on exactly one rank."""
    model.eval()
    spec = getattr(model, "module", model).spec
    heads = spec.branches + 2 if spec.method == "one" else 1
    correct = torch.zeros(heads, dtype=torch.long, device=device)
    seen = torch.zeros((), dtype=torch.long, device=device)
    for images, labels in data.batches(batch_size, rank=rank, world=world):
        images = images.to(device, non_blocking=True)
        if channels_last:
            images = images.to(memory_format=torch.channels_last)
        labels = labels.to(device)
        correct += torch.stack([(h.argmax(1) == labels).sum() for h in _heads(model(images))])
        seen += len(labels)
    if world > 1:
        dist.all_reduce(correct)
        dist.all_reduce(seen)
    acc = (100.0 * correct.double() / max(int(seen), 1)).tolist()
    if spec.method == "one":
        return {"branches": acc[:-2], "teacher": acc[-2], "average": acc[-1]}
    return {"branches": acc}


def _heads(out: ONEOutput | torch.Tensor) -> list[torch.Tensor]:
    if isinstance(out, ONEOutput):
        return [*out.branches.unbind(1), out.teacher, out.branches.mean(1)]
    return [out]
