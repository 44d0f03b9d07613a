"""The bench stage on a tiny real run (train -> select -> strip -> export, real torch and ONNX Runtime):
bench.json follows the documented schema, accuracies equal training's, rows that cannot run carry
reasons. Speed is never asserted: benchmarks measure speed, tests do not time."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from pipeline.config import Config, validate_config
from pipeline.deploy.benchfile import BenchFile, Check, Headline, LatencyMs, Row, Throughput, VsFP32
from pipeline.errors import StageSkipped
from pipeline.rundir import RunDir
from pipeline.runner import execute, run_stages, stage_def
from pipeline.training.data import load_datasets
from stages import bench as bench_stage
from tests.conftest import make_ctx

DOC = Path(__file__).resolve().parents[1] / "docs" / "bench_schema.md"
FAST_BENCH = {"warmup": 1, "iterations": 3, "throughput_batch": 8, "throughput_iterations": 2, "threads": 1}
ROW_NAMES = ["one_e_eager", "full_branch_eager", "branch_eager", "branch_compile", "branch_onnx_fp32",
             "branch_onnx_fp16", "branch_onnx_int8", "branch_tensorrt", "branch_triton_fp32"]


def tiny_at(cfg: Config, root: Path, **sections: dict) -> Config:
    """The tiny config with output_root `root` and some sections changed."""
    raw = cfg.model_dump(mode="json")
    raw["output_root"] = str(root)
    for key, value in sections.items():
        raw[key] = {**raw[key], **value}
    return validate_config(raw)


def exported(trained_run, root: Path, precisions: list[str], copy: bool = True,
             **sections: dict) -> tuple[Config, RunDir]:
    """The real chain up to the engine stage (skipped where TensorRT or a GPU is missing), on a copy of
    the shared trained run or trained afresh."""
    cfg = tiny_at(trained_run[0], root, export={"precisions": precisions}, bench=FAST_BENCH, **sections)
    if copy:
        shutil.copytree(trained_run[1].root, cfg.run_dir)
    run = RunDir(cfg.run_dir)
    run_stages(cfg, run, make_ctx(cfg, run), until="engine")
    return cfg, run


@pytest.fixture(scope="module")
def benched(trained_run, tmp_path_factory):
    cfg, run = exported(trained_run, tmp_path_factory.mktemp("bench"), ["fp32", "fp16", "int8"])
    threads_before = torch.get_num_threads()
    assert execute(cfg, stage_def("bench"), run, make_ctx(cfg, run)) == "done"
    data = json.loads(run.output("bench", "bench").read_text())
    return cfg, run, data, threads_before


def rows(data: dict) -> dict[str, dict]:
    return {row["name"]: row for row in data["rows"]}


def documented_fields(section: str) -> set[str]:
    """The backticked names in the first column of a table under `## <section>` (or in its prose)."""
    text = DOC.read_text()
    body = text.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    fields = set(re.findall(r"^\| `(\w+)` \|", body, flags=re.M))
    return fields or set(re.findall(r"`(\w+)`", body))


def test_bench_json_follows_the_documented_schema(benched):
    _, _, data, _ = benched
    bench = BenchFile.model_validate(data)  # the schema in code: types, statuses, reasons, unique names
    assert bench.schema_version == 1
    assert documented_fields("Top level") == set(BenchFile.model_fields)
    assert documented_fields("Row") == set(Row.model_fields)
    assert documented_fields("Headline") == set(Headline.model_fields)
    body = DOC.read_text()
    for model in (LatencyMs, Throughput, VsFP32, Check):
        assert all(f"`{name}`" in body for name in model.model_fields), model.__name__
    for row in data["rows"]:  # every row carries every documented field, even when null
        assert set(row) == set(Row.model_fields)


def test_every_variant_has_a_row_and_rows_that_cannot_run_say_why(benched):
    _, _, data, _ = benched
    by_name = rows(data)
    assert [r["name"] for r in data["rows"]] == ROW_NAMES
    for name in ("one_e_eager", "full_branch_eager", "branch_eager", "branch_onnx_fp32", "branch_onnx_fp16",
                 "branch_onnx_int8"):
        row = by_name[name]
        assert row["status"] == "ok", (name, row["reason"])
        assert row["latency_ms"]["iterations"] == 3 and row["latency_ms"]["batch"] == 1
        assert row["latency_ms"]["p50"] <= row["latency_ms"]["p90"] <= row["latency_ms"]["p99"]
        assert row["throughput"]["batch"] == 8 and row["throughput"]["images_per_s"] > 0
        assert row["params"] > 0 and row["flops"] > 0 and row["macs"] == row["flops"] // 2
        assert row["file_bytes"] == (benched[1].root / row["file"]).stat().st_size
    compile_row, trt = by_name["branch_compile"], by_name["branch_tensorrt"]
    assert compile_row["status"] == "skipped" and "CUDA" in compile_row["reason"]
    engine = benched[1].stage("engine")
    assert trt["status"] == "skipped"
    if engine["status"] == "skipped":  # no TensorRT or no GPU: the engine stage's own reason
        assert trt["reason"] == f"engine skipped: {engine['reason']}"
    else:  # an engine was built, but this bench runs on the CPU
        assert "CUDA GPU only" in trt["reason"]
    served = by_name["branch_triton_fp32"]  # tested with a real server in tests/test_server.py
    assert served["status"] == "skipped" and "triton stage has not run" in served["reason"]
    assert by_name["branch_onnx_fp32"]["provider"] == "CPUExecutionProvider"
    # the ONNX rows share the stripped PyTorch model's counts; the full model is bigger
    assert by_name["branch_onnx_int8"]["flops"] == by_name["branch_eager"]["flops"] < by_name["one_e_eager"]["flops"]
    assert by_name["branch_onnx_fp32"]["params"] == by_name["branch_eager"]["params"]


def test_accuracies_equal_what_training_recorded(benched):
    cfg, run, data, _ = benched
    recorded = run.stage("train")["summary"]["test"]
    branch = data["branch"]
    assert branch == run.stage("select")["summary"]["branch"]
    by_name = rows(data)
    assert by_name["one_e_eager"]["accuracy"] == recorded["teacher"]
    assert by_name["full_branch_eager"]["accuracy"] == recorded["branches"][branch]
    assert by_name["branch_eager"]["accuracy"] == recorded["branches"][branch]
    assert {c["row"] for c in data["checks"]} == {"one_e_eager", "full_branch_eager", "branch_eager"}
    assert all(c["equal"] for c in data["checks"])
    assert data["test_images"] == len(load_datasets(cfg.data).test)
    # agreement with the stripped branch in PyTorch: itself, and the full model's same branch, exactly
    assert by_name["branch_eager"]["agreement"] == 100.0 == by_name["full_branch_eager"]["agreement"]
    assert by_name["branch_onnx_fp32"]["agreement"] >= 95.0
    assert by_name["branch_onnx_fp32"]["images"] == data["test_images"]


def test_lower_precision_rows_state_cost_and_speedup_vs_fp32(benched):
    _, _, data, _ = benched
    by_name = rows(data)
    fp32 = by_name["branch_onnx_fp32"]
    for name in ("branch_onnx_fp16", "branch_onnx_int8"):
        row = by_name[name]
        assert row["vs_fp32"]["accuracy_delta"] == pytest.approx(row["accuracy"] - fp32["accuracy"])
        assert row["vs_fp32"]["speedup_p50"] == pytest.approx(fp32["latency_ms"]["p50"] / row["latency_ms"]["p50"],
                                                              rel=1e-3)
    assert fp32["vs_fp32"] is None and by_name["branch_eager"]["vs_fp32"] is None


def test_headline_is_the_summary_and_compares_branch_with_ensemble(benched):
    _, run, data, _ = benched
    head, by_name = data["headline"], rows(data)
    ens, br = by_name["one_e_eager"], by_name["branch_onnx_fp32"]
    assert head["speedup_p50"] == pytest.approx(ens["latency_ms"]["p50"] / br["latency_ms"]["p50"], rel=1e-3)
    assert head["size_ratio"] == pytest.approx(ens["file_bytes"] / br["file_bytes"], rel=1e-3)
    assert head["accuracy_delta"] == pytest.approx(br["accuracy"] - ens["accuracy"])
    assert head["params_ratio"] > 1 and head["flops_ratio"] > 1 and head["reason"] is None
    assert run.stage("bench")["summary"] == head


def test_one_thread_count_for_every_row_and_restored_after(benched):
    cfg, _, data, threads_before = benched
    assert data["threads"] == cfg.bench.threads == 1
    assert data["environment"]["torch_threads"] == 1
    assert data["settings"]["iterations"] == 3
    assert torch.get_num_threads() == threads_before


def test_test_limit_and_a_row_that_fails_in_the_bench(benched, monkeypatch):
    """A file that exists but does not run is `failed` in "bench"; the other rows still run."""
    cfg, run, _, _ = benched
    import onnxruntime

    real = onnxruntime.InferenceSession

    def broken_int8(path, *args, **kwargs):
        if str(path).endswith("int8.onnx"):
            raise RuntimeError("cannot load this model\nsecond line")
        return real(path, *args, **kwargs)

    monkeypatch.setattr(onnxruntime, "InferenceSession", broken_int8)
    limited = validate_config({**cfg.model_dump(mode="json"), "bench": {**FAST_BENCH, "test_limit": 40}})
    result = bench_stage.run(make_ctx(limited, run))
    data = json.loads(result.outputs["bench"].read_text())
    by_name = rows(data)
    assert data["test_images"] == 40 and by_name["branch_eager"]["images"] == 40
    assert data["checks"] == []  # training's figures are over the whole test set
    int8 = by_name["branch_onnx_int8"]
    assert (int8["status"], int8["failed_in"], int8["reason"]) == ("failed", "bench",
                                                                   "RuntimeError: cannot load this model")
    assert by_name["branch_onnx_fp32"]["status"] == "ok"
    BenchFile.model_validate(data)


def test_rows_whose_upstream_stage_did_not_produce_them():
    assert bench_stage._upstream(None, "engine", "engine") == {"status": "skipped",
                                                              "reason": "the engine stage has not run"}
    skipped = bench_stage._upstream({"status": "skipped", "reason": "no GPU"}, "engine", "engine")
    assert skipped == {"status": "skipped", "reason": "engine skipped: no GPU"}
    failed = bench_stage._upstream({"status": "failed", "error": "parser error"}, "export", "onnx_int8")
    assert failed == {"status": "failed", "failed_in": "export", "reason": "export failed: parser error"}
    assert bench_stage._upstream({"status": "done", "outputs": {"engine": {}}}, "engine", "engine") is None
    row = Row(name="x", label="x", model="branch", format="tensorrt", precision="int8", **failed)
    assert row.failed_in == "export"
    with pytest.raises(ValueError, match="needs a reason"):
        Row(name="x", label="x", model="branch", format="tensorrt", precision="int8", status="skipped")


@pytest.mark.slow
def test_vanilla_run_skips_the_ensemble_rows(trained_run, tmp_path):
    cfg, run = exported(trained_run, tmp_path, ["fp32"], copy=False, model={"method": "vanilla"},
                        train={"epochs": 1}, data={"synthetic_size": 160})
    assert execute(cfg, stage_def("bench"), run, make_ctx(cfg, run)) == "done"
    data = json.loads(run.output("bench", "bench").read_text())
    by_name = rows(data)
    assert data["method"] == "vanilla" and data["branch"] == 0
    for name in ("one_e_eager", "full_branch_eager"):
        assert by_name[name]["status"] == "skipped" and "vanilla" in by_name[name]["reason"]
    assert by_name["branch_eager"]["accuracy"] == run.stage("train")["summary"]["test"]["branches"][0]
    assert [c["row"] for c in data["checks"]] == ["branch_eager"] and data["checks"][0]["equal"]
    assert data["headline"]["speedup_p50"] is None and "vanilla" in data["headline"]["reason"]
    assert by_name["branch_onnx_int8"]["status"] == "skipped" and "export.precisions" in by_name["branch_onnx_int8"][
        "reason"]


def test_a_disabled_bench_is_skipped(tiny_cfg):
    cfg = validate_config({**tiny_cfg.model_dump(mode="json"), "bench": {"enabled": False}})
    with pytest.raises(StageSkipped, match="bench.enabled is false"):
        bench_stage.run(make_ctx(cfg))
