"""The command line as a user meets it: exit codes, one-line errors, caching, the lock, corruption, faults."""

import errno
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.rundir import RunDir, sha256_file
from pipeline.runner import STAGE_NAMES
from pipeline.training import checkpoint
from tests.conftest import copy_trained, tiny_dict, trained_epochs

runner = CliRunner()


def write_config(tmp_path, filename="c.yaml", **sections):
    path = tmp_path / filename
    path.write_text(yaml.safe_dump(tiny_dict(tmp_path / "runs", **sections)))
    return path


def snapshot(root):
    return {p: sha256_file(p) for p in sorted(root.rglob("*")) if p.is_file() and p.name != ".lock"}


def test_help_on_every_command():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("run", "train", "select", "strip", "export", "engine", "triton", "bench", "report", "status"):
        assert command in result.output
        sub = runner.invoke(app, [command, "--help"])
        assert sub.exit_code == 0 and "--set" in sub.output, command


def test_help_lists_the_stages_in_order_with_product_names():
    output = runner.invoke(app, ["--help"], env={"COLUMNS": "200"}).output  # no wrapping
    listed = [m.group(1) for m in re.finditer(r"^│ ([a-z-]+) ", output, re.M)]
    stages = [name for name in listed if name in STAGE_NAMES]
    assert stages == list(STAGE_NAMES) and listed.index("run") < listed.index(STAGE_NAMES[0])
    for words in ("Train ONE (or vanilla)", "Export ONNX (branch and ONE-E", "Build a TensorRT engine",
                  "Write a Triton model repository"):
        assert words in output


def test_status_of_a_manifest_file_says_to_pass_the_run_directory(trained_run):
    cfg, run = trained_run
    result = runner.invoke(app, ["status", str(run.manifest_path)])
    assert result.exit_code == 2 and "is a run's manifest, not a config" in result.output, result.output
    assert runner.invoke(app, ["status", str(run.root)]).exit_code == 0


def test_train_then_rerun_is_cached(tmp_path):
    config = write_config(tmp_path, train={"epochs": 1})
    first = runner.invoke(app, ["train", str(config)])
    assert first.exit_code == 0, first.output
    assert "train done" in first.output
    run = RunDir(tmp_path / "runs/tiny")
    before = run.stage("train").finished, run.output("train", "model").stat().st_mtime_ns
    second = runner.invoke(app, ["train", str(config)])
    assert second.exit_code == 0 and "up to date" in second.output
    assert (run.stage("train").finished, run.output("train", "model").stat().st_mtime_ns) == before  # no work
    assert (tmp_path / "runs/tiny/config.yaml").exists()


BAD_INPUTS = [  # (name, extra args or None, yaml edits, exit code, message fragment)
    ("missing config", ["{tmp}/none.yaml"], None, 2, "config file not found"),
    ("yaml syntax", None, "train:\n  epochs: 2\n bad", 2, "YAML syntax error"),
    ("unknown key", ["--set", "train.epoch=3"], None, 2, "did you mean 'epochs'"),
    ("wrong type", ["--set", "train.batch_size=big"], None, 2, "train.batch_size"),
    ("zero epochs", ["--set", "train.epochs=0"], None, 2, "train.epochs"),
    ("negative batch", ["--set", "train.batch_size=-1"], None, 2, "train.batch_size"),
    ("zero branches", ["--set", "model.branches=0"], None, 2, "model.branches"),
    ("unknown dataset", ["--set", "data.dataset=mnist"], None, 2, "data.dataset"),
    ("unknown arch", ["--set", "model.arch=vgg"], None, 2, "model.arch"),
    ("dataset not found", ["--set", "data.dataset=cifar10", "--set", "data.download=false",
                           "--set", "data.root={tmp}/empty", "--set", "name=other"], None, 2, "cifar10 not found"),
    ("another config", ["--set", "model.width=8"], None, 2, "trained with another config"),
    ("bad stage name", ["--until", "deploy"], None, 2, "not a stage"),
]


