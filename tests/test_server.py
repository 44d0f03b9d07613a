"""A real tritonserver on the tiny run's Triton repository (marker `server`).

The server is the `tritonserver` binary of nvidia-pytriton, in its own environment (created once by
`pipeline.deploy.triton_server.setup_env`), with the test stand-in for the onnxruntime backend; with
ONE_PIPELINE_TRITONSERVER set, the command it names instead (NVIDIA's container, docs/DEPLOY.md). The
repository is the one the triton stage wrote, unchanged. Clients: tritonclient over HTTP and gRPC.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from pipeline.config import Config
from pipeline.deploy import triton_server
from pipeline.deploy.onnx_io import read_onnx_io
from pipeline.deploy.served import ServedModel, served_predictions
from pipeline.errors import PipelineError, StageSkipped
from pipeline.rundir import RunDir
from pipeline.training import checkpoint
from pipeline.training.data import load_datasets
from stages.triton import ModelEntry, config_text
from tests.conftest import copy_run

httpclient = pytest.importorskip("tritonclient.http", reason="pip install 'tritonclient[grpc,http]'")
grpcclient = pytest.importorskip("tritonclient.grpc", reason="pip install 'tritonclient[grpc,http]'")
from tritonclient.utils import InferenceServerException  # noqa: E402

# model -> the exported precision it serves; the openvino-backend model serves the int8_cpu file
MODELS = {"tiny_onnx": "fp32", "tiny_onnx_fp16": "fp16", "tiny_onnx_int8": "int8", "tiny_onnx_int8_cpu": "int8_cpu",
          "tiny_openvino_int8_cpu": "int8_cpu"}
MAX_BATCH = 128  # triton.max_batch_size's default, which the tiny config keeps
STOP_BOUND_S = 30
# NVIDIA's container (ONE_PIPELINE_TRITONSERVER) runs the ONNX models on a GPU with TensorRT (TF32 kernels):
# close to ONNX Runtime on the CPU, not equal. The stand-in runs ONNX Runtime on the CPU: equal classes.
EXTERNAL = bool(triton_server.external_command())
LOGITS_ATOL = 2e-2 if EXTERNAL else 1e-4


@pytest.fixture(scope="session")
def server_env() -> triton_server.ServerEnv | None:
    """The environment (made once, reused across sessions); None when ONE_PIPELINE_TRITONSERVER names a
    server command instead. Setup fails the test in CI and skips it elsewhere (e.g. offline)."""
    if triton_server.external_command():
        return None
    try:
        return triton_server.setup_env()
    except PipelineError as exc:
        if os.environ.get("CI"):
            pytest.fail(f"server environment: {exc}")
        pytest.skip(f"server environment: {exc}")


def start(repository: Path, env, log: Path, **options) -> triton_server.TritonServer:
    server = triton_server.TritonServer(repository, env=env, command=triton_server.external_command(), log=log,
                                        **options)
    server.start(timeout_s=180)
    return server


def stop(server: triton_server.TritonServer) -> None:
    server.stop(timeout_s=STOP_BOUND_S)
    assert server.process.poll() is not None, "tritonserver still runs after stop()"


@pytest.fixture(scope="module")
def served_run(exported_run, server_env, tmp_path_factory) -> tuple[Config, RunDir]:
    """A copy of the exported tiny run (every precision) taken through triton and bench (served row on)."""
    cfg, copy = copy_run(exported_run[:2], tmp_path_factory.mktemp("served"), "bench",
                         bench={"served": True, "throughput_iterations": 2})
    assert copy.stage("triton").status == "done" and copy.stage("bench").status == "done"
    return cfg, copy


@pytest.fixture(scope="module")
def server(served_run, server_env, tmp_path_factory):
    server = start(served_run[1].path("triton"), server_env, tmp_path_factory.mktemp("log") / "server.log")
    yield server.endpoints
    stop(server)


@pytest.fixture(scope="module")
def test_split(served_run) -> tuple[np.ndarray, np.ndarray]:
    """The tiny run's normalised test images and labels, in the order bench uses."""
    cfg = served_run[0]
    batches = list(load_datasets(cfg.data).test.batches(cfg.train.eval_batch_size))
    return np.concatenate([x.numpy() for x, _ in batches]), np.concatenate([y.numpy() for _, y in batches])


