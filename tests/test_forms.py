"""The table of deployable forms (pipeline/deploy/forms.py): the names the stages derive from it, and a
runtime added through the table alone, benched and reported."""

from __future__ import annotations

import dataclasses
import json

import pytest
from pydantic import ValidationError

from pipeline.deploy import forms
from pipeline.deploy.benchfile import BenchFile, Row
from pipeline.deploy.runtime import onnxruntime_session
from pipeline.runner import execute, stage_def
from tests.conftest import benched_copy, make_ctx
from tests.test_bench import ROW_NAMES


def test_the_table_names_every_row_file_and_triton_model_as_the_stages_always_have():
    names = [forms.row_name(m, "pytorch") for m in ("ensemble", "full_branch", "branch")]
    names += [forms.row_name(m, "torch.compile") for m in ("ensemble", "branch")]
    names += [forms.row_name(m, rt, p) for rt in ("onnxruntime", "openvino") for p in forms.RUNTIMES[rt].precisions
              for m in ("ensemble", "branch")]
    names += [forms.row_name(m, "tensorrt", "fp16") for m in ("ensemble", "branch")]
    assert names + [forms.row_name("branch", "triton")] == ROW_NAMES
    assert forms.row_label("branch", "pytorch") == "stripped branch"
    assert forms.row_label("ensemble", "openvino", "bf16") == "ONE-E gated ensemble, OpenVINO bf16"
    assert forms.row_label("branch", "torch.compile") == "stripped branch, torch.compile"
    assert [forms.onnx_file_name(m, "int8") for m in forms.EXPORTED] == ["model_int8.onnx", "ensemble_int8.onnx",
                                                                        "pruned_int8.onnx"]
    assert [forms.onnx_key(m, "fp16") for m in forms.EXPORTED] == ["onnx_fp16", "ensemble_onnx_fp16",
                                                                  "pruned_onnx_fp16"]
    triton = {(m, rt, p): forms.triton_model_name("edge", m, rt, p) for m in ("branch", "pruned", "ensemble")
              for rt in ("onnxruntime", "openvino", "tensorrt") for p in ("fp32", "int8_cpu")}
    assert {k: v for k, v in triton.items() if v} == {
        ("branch", "onnxruntime", "fp32"): "edge_onnx", ("branch", "onnxruntime", "int8_cpu"): "edge_onnx_int8_cpu",
        ("branch", "openvino", "int8_cpu"): "edge_openvino_int8_cpu", ("branch", "tensorrt", "fp32"): "edge_trt",
        ("branch", "tensorrt", "int8_cpu"): "edge_trt", ("pruned", "onnxruntime", "fp32"): "edge_pruned_onnx",
        ("pruned", "onnxruntime", "int8_cpu"): "edge_pruned_onnx_int8_cpu",
        ("pruned", "openvino", "int8_cpu"): "edge_pruned_openvino_int8_cpu", ("pruned", "tensorrt", "fp32"):
        "edge_pruned_trt", ("pruned", "tensorrt", "int8_cpu"): "edge_pruned_trt"}
    assert [forms.parse_form(forms.form_name(m, "int8_cpu")) for m in forms.EXPORTED] == [
        (m, "int8_cpu") for m in forms.EXPORTED]


def renamed_onnxruntime(path, threads, device):
    """ONNX Runtime under another name: a runtime the project does not know."""
    session = onnxruntime_session(path, threads, device)
    return dataclasses.replace(session, provider=f"fake ({session.provider})")


def test_a_runtime_added_through_the_table_alone_is_benched_and_reported(exported_run, tmp_path, monkeypatch):
    fake = forms.Runtime("fake", "Fake Runtime", "FAKE", "x", "fake_{precision}", ("fp32", "int8_cpu"),
                         models=("ensemble", "branch"), made_by="export", deployable=True, label_precision=True,
                         source=lambda p: p,
                         session=renamed_onnxruntime)
    monkeypatch.setitem(forms.RUNTIMES, "fake", fake)
    cfg, run = benched_copy(exported_run, tmp_path, bench={"served": False, "openvino": False})
    ctx = make_ctx(cfg, run)
    assert execute(cfg, stage_def("bench"), run, ctx) == "done"
    data = json.loads(run.output("bench", "bench").read_text())
    BenchFile.model_validate(data)
    by_name = {r["name"]: r for r in data["rows"]}
    names = [r["name"] for r in data["rows"]]
    assert names[names.index("branch_triton_fp32") + 1:] == ["one_e_fake_fp32", "branch_fake_fp32",
                                                             "one_e_fake_int8_cpu", "branch_fake_int8_cpu"]
    row = by_name["branch_fake_fp32"]
    assert (row["status"], row["format"], row["label"]) == ("ok", "fake", "stripped branch, Fake Runtime fp32")
    assert row["provider"].startswith("fake (") and row["file"] == "export/model_fp32.onnx"
    assert row["accuracy"] == by_name["branch_onnx_fp32"]["accuracy"] and row["agreement"] == 100.0
    assert row["latency_ms"]["iterations"] == cfg.bench.iterations
    assert by_name["branch_fake_int8_cpu"]["vs_fp32"]["row"] == "branch_fake_fp32"
    assert execute(cfg, stage_def("report"), run, ctx) == "done"
    report = run.output("report", "report").read_text()
    assert "| stripped branch, Fake Runtime fp32 | Fake Runtime fp32 |" in report
    assert "- branch, Fake Runtime int8_cpu: top-1" in report  # its lower precision against its fp32
    assert "- Fake Runtime: batch-1 p50" in report  # its fastest deployed form


def test_a_bench_row_is_made_once_and_never_changed():
    row = Row(name="branch_eager", label="stripped branch", model="branch", format="pytorch", precision="fp32",
              status="skipped", reason="not here")
    with pytest.raises(ValidationError, match="frozen"):
        row.status = "ok"
    assert row.status == "skipped"
    with pytest.raises(ValidationError, match="format 'nowhere' is none of pytorch"):
        Row(**{**row.model_dump(), "format": "nowhere"})
