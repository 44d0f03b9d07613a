"""torchrun with 2 CPU processes (gloo) against one process with the same global batch."""

import os
import subprocess
import sys

import pytest
import torch
import yaml

from pipeline import checkpoint
from pipeline.data import load_datasets
from pipeline.evaluate import evaluate
from pipeline.rundir import RunDir
from tests.conftest import tiny_dict

TOLERANCE = 1e-5  # max abs parameter difference after 2 epochs (measured: 0; summation order may differ)


def _launch(tmp_path, name, nproc, *command, **train):
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(tiny_dict(tmp_path / "runs", name=name, train={"epochs": 2, **train})))
    if nproc == 1:
        argv = [sys.executable, "-m", "pipeline.cli", *(command or ["train"]), str(path)]
    else:
        argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                "--module", "pipeline.cli", *(command or ["train"]), str(path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(argv, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    return RunDir(tmp_path / "runs" / name), done.stdout


@pytest.mark.slow
def test_two_processes_match_one_with_the_same_global_batch(tmp_path):
    # one process: batch 32 in 2 interleaved micro-batches == 2 processes with 16 each (BatchNorm sees 16)
    single, _ = _launch(tmp_path, "single", 1, batch_size=32, accumulate=2)
    ddp, output = _launch(tmp_path, "ddp", 2, "run", "--until", "strip", batch_size=16)
    assert output.count("train done in") == 1  # only rank 0 reports and writes
    assert sorted(p.name for p in ddp.path("train").iterdir()) == ["last.pt", "metrics.jsonl", "model.pt"]
    # after training, rank 0 alone ran the later stages
    assert [ddp.stage(s)["status"] for s in ("train", "select", "strip")] == ["done"] * 3
    a = checkpoint.load(single.path("train/model.pt"))["state_dict"]
    b = checkpoint.load(ddp.path("train/model.pt"))["state_dict"]
    params = [k for k in a if "running" not in k and "num_batches" not in k]
    worst = max((a[k] - b[k]).abs().max().item() for k in params)
    print(f"max parameter difference {worst:.2e}")
    assert worst < TOLERANCE, worst
    # evaluation split over 2 ranks counts every sample once: it equals one process evaluating the same model
    cfg_summary = ddp.stage("train")["summary"]
    model, _ = checkpoint.load_model(ddp.path("train/model.pt"))
    data = load_datasets(load_cfg(tmp_path / "ddp.yaml").data)
    assert evaluate(model, data.val, torch.device("cpu")) == cfg_summary["val"]
    assert evaluate(model, data.test, torch.device("cpu")) == cfg_summary["test"]


def load_cfg(path):
    from pipeline.config import load_config

    return load_config(path)