def onnxruntime_logits(run: RunDir, precision: str, images: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(run.output("export", f"onnx_{precision}")), providers=["CPUExecutionProvider"])
    return session.run(["logits"], {"input": images})[0]


def images_of(test_split, count: int) -> np.ndarray:
    """`count` test images (repeated when the split is smaller)."""
    images = test_split[0]
    return np.ascontiguousarray(np.resize(images, (count, *images.shape[1:])))


def _infer(client, url: str, model: str, images: np.ndarray, **output) -> np.ndarray:
    """One request with tritonclient's `client` module (http or grpc: the same calls)."""
    tensor = client.InferInput("input", list(images.shape), "FP32")
    tensor.set_data_from_numpy(images)
    with client.InferenceServerClient(url) as connection:
        result = connection.infer(model, [tensor], outputs=[client.InferRequestedOutput("logits", **output)])
    return result.as_numpy("logits")


def http_infer(endpoints, model: str, images: np.ndarray, **output) -> np.ndarray:
    return _infer(httpclient, endpoints.http, model, images, **output)


def grpc_infer(endpoints, model: str, images: np.ndarray, **output) -> np.ndarray:
    return _infer(grpcclient, endpoints.grpc, model, images, **output)


def assert_same_logits(served: np.ndarray, local: np.ndarray) -> None:
    """The stand-in's ONNX Runtime is another build than the project's: equal classes, logits to 1e-4."""
    np.testing.assert_allclose(served, local, rtol=1e-4, atol=LOGITS_ATOL)
    if not EXTERNAL:
        assert np.array_equal(served.argmax(1), local.argmax(1))


@pytest.mark.server
def test_every_model_is_ready_over_http_and_grpc(server):
    with httpclient.InferenceServerClient(server.http) as http, grpcclient.InferenceServerClient(server.grpc) as grpc:
        assert http.is_server_live() and http.is_server_ready() and grpc.is_server_ready()
        for model in MODELS:
            assert http.is_model_ready(model) and grpc.is_model_ready(model), model
            assert int(http.get_model_config(model)["max_batch_size"]) == MAX_BATCH


@pytest.mark.server
@pytest.mark.parametrize("batch", [1, MAX_BATCH])
def test_batch_one_and_the_largest_batch_answer_as_onnxruntime(server, served_run, test_split, batch):
    images = images_of(test_split, batch)
    local = onnxruntime_logits(served_run[1], "fp32", images)
    assert_same_logits(http_infer(server, "tiny_onnx", images), local)
    assert_same_logits(grpc_infer(server, "tiny_onnx", images), local)


@pytest.mark.server
def test_one_past_the_largest_batch_is_refused(server, test_split):
    images = images_of(test_split, MAX_BATCH + 1)
    for infer in (http_infer, grpc_infer):
        with pytest.raises(InferenceServerException, match=f"batch-size must be <= {MAX_BATCH}"):
            infer(server, "tiny_onnx", images)


@pytest.mark.server
def test_concurrent_requests_each_get_their_own_answer(server, served_run, test_split):
    """16 requests of different sizes from 8 threads: the dynamic batcher may merge them, and each answer
    must still be its own request's."""
    served = ServedModel(server.http, "tiny_onnx")
    batches = [images_of(test_split, 40)[i:i + size] for i, size in enumerate(range(1, 17))]

    def ask(images):
        try:
            return served.predict(images)
        finally:
            served.close()  # in the thread that made the client (ServedModel.close says why)

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, batches))
    for images, answer in zip(batches, answers):
        assert_same_logits(answer, onnxruntime_logits(served_run[1], "fp32", images))


