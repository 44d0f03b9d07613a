"""Do the ONE branches disagree after a pretrained start, with and without model.pretrained_branch_noise?

    python benchmarks/pretrained_branches.py --out /tmp/pretrained 0 0.1 0.3

A cheap stand-in for ImageNet weights (none are at hand offline): our resnet18 trained for one epoch on
6,000 Fashion-MNIST images of classes 0-4, saved in torchvision's names. Each noise level then fine-tunes ONE
(the train stage, 3 branches) from that file on 3,000 images of all ten classes for 2 epochs, and this prints
per epoch the validation top-1 of the branches and ONE-E, and after the last the share of the 1,000
validation images on which the branches' top-1 answers are not all the same.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch
import yaml

from pipeline.config import DataConfig
from pipeline.training import checkpoint, pretrained
from pipeline.training.data import load_datasets
from pipeline.training.models import ModelSpec, SingleNet, build_model


def pretrain(data, path: Path) -> None:
    """One epoch of a single resnet18 on classes 0-4, written with torchvision's state-dict names."""
    torch.manual_seed(0)
    keep = (data.train.labels < 5).nonzero().flatten()[:6000]
    net = SingleNet(ModelSpec("resnet18", num_classes=5, in_channels=1).single())
    optimizer = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    net.train()
    for images, labels in data.train.subset(keep).batches(64, seed=0, epoch=0, augment=True):
        loss = torch.nn.functional.cross_entropy(net(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    torch.save({pretrained.torchvision_name(k) or "fc." + k.split("fc.", 1)[1]: v
                for k, v in net.state_dict().items()}, path)


def disagreement(model_path: Path, data) -> float:
    saved = checkpoint.load(model_path)
    model = build_model(ModelSpec.from_dict(saved["spec"]))
    model.load_state_dict(saved["state_dict"])
    model.eval()
    with torch.no_grad():
        answers = torch.cat([model(x).branches.argmax(-1) for x, _ in data.val.batches(500)])
    return 100 * (answers != answers[:, :1]).any(1).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("noise", type=float, nargs="+")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    data = load_datasets(DataConfig(dataset="fashion-mnist", val_size=1000, download=False))
    start = args.out / "pre_fmnist04.pth"
    if not start.exists():
        pretrain(data, start)
    for noise in args.noise:
        name = f"noise{noise}_seed{args.seed}"
        cfg = {"name": name, "output_root": str(args.out / "runs"), "seed": args.seed,
               "data": {"dataset": "fashion-mnist", "val_size": 1000, "train_size": 3000, "download": False},
               "model": {"arch": "resnet18", "pretrained": str(start), "pretrained_branch_noise": noise},
               "train": {"epochs": 2, "batch_size": 64, "lr": 0.02, "schedule": "cosine", "device": "cpu"}}
        config = args.out / f"{name}.yaml"
        config.write_text(yaml.safe_dump(cfg))
        subprocess.run([sys.executable, "-m", "pipeline.cli", "run", str(config), "--until", "train"], check=True)
        train = args.out / "runs" / name / "train"
        history = [json.loads(line)["val"] for line in (train / "metrics.jsonl").read_text().splitlines()]
        print(json.dumps({"noise": noise, "seed": args.seed, "val": history,
                          "disagree_pct": round(disagreement(train / "model.pt", data), 1)}), flush=True)


if __name__ == "__main__":
    main()