@pytest.mark.parametrize("name,args,text,code,fragment", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_is_one_line_with_exit_code_and_nothing_lost(trained_run, tmp_path, name, args, text, code,
                                                               fragment):
    config, run = copy_trained(trained_run, tmp_path)
    before = snapshot(run.root)
    if text is not None:
        config.write_text(text)
    argv = ["run", str(config), *(a.format(tmp=tmp_path) for a in (args or []))]
    if args and args[0].endswith("none.yaml"):
        argv = ["run", *(a.format(tmp=tmp_path) for a in args)]
    result = runner.invoke(app, argv)
    assert result.exit_code == code, result.output
    assert fragment in result.output
    assert "Traceback" not in result.output
    assert len([line for line in result.output.splitlines() if line.startswith("error:")]) == 1
    assert snapshot(run.root) == before


def test_incompatible_checkpoint_is_refused(tmp_path):
    config = write_config(tmp_path, train={"epochs": 1})
    run = RunDir(tmp_path / "runs/tiny")
    checkpoint.save(run.path("train/last.pt"), {"spec": {}, "state_dict": {}, "fingerprint": "from-elsewhere"})
    result = runner.invoke(app, ["train", str(config)])
    assert result.exit_code == 2 and "another data/model/loss/train config" in result.output


def test_disk_full_fails_cleanly_and_keeps_earlier_outputs(trained_run, tmp_path, monkeypatch):
    """Where no real full filesystem can be made (tests/test_faults.py mounts one as root): the model file's
    bytes are written as a full disk writes them, half, then ENOSPC."""
    config, run = copy_trained(trained_run, tmp_path)
    before = snapshot(run.root)
    real_write = Path.write_bytes

    def full_disk(self, data):
        real_write(self, bytes(data)[:100])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", full_disk)
    result = runner.invoke(app, ["train", str(config), "--force"])
    assert result.exit_code == 1 and "disk full" in result.output
    assert snapshot(run.root) == before  # the manifest and config.yaml included
    assert not [p for p in run.root.rglob("*.tmp")]


def test_second_run_on_the_same_directory_is_refused(trained_run, tmp_path):
    config, run = copy_trained(trained_run, tmp_path)
    with run.lock():
        result = runner.invoke(app, ["run", str(config), "--until", "train"])
    assert result.exit_code == 1 and "in use by another one-pipeline process" in result.output
    other = runner.invoke(app, ["run", str(config), "--until", "train", "--set", "name=elsewhere",
                                "--set", "train.epochs=1"])
    assert other.exit_code == 0, other.output


def test_corrupted_checkpoint_is_detected_never_used(trained_run, tmp_path):
    config, run = copy_trained(trained_run, tmp_path)
    model = run.path("train/model.pt")
    model.write_bytes(model.read_bytes()[: model.stat().st_size // 2])
    result = runner.invoke(app, ["run", str(config), "--until", "select"])
    assert result.exit_code == 1 and "sha256" in result.output and "--from train" in result.output
    assert run.stage("select") is None
    status = runner.invoke(app, ["status", str(config)])
    assert "corrupted" in status.output
    by_dir = runner.invoke(app, ["status", str(run.root)])
    assert by_dir.exit_code == 0 and "corrupted" in by_dir.output


def _cli(config, *args, command="train"):
    return subprocess.Popen([sys.executable, "-m", "pipeline.cli", command, str(config), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=os.getcwd())


def _in_process(config, command="train"):
    """A command run in this process, as a user's next command after a killed one: it shares no memory with
    that process, only the run directory (and starts without a second torch import)."""
    result = runner.invoke(app, [command, str(config)])
    return result.exit_code, result.output


def _wait_for(path, proc, timeout=600):  # a bound against hangs, not a speed test: loaded 2-core CPUs are slow
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()[0]
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.05)


KILLED_TRAINING = {"data": {"synthetic_size": 512}, "train": {"epochs": 3}}


@pytest.fixture(scope="module")
def uninterrupted_training(tmp_path_factory) -> Path:
    """The model file of KILLED_TRAINING trained without a break (once for both signals)."""
    root = tmp_path_factory.mktemp("uninterrupted")
    reference = write_config(root, "ref.yaml", name="ref", **KILLED_TRAINING)
    code, output = _in_process(reference)
    assert code == 0, output
    return root / "runs/ref/train/model.pt"


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["SIGKILL", "SIGINT"])
def test_killed_training_resumes_to_the_uninterrupted_result(uninterrupted_training, tmp_path, sig):
    config = write_config(tmp_path, **KILLED_TRAINING)
    proc = _cli(config)
    _wait_for(tmp_path / "runs/tiny/train/last.pt", proc)  # epoch 1 finished: now kill it inside epoch 2
    proc.send_signal(sig)
    output = proc.communicate(timeout=600)[0]
    if sig == signal.SIGINT:
        assert proc.returncode == 130 and "checkpoint saved" in output, output
    else:
        assert proc.returncode == -signal.SIGKILL
    train_dir = tmp_path / "runs/tiny/train"
    saved = torch.load(train_dir / "last.pt", weights_only=True)
    metrics = train_dir / "metrics.jsonl"  # written just after last.pt: a kill in between leaves none
    kept = metrics.read_text() if metrics.exists() else ""
    assert saved["epoch"] >= 1
    code, output = _in_process(config)
    assert code == 0, output
    # one line, however long the path
    assert re.search(rf"^resuming from \S+: epoch {saved['epoch'] + 1}, batch {saved['batch']}$", output, re.M), output
    # only the remaining epochs ran again, and the finished epochs' records (with their times) were kept
    assert trained_epochs(output) == list(range(saved["epoch"] + 1, 4))
    assert metrics.read_text().startswith(kept)
    assert not list((tmp_path / "runs").rglob(".*.tmp"))  # a killed writer's temporary file is removed
    a = torch.load(uninterrupted_training, weights_only=True)["state_dict"]
    b = torch.load(train_dir / "model.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_messages_keep_their_brackets(tmp_path):
    """Rich markup must not eat text such as '.[tensorrt]' from a message."""
    config = write_config(tmp_path)
    result = runner.invoke(app, ["run", str(config), "--set", "engine.extra[tensorrt]=1"])
    assert result.exit_code == 2 and "unknown key 'engine.extra[tensorrt]'" in result.output


KILLED_FINE_TUNE = {"enabled": True, "channel_multiple": 2, "epochs": 6, "images_per_epoch": None,
                    "batch_size": 16, "lr": 0.02, "max_accuracy_drop": 100}


@pytest.fixture(scope="module")
def uninterrupted_fine_tune(trained_run, tmp_path_factory) -> Path:
    """The model file of KILLED_FINE_TUNE on a copy of the trained run, fine-tuned without a break (once for
    both signals)."""
    root = tmp_path_factory.mktemp("uninterrupted")
    reference, run = copy_trained(trained_run, root, compress=KILLED_FINE_TUNE)
    code, output = _in_process(reference, command="compress")
    assert code == 0 and _fine_tuned_epochs(output) == list(range(1, KILLED_FINE_TUNE["epochs"] + 1)), output
    return run.path("compress/model.pt")


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["SIGKILL", "SIGINT"])
def test_a_killed_fine_tune_resumes_to_the_uninterrupted_weights(uninterrupted_fine_tune, trained_run, tmp_path, sig):
    """SIGKILL (or Ctrl-C) inside compress's fine-tune: the next run resumes from the checkpoint of the last
    finished epoch (or of the batch Ctrl-C stopped at), fine-tunes only the epochs left, one line each, and
    ends with the weights of a fine-tune that was never interrupted."""
    compress = KILLED_FINE_TUNE
    config, run = copy_trained(trained_run, tmp_path, compress=compress)
    proc = _cli(config, command="compress")
    _wait_for(run.path("compress/last.pt"), proc)  # the first epoch finished: kill it inside a later one
    proc.send_signal(sig)
    output = proc.communicate(timeout=600)[0]
    if sig == signal.SIGINT:
        assert proc.returncode == 130 and "checkpoint saved" in output, output
    saved = torch.load(run.path("compress/last.pt"), weights_only=True)
    assert 1 <= saved["epoch"] < compress["epochs"]  # stopped inside the fine-tune
    assert sig == signal.SIGINT or saved["batch"] == 0  # SIGKILL: the last finished epoch's checkpoint
    code, output = _in_process(config, command="compress")
    assert code == 0, output
    assert re.search(rf"^resuming the fine-tune from \S+: epoch {saved['epoch'] + 1}, batch {saved['batch']}$",
                     output, re.M), output
    assert _fine_tuned_epochs(output) == list(range(saved["epoch"] + 1, compress["epochs"] + 1))
    a = torch.load(uninterrupted_fine_tune, weights_only=True)["state_dict"]
    b = torch.load(run.path("compress/model.pt"), weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def _fine_tuned_epochs(output: str) -> list[int]:
    """The epochs a compress command's output reports as fine-tuned (one line each)."""
    return [int(n) for n in re.findall(r"^fine-tune epoch (\d+): loss", output, flags=re.M)]