@pytest.mark.server
def test_classification_extension_answers_with_the_labels(server, served_run, test_split):
    labels = served_run[1].path("triton", "tiny_onnx", "labels.txt").read_text().splitlines()
    images = images_of(test_split, 5)
    top3 = np.argsort(-onnxruntime_logits(served_run[1], "fp32", images), axis=1)[:, :3]
    for infer in (http_infer, grpc_infer):
        answer = infer(server, "tiny_onnx", images, class_count=3)
        assert answer.shape == (5, 3)
        entries = [[value.decode().split(":") for value in row] for row in answer]  # b"score:index:label"
        assert [[int(index) for _, index, _ in row] for row in entries] == top3.tolist()
        assert all(label == labels[int(index)] for row in entries for _, index, label in row)


def near_ties(served: np.ndarray, local: np.ndarray) -> np.ndarray:
    """The images whose class two ONNX Runtime builds may disagree on: the server's (the stand-in's own
    build, or the GPU's kernels) and the project's give logits up to `gap` apart, so a class can change
    only where the local top two logits are within 2 x gap of each other."""
    gap = float(np.abs(served - local).max())
    top_two = np.sort(local, axis=1)[:, -2:]
    return np.flatnonzero(top_two[:, 1] - top_two[:, 0] <= 2 * gap)


def build_gap_bound(run: RunDir, precision: str, images: np.ndarray) -> float:
    """How far two builds' logits may be apart: fp32 to LOGITS_ATOL; a lower precision by no more than
    its own rounding error (its logits against fp32's here) on top, since the builds differ only in
    how they round."""
    if precision == "fp32":
        return LOGITS_ATOL
    rounding = np.abs(onnxruntime_logits(run, precision, images) - onnxruntime_logits(run, "fp32", images))
    return LOGITS_ATOL + float(rounding.max())


@pytest.mark.server
def test_accuracy_through_the_server_equals_the_bench_rows(server, served_run, test_split):
    images, labels = test_split
    run = served_run[1]
    bench = {row["name"]: row for row in json.loads(run.output("bench", "bench").read_text())["rows"]}
    for model, precision in MODELS.items():
        local = onnxruntime_logits(run, precision, images)
        served = np.concatenate([http_infer(server, model, images[i:i + MAX_BATCH])
                                 for i in range(0, len(images), MAX_BATCH)])
        served_model = ServedModel(server.http, model)
        predictions = served_predictions(served_model, images, MAX_BATCH)
        served_model.close()
        gap = float(np.abs(served - local).max())
        assert gap <= build_gap_bound(run, precision, images), (model, gap)
        ties = near_ties(served, local)
        differ = np.flatnonzero(predictions != local.argmax(1))
        assert set(differ) <= set(ties), (model, differ, ties)  # other classes only on near ties
        accuracy = float(100.0 * int(np.sum(predictions == labels)) / len(labels))
        bench_accuracy = bench[f"branch_onnx_{precision}"]["accuracy"]
        assert abs(accuracy - bench_accuracy) <= 100.0 * len(differ) / len(labels) + 1e-9, model
    row = bench["branch_triton_fp32"]  # bench's own served row, through its own server
    assert row["status"] == "ok", row["reason"]
    assert row["format"] == "triton" and row["latency_ms"]["batch"] == 1 and row["throughput"][0]["images_per_s"] > 0
    assert row["file"] == "triton/tiny_onnx/1/model.onnx"
    # its accuracy and its agreement with the branch in PyTorch eager, recomputed from this server's logits
    branch, _ = checkpoint.load_model(run.output("strip", "model"))
    with torch.no_grad():
        eager = branch(torch.from_numpy(images)).argmax(1).numpy()
    local = onnxruntime_logits(run, "fp32", images)
    served = np.concatenate([http_infer(server, "tiny_onnx", images[i:i + MAX_BATCH])
                             for i in range(0, len(images), MAX_BATCH)])
    slack = 100.0 * len(near_ties(served, local)) / len(labels) + 1e-9
    assert abs(row["agreement"] - 100.0 * float(np.mean(served.argmax(1) == eager))) <= slack
    assert abs(row["accuracy"] - 100.0 * float(np.mean(served.argmax(1) == labels))) <= slack
    assert row["images"] == len(labels)


