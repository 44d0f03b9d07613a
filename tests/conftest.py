"""Shared fixtures: a tiny synthetic run trained once per test session (exported and benched once too),
and stage contexts for it."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import multiprocessing
import multiprocessing.pool
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

import onnx
import pytest
import torch
import yaml
from onnxruntime.quantization import CalibrationDataReader
from rich.console import Console

from pipeline.compare import compare
from pipeline.compare import runs as compare_runs
from pipeline.config import Config, validate_config
from pipeline.deploy import onnx_io, quantize
from pipeline.rundir import RunDir
from pipeline.runner import execute, run_stages, stage_def
from pipeline.stage import StageContext
from pipeline.training import fit
from pipeline.training.models import ModelSpec, SingleNet

RAM_DISK, RAM_DISK_ROOM = Path("/dev/shm"), 8 * 2**30


def pytest_configure(config):
    """Temporary files on a RAM disk with room to spare where there is one (Linux's /dev/shm; a container's is
    often 64 MB) and TMPDIR names none: the suite writes about 2 GB of checkpoints and ONNX files, which a
    virtual disk takes at 150 MB/s. Passing tests' directories are removed as they pass (pyproject.toml)."""
    if "TMPDIR" not in os.environ and RAM_DISK.is_dir() and os.access(RAM_DISK, os.W_OK) and \
            shutil.disk_usage(RAM_DISK).free >= RAM_DISK_ROOM:
        tempfile.tempdir = str(RAM_DISK)


PREFETCHED = pytest.StashKey[dict]()
PREFETCH_POOL = pytest.StashKey[multiprocessing.pool.Pool]()
COMPARE_ROOT = pytest.StashKey[Path]()
PREFETCH_TIMEOUT_S = 600  # a worker that died leaves its work unfinished for ever: the test fails instead


def pytest_collection_finish(session):
    """Slow self-contained work starts as the session does, in one worker process, in the order the tests need
    it: most of the suite is single-threaded Python that leaves the second core idle. That work is the session's
    compare (compared_tiny) and what a test declares with @pytest.mark.prefetch(function, *args), read from its
    `prefetched` fixture; the function must be importable and its result picklable."""
    if session.config.option.collectonly:
        return
    work = {item.nodeid: marker.args for item in session.items if (marker := item.get_closest_marker("prefetch"))}
    if any("compared_tiny" in item.fixturenames for item in session.items):
        session.stash[COMPARE_ROOT] = Path(tempfile.mkdtemp(prefix="compare-"))
        work = {"compared_tiny": (interrupted_compare, session.stash[COMPARE_ROOT]), **work}
    if not work:
        return
    pool = multiprocessing.get_context("spawn").Pool(1, initializer=torch.set_num_threads, initargs=(1,))
    session.stash[PREFETCH_POOL] = pool
    session.stash[PREFETCHED] = {key: pool.apply_async(function, args) for key, (function, *args) in work.items()}


def pytest_sessionfinish(session):
    if PREFETCH_POOL in session.stash:
        session.stash[PREFETCH_POOL].terminate()  # work for tests a -x stop left unrun is not waited for
    if COMPARE_ROOT in session.stash:
        shutil.rmtree(session.stash[COMPARE_ROOT], ignore_errors=True)


@pytest.fixture
def prefetched(request):
    """The result of the running test's @pytest.mark.prefetch work (waits for it; raises what it raised)."""
    return request.session.stash[PREFETCHED][request.node.nodeid].get(PREFETCH_TIMEOUT_S)


@pytest.fixture(scope="session", autouse=True)
def export_once_per_model():
    """The dynamo export costs 1.5 to 3 s a call on 2 cores whatever the network, and the suite's copies of one
    trained run export the same weights again (16 of 44 exports). The export is deterministic (the same bytes
    for the same weights, shape, opset and exporter), so a repeat gets a fresh copy of the first export's proto.
    The key holds the exporter function: a test that replaces torch.onnx.export to make it fail is not served."""
    real, done = onnx_io.export_onnx, {}

    def export(model, example, opset):
        digest = hashlib.sha256(f"{type(model).__name__} {tuple(example.shape)} {opset} "
                                f"{id(torch.onnx.export)}".encode())
        for name, tensor in model.state_dict().items():
            digest.update(name.encode() + tensor.detach().cpu().numpy().tobytes())
        key = digest.hexdigest()
        if key not in done:
            done[key] = real(model, example, opset).SerializeToString()
        return onnx.load_from_string(done[key])

    holders = [m for m in list(sys.modules.values()) if getattr(m, "export_onnx", None) is real]
    with pytest.MonkeyPatch.context() as patch:
        for module in holders:  # onnx_io itself, and every module that imported the function from it
            patch.setattr(module, "export_onnx", export)
        yield


