"""Training throughput (images/s) of ONE and of the vanilla network, in both memory formats.

    python benchmarks/train_throughput.py                      # ResNet-20, Fashion-MNIST shape, batch 128
    python benchmarks/train_throughput.py --arch resnet32 --shape 3,32,32 --classes 100 --device cuda --amp bf16

Times full optimisation steps (forward, the ONE loss or CE, backward, SGD) on fixed random batches, after
warm-up, so the figure is the model's cost and not the data pipeline's; CUDA is synchronised before the
clock is read. The four variants (ONE and vanilla, contiguous and channels_last) take turns within each
repeat, so a machine that slows down mid-run slows them all alike; the median repeat is reported.
ONE costs about 1.65x one network in the paper's FLOPs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F

from pipeline.config import LossConfig
from pipeline.deploy.timing import in_turns
from pipeline.training.loss import one_loss
from pipeline.training.models import ModelSpec, build_model


def training_step(spec: ModelSpec, shape: tuple[int, ...], batch: int, device: torch.device, amp: str,
                  channels_last: bool) -> Callable[[], None]:
    torch.manual_seed(0)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = build_model(spec).to(device).train().to(memory_format=memory_format)
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

    return step


def timed(step: Callable[[], None], steps: int, batch: int, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps * batch / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet20")
    parser.add_argument("--shape", default="1,28,28", help="C,H,W of one image")
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--branches", type=int, default=3)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per variant and repeat")
    parser.add_argument("--repeats", type=int, default=5, help="the median repeat is reported")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--amp", choices=["off", "bf16", "fp16"], default="off")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    shape = tuple(int(v) for v in args.shape.split(","))
    spec = ModelSpec(args.arch, args.classes, shape[0], branches=args.branches)
    steps = {(method, fmt): training_step(spec if method == "one" else spec.single(), shape, args.batch, device,
                                          args.amp, fmt == "channels_last")
             for method in ("one", "vanilla") for fmt in ("contiguous", "channels_last")}
    for step in steps.values():
        for _ in range(args.warmup):
            step()
    rates: dict[tuple[str, str], list[float]] = {key: [] for key in steps}

    def turn(key: tuple[str, str]) -> Callable[[int], None]:
        return lambda _: rates[key].append(timed(steps[key], args.steps, args.batch, device))

    failed = in_turns({f"{method} {fmt}": turn((method, fmt)) for method, fmt in steps}, args.repeats)
    if failed:
        raise SystemExit(f"{', '.join(failed)} failed: {next(iter(failed.values()))}")
    median = {key: statistics.median(values) for key, values in rates.items()}
    where = torch.cuda.get_device_name(0) if device.type == "cuda" else f"cpu x{torch.get_num_threads()}"
    for fmt in ("contiguous", "channels_last"):
        one, vanilla = median["one", fmt], median["vanilla", fmt]
        print(f"{fmt:<13} ONE ({args.branches} branches) {one:.0f} img/s | vanilla {vanilla:.0f} img/s | "
              f"ONE costs {vanilla / one:.2f}x a vanilla step")
    gain = {method: median[method, "channels_last"] / median[method, "contiguous"] for method in ("one", "vanilla")}
    print(f"channels_last / contiguous: ONE {gain['one']:.2f}x, vanilla {gain['vanilla']:.2f}x "
          f"({where}, batch {args.batch}, median of {args.repeats} interleaved repeats)")
    print(json.dumps({"arch": args.arch, "shape": list(shape), "batch": args.batch, "branches": args.branches,
                      "device": where, "amp": args.amp,
                      "images_per_s": {f"{m}_{f}": round(v, 1) for (m, f), v in median.items()},
                      "channels_last_gain": {m: round(g, 2) for m, g in gain.items()}}))


if __name__ == "__main__":
    main()