@pytest.mark.server
def test_a_cpu_only_server_serves_the_onnx_models_beside_a_plan_model(served_run, server_env, test_split,
                                                                     tmp_path):
    """A repository with a KIND_GPU plan model (a dummy file: no machine here can load it): with default
    flags the server refuses to start; with the documented CPU-only flags it serves the ONNX models."""
    repository = tmp_path / "repository"
    shutil.copytree(served_run[1].path("triton", "tiny_onnx"), repository / "tiny_onnx")
    onnx_file = repository / "tiny_onnx" / "1" / "model.onnx"
    plan = ModelEntry("tiny_trt", "tensorrt_plan", onnx_file, read_onnx_io(onnx_file), 16, ["# dummy plan"])
    (repository / "tiny_trt" / "1").mkdir(parents=True)
    (repository / "tiny_trt" / "1" / "model.plan").write_bytes(b"not a serialized engine")
    (repository / "tiny_trt" / "config.pbtxt").write_text(config_text(
        plan, dynamic_batching=True, max_queue_delay_us=100, instance_count=1, tensorrt_accelerator=False))

    with pytest.raises(PipelineError, match="failed to load"):
        start(repository, server_env, tmp_path / "default.log")

    server = start(repository, server_env, tmp_path / "cpu_only.log", cpu_only=True)
    try:
        with httpclient.InferenceServerClient(server.endpoints.http) as client:
            assert client.is_server_ready() and client.is_model_ready("tiny_onnx")
            assert not client.is_model_ready("tiny_trt")
        images = images_of(test_split, 4)
        assert_same_logits(http_infer(server.endpoints, "tiny_onnx", images),
                           onnxruntime_logits(served_run[1], "fp32", images))
    finally:
        stop(server)


def test_without_the_environment_serving_is_skipped_with_the_setup_command(tmp_path, monkeypatch):
    monkeypatch.setenv(triton_server.ENV_VARIABLE, str(tmp_path / "none"))
    monkeypatch.delenv(triton_server.COMMAND_VARIABLE, raising=False)
    with pytest.raises(StageSkipped, match="python -m pipeline.deploy.triton_server setup"):
        with triton_server.serve(tmp_path):
            pass


def test_the_server_always_runs_the_checkouts_stand_in_backend(tmp_path, monkeypatch):
    """The environment is made once, but its backend directory follows the stand-in's files: a change to
    them gives a new directory holding the changed files (on a fake environment: no install, no server)."""
    root = tmp_path / "env"
    site = root / "venv" / "lib" / "python3.x" / "site-packages" / "pytriton" / "tritonserver"
    (site / "backends" / "python").mkdir(parents=True)
    (site / "backends" / "python" / "libtriton_python.so").write_text("bundled")
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    (site / "python_backend_stubs" / version).mkdir(parents=True)
    (site / "python_backend_stubs" / version / "triton_python_backend_stub").write_text("stub")
    (root / triton_server.COMPLETE).write_text("installed\n")
    standin = tmp_path / "standin"
    shutil.copytree(triton_server.STANDIN_BACKEND, standin)
    monkeypatch.setenv(triton_server.ENV_VARIABLE, str(root))
    monkeypatch.setattr(triton_server, "STANDIN_BACKEND", standin)

    first = triton_server.find_env().backends
    assert (first / "onnxruntime" / "model.py").read_text() == (standin / "onnxruntime" / "model.py").read_text()
    assert (first / "python" / "triton_python_backend_stub").read_text() == "stub"
    changed = (standin / "onnxruntime" / "model.py").read_text().replace("value[start:start + size]",
                                                                           "value[start:start + size][::-1]")
    (standin / "onnxruntime" / "model.py").write_text(changed)
    second = triton_server.find_env().backends
    assert second != first and (second / "onnxruntime" / "model.py").read_text() == changed
    assert triton_server.setup_env().backends == second  # setup finds the same