TINY = {
    "name": "tiny",
    "seed": 0,
    "data": {"dataset": "synthetic", "synthetic_size": 384, "val_size": 64},
    "model": {"arch": "resnet20", "width": 4, "branches": 3},
    "train": {"epochs": 3, "batch_size": 16, "eval_batch_size": 64, "lr": 0.05, "milestones": [2],
              "device": "cpu", "deterministic": True},
    "export": {"check_size": 16, "calibration_size": 32},
    "bench": {"warmup": 1, "iterations": 3, "batch_sizes": [1, 8], "throughput_iterations": 2, "threads": 1,
              "rounds": 2, "turn_pause_ms": 0},
}
# The one set of fast bench settings (the tiny config's): tests add only what their point needs
FAST_BENCH = TINY["bench"]


def tiny_dict(output_root: Path, **sections) -> dict:
    """The tiny config as a dict, with sections updated (for tests that write their own YAML)."""
    raw = {k: dict(v) if isinstance(v, dict) else v for k, v in TINY.items()}
    raw["output_root"] = str(output_root)
    for key, value in sections.items():
        if isinstance(value, dict):
            raw.setdefault(key, {}).update(value)
        else:
            raw[key] = value
    return raw


def trained_epochs(output: str) -> list[int]:
    """The epochs a train command's output reports as trained (one line each, rank 0 only)."""
    return [int(n) for n in re.findall(r"^epoch (\d+): loss", output, flags=re.M)]


def press_ctrl_c_at(monkeypatch, check: int) -> None:
    """Ctrl-C as the training loop sees it (fit.catch_sigint's flag): pressed at its `check`-th look."""
    looks = []

    @contextlib.contextmanager
    def pressed():
        yield lambda: looks.append(1) or len(looks) == check

    monkeypatch.setattr(fit, "catch_sigint", pressed)


def make_ctx(cfg: Config, run: RunDir | None = None) -> StageContext:
    return StageContext(cfg, run or RunDir(cfg.run_dir), torch.device("cpu"))


@pytest.fixture(scope="session")
def tiny_cfg(tmp_path_factory) -> Config:
    return validate_config(tiny_dict(tmp_path_factory.mktemp("runs")))


@pytest.fixture(scope="session")
def trained_run(tiny_cfg) -> tuple[Config, RunDir]:
    """The tiny config with its train stage finished (shared: tests must not modify it; copy it)."""
    run = RunDir(tiny_cfg.run_dir)
    run_stages(tiny_cfg, run, make_ctx(tiny_cfg, run), until="train")
    return tiny_cfg, run


TINY_ONNX_CLASSES = ["zero", "one", "two", "three"]


@pytest.fixture(scope="session")
def tiny_onnx(tmp_path_factory) -> Path:
    """A tiny SingleNet (1 x 16 x 16 images, 4 classes) exported as the export stage does: dynamo, dynamic
    batch, input 'input', output 'logits', metadata class_names (TINY_ONNX_CLASSES)."""
    torch.manual_seed(0)
    net = SingleNet(ModelSpec("resnet20", num_classes=4, in_channels=1, width=4).single()).eval()
    program = torch.onnx.export(net, (torch.randn(2, 1, 16, 16),), input_names=["input"], output_names=["logits"],
                                dynamic_shapes=({0: torch.export.Dim("batch")},), dynamo=True, verbose=False)
    proto = program.model_proto  # a new proto on every access: keep one
    proto.metadata_props.add(key="class_names", value=json.dumps(TINY_ONNX_CLASSES))
    path = tmp_path_factory.mktemp("onnx") / "model_fp32.onnx"
    onnx.save(proto, str(path))
    return path


# The tiny width-4 model's int8 numerics differ between CPUs (ONNX Runtime's int8 kernels take other code
# paths on AVX2, AVX-512 and VNNI), and one of its 64 validation images is 1.6 points: tests about the
# chain, the graphs and the bench accept any int8 accuracy (a bound of 100 points); the accuracy guard
# itself is tested on damage far larger than any kernel difference (tests/test_export.py).
ANY_ACCURACY = 100.0
ALL_PRECISIONS = ["fp32", "fp16", "int8", "int8_cpu"]


class Replay(CalibrationDataReader):
    def __init__(self, batches: list[dict]):
        self.batches = iter(batches)

    def get_next(self) -> dict | None:
        return next(self.batches, None)


