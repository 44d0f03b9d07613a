"""Training throughput (images/s) of ONE and of the vanilla network on the same backbone and batch.

    python benchmarks/train_throughput.py                      # ResNet-20, Fashion-MNIST shape, batch 128
    python benchmarks/train_throughput.py --arch resnet32 --shape 3,32,32 --classes 100 --device cuda --amp bf16

Times full optimisation steps (forward, the ONE loss or CE, backward, SGD) on fixed random batches, after
warm-up, so the figure is the model's cost and not the data pipeline's; CUDA is synchronised before the
clock is read. Prints both rates and their ratio (ONE costs about 1.65x one network in the paper's FLOPs).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from pipeline.config import LossConfig
from pipeline.training.loss import one_loss
from pipeline.training.models import ModelSpec, build_model


def images_per_second(spec: ModelSpec, shape: tuple[int, ...], batch: int, steps: int, warmup: int, repeats: int,
                      device: torch.device, amp: str, channels_last: bool) -> float:
    torch.manual_seed(0)
    model = build_model(spec).to(device).train()
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    images = torch.randn(batch, *shape, device=device).to(memory_format=memory_format)
    labels = torch.randint(0, spec.num_classes, (batch,), device=device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
    loss_cfg = LossConfig()

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            out = model(images)
            loss = one_loss(out, labels, loss_cfg, 0.5, 1).total if spec.method == "one" else F.cross_entropy(
                out.float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(warmup):
        step()
    rates = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        rates.append(steps * batch / (time.perf_counter() - start))
    return statistics.median(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet20")
    parser.add_argument("--shape", default="1,28,28", help="C,H,W of one image")
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--branches", type=int, default=3)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per repeat")
    parser.add_argument("--repeats", type=int, default=3, help="the median repeat is reported")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--amp", choices=["off", "bf16", "fp16"], default="off")
    parser.add_argument("--channels-last", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    shape = tuple(int(v) for v in args.shape.split(","))
    spec = ModelSpec(args.arch, args.classes, shape[0], branches=args.branches)
    common = (shape, args.batch, args.steps, args.warmup, args.repeats, device, args.amp, args.channels_last)
    one = images_per_second(spec, *common)
    vanilla = images_per_second(spec.single(), *common)
    result = {"arch": args.arch, "shape": list(shape), "batch": args.batch, "branches": args.branches,
              "device": torch.cuda.get_device_name(0) if device.type == "cuda" else f"cpu x{torch.get_num_threads()}",
              "amp": args.amp, "one_images_per_s": round(one, 1), "vanilla_images_per_s": round(vanilla, 1),
              "one_cost_vs_vanilla": round(vanilla / one, 2)}
    print(f"ONE ({args.branches} branches) {one:.0f} img/s | vanilla {vanilla:.0f} img/s | "
          f"ONE costs {vanilla / one:.2f}x a vanilla step ({result['device']}, batch {args.batch})")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
