"""torchrun with 2 CPU processes (gloo) against one process with the same global batch."""

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.rundir import RunDir
from pipeline.training import checkpoint
from pipeline.training.data import load_datasets
from pipeline.training.evaluate import evaluate
from pipeline.training.models import ModelSpec, build_model
from stages import train as train_stage
from tests.conftest import tiny_dict, trained_epochs

TOLERANCE = 1e-5  # max abs parameter difference after 3 epochs (measured: 0; summation order may differ)


def _config(tmp_path, name, **train) -> Path:
    path = tmp_path / f"{name}.yaml"
    # enough steps per epoch that a kill after epoch 1 lands inside epoch 2
    path.write_text(yaml.safe_dump(tiny_dict(tmp_path / "runs", name=name, data={"synthetic_size": 768},
                                             train={"epochs": 3, **train})))
    return path


def _argv(tmp_path, name, nproc, *command, **train):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "--module", "pipeline.cli", *(command or ["train"]), str(_config(tmp_path, name, **train))]


ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _launch(tmp_path, name, nproc, *command, **train):
    argv = _argv(tmp_path, name, nproc, *command, **train)
    done = subprocess.run(argv, capture_output=True, text=True, timeout=600, env=ENV)
    assert done.returncode == 0, done.stdout + done.stderr
    return RunDir(tmp_path / "runs" / name), done.stdout


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """One process (this one, at the workers' 1 thread): batch 32 in 2 interleaved micro-batches == 2 processes
    with 16 each (BatchNorm sees 16)."""
    root = tmp_path_factory.mktemp("single")
    config = _config(root, "single", batch_size=32, accumulate=2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = CliRunner().invoke(app, ["train", str(config)])
    finally:
        torch.set_num_threads(threads)
    assert result.exit_code == 0, result.output
    return RunDir(root / "runs" / "single")


def _worst_difference(a_run, b_run):
    a = checkpoint.load(a_run.path("train/model.pt"))["state_dict"]
    b = checkpoint.load(b_run.path("train/model.pt"))["state_dict"]
    params = [k for k in a if "running" not in k and "num_batches" not in k]
    return max((a[k] - b[k]).abs().max().item() for k in params)


@pytest.mark.slow
def test_two_processes_match_one_with_the_same_global_batch(tmp_path, single):
    ddp, output = _launch(tmp_path, "ddp", 2, "run", "--until", "strip", batch_size=16)
    assert output.count("train done in") == 1  # only rank 0 reports and writes
    assert sorted(p.name for p in ddp.path("train").iterdir()) == ["last.pt", "metrics.jsonl", "model.pt"]
    # after training, rank 0 alone ran the later stages
    assert [ddp.stage(s).status for s in ("train", "select", "strip")] == ["done"] * 3
    worst = _worst_difference(single, ddp)
    print(f"max parameter difference {worst:.2e}")
    assert worst < TOLERANCE, worst
    # evaluation split over 2 ranks counts every sample once: it equals one process evaluating the same model
    cfg_summary = ddp.stage("train").summary
    model, _ = checkpoint.load_model(ddp.path("train/model.pt"))
    data = load_datasets(load_cfg(tmp_path / "ddp.yaml").data)
    assert evaluate(model, data.val, torch.device("cpu")) == cfg_summary["val"]
    assert evaluate(model, data.test, torch.device("cpu")) == cfg_summary["test"]


@pytest.mark.slow
def test_killed_torchrun_resumes_to_the_same_weights(tmp_path, single):
    argv = _argv(tmp_path, "ddp", 2, batch_size=16)
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    last = tmp_path / "runs/ddp/train/last.pt"
    deadline = time.monotonic() + 300
    while not last.exists():  # epoch 1 saved: kill every process of the job inside epoch 2
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    for pid in [proc.pid, *_descendants(proc.pid)]:  # torchrun and its workers (their own sessions)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.wait()
    saved = torch.load(last, weights_only=True)
    metrics = last.with_name("metrics.jsonl")  # written just after last.pt: a kill in between leaves none
    kept = metrics.read_text() if metrics.exists() else ""
    resumed, output = _launch(tmp_path, "ddp", 2, batch_size=16)
    assert "resuming from" in output and saved["epoch"] >= 1
    # only the remaining epochs ran, the finished ones' records (with their times) kept, no leftovers
    assert trained_epochs(output) == list(range(saved["epoch"] + 1, 4)), output
    assert metrics.read_text().startswith(kept)
    assert not list((tmp_path / "runs").rglob(".*.tmp"))
    assert _worst_difference(single, resumed) < TOLERANCE


def _descendants(pid: int) -> list[int]:
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            parents[int(stat.parent.name)] = int(fields[1])
    found, frontier = [], [pid]
    while frontier:
        children = [child for child, parent in parents.items() if parent in frontier]
        found += children
        frontier = children
    return found


def load_cfg(path):
    from pipeline.config import load_config

    return load_config(path)


def _untrained_one_model(rank: int) -> torch.nn.Module:
    """The same untrained ONE model on every rank (near chance: an evaluation that is not 100%), with
    BatchNorm running statistics that differ per rank, as after training on different shards."""
    torch.manual_seed(0)
    model = build_model(ModelSpec("resnet20", num_classes=4, in_channels=3, branches=3, width=4))
    generator = torch.Generator().manual_seed(100 + rank)
    for name, buffer in model.named_buffers():
        if "running_mean" in name:
            buffer.copy_(torch.randn(buffer.shape, generator=generator))
    return model


def _evaluate_on_two_ranks(rank: int, world: int, rendezvous: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=rendezvous, rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        model = _untrained_one_model(rank)
        val = load_datasets(load_cfg(Path(out_dir) / "tiny.yaml").data).val.subset(range(63))  # odd: padding
        train_stage._broadcast_buffers(model)  # what training does before each evaluation
        result = evaluate(model, val, torch.device("cpu"), batch_size=8, rank=rank, world=world)
        torch.save({"val": result, "buffers": dict(model.named_buffers())}, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_ranks_evaluate_with_rank_0s_running_statistics_and_count_every_sample_once(tmp_path):
    """Two gloo ranks whose BatchNorm statistics differ: after the broadcast training does, both hold rank
    0's, and the sharded evaluation of 63 images (an odd count: the sampler pads one rank) equals one
    process evaluating rank 0's model, on an untrained model far from 100%."""
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(tiny_dict(tmp_path / "runs")))
    mp.start_processes(_evaluate_on_two_ranks, args=(2, f"file://{tmp_path / 'rendezvous'}", str(tmp_path)),
                       nprocs=2, start_method="spawn")
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    reference = _untrained_one_model(0)
    assert all(torch.equal(ranks[1]["buffers"][k], b) and torch.equal(ranks[0]["buffers"][k], b)
               for k, b in reference.named_buffers())
    val = load_datasets(load_cfg(tmp_path / "tiny.yaml").data).val.subset(range(63))
    alone = evaluate(reference, val, torch.device("cpu"), batch_size=8)
    assert ranks[0]["val"] == ranks[1]["val"] == alone
    assert max(alone["branches"]) < 90  # far from 100%: a rank counting only its own shard would differ