@pytest.fixture(scope="session")
def exported_run(trained_run, tmp_path_factory) -> tuple[Config, RunDir, list]:
    """A copy of the trained run taken through export in every precision, branch and ONE-E, with every
    calibration batch that reached ONNX Runtime's quantizer recorded (shared: copy it to modify it)."""
    fed: list = []
    real = quantize.quantize_static

    def spy(model_in, model_out, reader, **kwargs):
        batches = list(iter(reader.get_next, None))
        fed.extend(b["input"] for b in batches)
        return real(model_in, model_out, Replay(batches), **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(quantize, "quantize_static", spy)
        cfg, run = copy_run(trained_run, tmp_path_factory.mktemp("exported"), "export",
                            export={"precisions": ALL_PRECISIONS, "max_accuracy_drop": ANY_ACCURACY})
    return cfg, run, fed


def private_copy(source: tuple[Config, RunDir], root: Path, **sections: dict) -> tuple[Config, RunDir]:
    """A copy of `source`'s run under `root`, its config pointed there with some sections updated; no stage
    is run (for a test that writes to a shared run)."""
    cfg, run = source
    raw = cfg.model_dump(mode="json")
    raw["output_root"] = str(root)
    for key, value in sections.items():
        raw[key] = {**raw[key], **value}
    cfg = validate_config(raw)
    shutil.copytree(run.root, cfg.run_dir)
    return cfg, RunDir(cfg.run_dir)


def copy_run(source: tuple[Config, RunDir], root: Path, until: str, **sections: dict) -> tuple[Config, RunDir]:
    """A copy of `source`'s run under `root` with some config sections updated, taken through `until`."""
    cfg, run = private_copy(source, root, **sections)
    run_stages(cfg, run, make_ctx(cfg, run), until=until)
    return cfg, run


def copy_trained(trained_run, tmp_path: Path, output_root: Path | None = None, **sections) -> tuple[Path, RunDir]:
    """A private copy of the session's trained run (under `output_root`, default tmp_path/runs), and a config
    file tmp_path/c.yaml that names it (the tiny config with `sections` updated)."""
    cfg, run = trained_run
    output_root = output_root or tmp_path / "runs"
    shutil.copytree(run.root, output_root / cfg.name)
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(tiny_dict(output_root, **sections)))
    return config, RunDir(output_root / cfg.name)


def benched_copy(exported_run, root: Path, **sections: dict) -> tuple[Config, RunDir]:
    """A copy of the shared exported run taken through the engine stage (skipped where TensorRT or a GPU
    is missing), with the fast bench settings."""
    return copy_run(exported_run[:2], root, "engine", bench={**FAST_BENCH, **sections.pop("bench", {})},
                    **sections)


@pytest.fixture(scope="session")
def benched_run(exported_run, tmp_path_factory) -> tuple[Config, RunDir, dict, int]:
    """The exported run's copy benched once with the fast settings, for every test that reads a bench:
    (config, run, bench.json, torch's thread count before the bench). Shared: a test that writes to the
    run works on private_copy(benched_run[:2], ...)."""
    cfg, run = benched_copy(exported_run, tmp_path_factory.mktemp("benched"))
    threads_before = torch.get_num_threads()
    assert execute(cfg, stage_def("bench"), run, make_ctx(cfg, run)) == "done"
    return cfg, run, json.loads(run.output("bench", "bench").read_text()), threads_before


COMPARE_SEEDS = [0, 1]
COMPARE_VARIANT = "branches=2"
COMPARE_RUN_NAMES = ["vanilla-seed0", "one-seed0", "one-model.branches-2-seed0",
                     "vanilla-seed1", "one-seed1", "one-model.branches-2-seed1"]


@pytest.fixture(scope="session")
def compared_tiny(request):
    """interrupted_compare's result, made in the prefetch worker (pytest_collection_finish). Shared by
    tests/test_compare.py and the compare --compress tests, which copy its runs to write beside them."""
    return request.session.stash[PREFETCHED]["compared_tiny"].get(PREFETCH_TIMEOUT_S)


def interrupted_compare(root: Path):
    """A compare of the tiny config under `root`, interrupted before its third run and then run again to the end:
    (config file, its result, the first two runs' train records before the resume, the resumed log)."""
    config = root / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_dict(root / "runs")))
    started, real = [], compare_runs.run_stages

    def interrupt_third(cfg, run, ctx, **kwargs):
        started.append(cfg.name)
        if len(started) == 3:
            raise KeyboardInterrupt
        return real(cfg, run, ctx, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(compare_runs, "run_stages", interrupt_third)
        with pytest.raises(KeyboardInterrupt):
            compare(config, [], COMPARE_SEEDS, [COMPARE_VARIANT], Console(quiet=True))
    compare_root = root / "runs" / "tiny-compare"
    before = {name: RunDir(compare_root / name).stage("train") for name in COMPARE_RUN_NAMES[:2]}
    log = io.StringIO()
    result = compare(config, [], COMPARE_SEEDS, [COMPARE_VARIANT], Console(file=log, width=200))
    return config, result, before, log.getvalue()
