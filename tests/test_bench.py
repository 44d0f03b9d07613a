"""The bench stage on a tiny real run (train -> select -> strip -> export, real torch and ONNX Runtime):
bench.json follows the documented schema, accuracies equal training's, rows that cannot run carry
reasons. Speed is never asserted: benchmarks measure speed, tests do not time."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.config import validate_config
from pipeline.deploy import bench_rounds
from pipeline.deploy.benchfile import (
    DEPLOYABLE,
    SCHEMA_VERSION,
    BenchFile,
    Check,
    Gain,
    Headline,
    LatencyMs,
    Row,
    Ship,
    Throughput,
    VsFP32,
    headline_text,
    pareto_front,
    ship_pick,
)
from pipeline.deploy.runtime import ort_session, run_split
from pipeline.errors import StageSkipped, UsageError
from pipeline.rundir import RunDir, StageRecord
from pipeline.runner import execute, run_stages, stage_def
from pipeline.training import checkpoint
from pipeline.training.data import load_datasets
from stages import bench as bench_stage
from stages import bench_measure, bench_rows
from stages.bench_served import served_row
from tests.conftest import FAST_BENCH, benched_copy, make_ctx, private_copy, tiny_dict

DOC = Path(__file__).resolve().parents[1] / "docs" / "bench_schema.md"
ROW_NAMES = ["one_e_eager", "full_branch_eager", "branch_eager", "one_e_compile", "branch_compile",
             *[f"{m}_onnx_{p}" for p in ("fp32", "fp16", "int8", "int8_cpu") for m in ("one_e", "branch")],
             *[f"{m}_openvino_{p}" for p in ("fp32", "bf16", "int8_cpu") for m in ("one_e", "branch")],
             "one_e_tensorrt", "branch_tensorrt", "branch_triton_fp32"]


@pytest.fixture
def benched(benched_run):
    """The session's benched run (tests/conftest.py): read it; a test that writes to it takes a private_copy."""
    _, run, data, _ = benched_run
    assert json.loads(run.output("bench", "bench").read_text()) == data  # no earlier test wrote to it
    return benched_run


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
    assert bench.schema_version == SCHEMA_VERSION == 3
    assert f"schema version {SCHEMA_VERSION}" in DOC.read_text().splitlines()[0]  # they move together
    assert documented_fields("Top level") == set(BenchFile.model_fields)
    assert documented_fields("Row") == set(Row.model_fields)
    assert documented_fields("Headline") == set(Headline.model_fields)
    body = DOC.read_text()
    for model in (LatencyMs, Throughput, VsFP32, Check, Gain, Ship):
        assert all(f"`{name}`" in body for name in model.model_fields), model.__name__
    for row in data["rows"]:  # every row carries every documented field, even when null
        assert set(row) == set(Row.model_fields)


def test_every_variant_has_a_row_and_rows_that_cannot_run_say_why(benched):
    _, run, data, _ = benched
    by_name = rows(data)
    assert [r["name"] for r in data["rows"]] == ROW_NAMES
    measured = [n for n in ROW_NAMES if not any(k in n for k in ("compile", "tensorrt", "triton", "bf16"))]
    for name in measured:
        row = by_name[name]
        assert row["status"] == "ok", (name, row["reason"])
        assert row["latency_ms"]["iterations"] == 3 and row["latency_ms"]["batch"] == 1
        assert row["latency_ms"]["p50"] <= row["latency_ms"]["p90"] <= row["latency_ms"]["p99"]
        assert [t["batch"] for t in row["throughput"]] == [1, 8]
        assert all(t["images_per_s"] > 0 for t in row["throughput"])
        assert row["params"] > 0 and row["flops"] > 0 and row["macs"] == row["flops"] // 2
        assert row["file_bytes"] == (run.root / row["file"]).stat().st_size
    for name in ("one_e_compile", "branch_compile"):
        assert by_name[name]["status"] == "skipped" and "CUDA" in by_name[name]["reason"]
    engine = run.stage("engine")
    for name in ("one_e_tensorrt", "branch_tensorrt"):
        assert by_name[name]["status"] == "skipped"
        if engine.status == "skipped":  # no TensorRT or no GPU: the engine stage's own reason
            assert by_name[name]["reason"] == f"engine skipped: {engine.reason}"
    served = by_name["branch_triton_fp32"]  # tested with a real server in tests/test_server.py
    assert served["status"] == "skipped" and "triton stage has not run" in served["reason"]
    assert by_name["branch_onnx_fp32"]["provider"] == "CPUExecutionProvider"
    assert by_name["one_e_onnx_int8"]["file"] == "export/ensemble_int8.onnx"
    # every form shares its PyTorch model's counts; the full model is bigger
    for model in ("branch", "one_e"):
        assert len({by_name[f"{model}_{how}"]["flops"] for how in ("eager", "onnx_fp32", "onnx_int8_cpu")}) == 1
    assert by_name["branch_eager"]["flops"] < by_name["one_e_eager"]["flops"]
    assert by_name["branch_onnx_int8"]["triton_model"] == "tiny_onnx_int8" and by_name["one_e_eager"][
        "triton_model"] is None
    assert by_name["branch_openvino_int8_cpu"]["triton_model"] == "tiny_openvino_int8_cpu"


def test_openvino_rows_run_at_the_precision_they_claim(benched):
    """OpenVINO compiles float layers to bf16 by default on CPUs that have it: the fp32 and int8_cpu rows
    must report f32 as the compiled model's own precision, and bf16 runs only where the CPU has it."""
    import openvino

    _, _, data, _ = benched
    by_name = rows(data)
    for model in ("one_e", "branch"):
        for precision, source in (("fp32", "fp32"), ("int8_cpu", "int8_cpu")):
            row = by_name[f"{model}_openvino_{precision}"]
            assert row["properties"]["INFERENCE_PRECISION_HINT"] == "<Type: 'float32'>", row["properties"]
            assert row["properties"]["NUM_STREAMS"] == "1" and row["properties"]["INFERENCE_NUM_THREADS"] == "1"
            assert row["file"] == by_name[f"{model}_onnx_{source}"]["file"]
        assert by_name[f"{model}_openvino_fp32"]["agreement"] >= 99.0  # the same fp32 graph as ONNX Runtime's
        bf16 = by_name[f"{model}_openvino_bf16"]
        if "BF16" not in openvino.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
            assert bf16["status"] == "skipped" and "no native bfloat16" in bf16["reason"]
        elif bf16["status"] == "ok":
            assert bf16["properties"]["INFERENCE_PRECISION_HINT"] == "<Type: 'bfloat16'>"
            assert bf16["vs_fp32"]["row"] == f"{model}_openvino_fp32"
        else:  # the tiny model may lose more than the bound in bf16: the export guard's reason, then
            assert bf16["status"] == "skipped" and "export.max_accuracy_drop" in bf16["reason"], bf16


def test_the_export_guard_keeps_every_openvino_row_honest(exported_run, tmp_path):
    """The guard that keeps fp16 and int8 honest keeps every OpenVINO row too (bf16 is a precision of its
    own; a runtime may compute a file wrongly): against a recorded fp32 validation top-1 that no model can
    reach within the bound, every OpenVINO compilation loses too much and is not deployed."""
    cfg, run = benched_copy(exported_run, tmp_path)
    entry = run.stage("export")
    entry.summary["branch"]["fp32"]["val_accuracy"] = 100.0 + cfg.export.max_accuracy_drop + 1.0
    run.record("export", entry.model_dump(mode="json"))
    bench = bench_measure.Bench(make_ctx(cfg, run), threads=1)
    bench.static = {"branch": {}}
    for precision in ("fp32", "int8_cpu"):
        row = bench_rows.openvino_row(bench, "branch", precision).model_dump()
        assert row["status"] == "skipped", row
        assert row["reason"].startswith(f"not deployed: OpenVINO {precision} loses ")
        assert row["reason"].endswith(f"> export.max_accuracy_drop {cfg.export.max_accuracy_drop:g}")
    # on a CPU without bfloat16: skipped for that reason
    bf16 = bench_rows.openvino_row(bench, "branch", "bf16").model_dump()
    assert bf16["status"] == "skipped" and ("OpenVINO bf16 loses " in bf16["reason"]
                                            or "no native bfloat16" in bf16["reason"]), bf16


def test_accuracies_equal_what_training_recorded(benched):
    cfg, run, data, _ = benched
    recorded = run.stage("train").summary["test"]
    branch = data["branch"]
    assert branch == run.stage("select").summary["branch"]
    by_name = rows(data)
    assert by_name["one_e_eager"]["accuracy"] == recorded["teacher"]
    assert by_name["full_branch_eager"]["accuracy"] == recorded["branches"][branch]
    assert by_name["branch_eager"]["accuracy"] == recorded["branches"][branch]
    assert {c["row"] for c in data["checks"]} == {"one_e_eager", "full_branch_eager", "branch_eager"}
    assert all(c["equal"] for c in data["checks"])
    assert data["test_images"] == len(load_datasets(cfg.data).test)
    # the full model's branch answers as the stripped network (agreement with branch_eager)
    assert by_name["full_branch_eager"]["agreement"] == 100.0


def test_agreement_is_the_share_of_test_images_predicted_as_the_same_model_in_eager(benched):
    """Recomputed here from the files, each ONNX row's predictions against its own model's in PyTorch."""
    cfg, run, data, _ = benched
    test = load_datasets(cfg.data).test
    images = torch.cat([x for x, _ in test.batches(cfg.train.eval_batch_size)])
    full, _ = checkpoint.load_model(run.output("train", "model"))
    branch, _ = checkpoint.load_model(run.output("strip", "model"))
    with torch.no_grad():
        eager = {"branch": branch(images).argmax(1).numpy(), "one_e": full(images).teacher.argmax(1).numpy()}
    by_name = rows(data)
    for model in ("branch", "one_e"):
        for precision in ("fp32", "fp16", "int8", "int8_cpu"):
            row = by_name[f"{model}_onnx_{precision}"]
            session = ort_session(run.root / row["file"], ["CPUExecutionProvider"], cfg.bench.threads)
            predictions = run_split(session, test, cfg.train.eval_batch_size).argmax(1)
            expected = float(100.0 * np.mean(predictions == eager[model]))
            assert (row["agreement"], row["images"]) == (expected, len(test)), row["name"]


def test_lower_precision_rows_compare_with_fp32_of_the_same_model_and_runtime(benched):
    _, _, data, _ = benched
    by_name = rows(data)
    for model in ("branch", "one_e"):
        fp32 = by_name[f"{model}_onnx_fp32"]
        for precision in ("fp16", "int8", "int8_cpu"):
            row = by_name[f"{model}_onnx_{precision}"]
            assert row["vs_fp32"]["row"] == fp32["name"]
            assert row["vs_fp32"]["accuracy_delta"] == pytest.approx(row["accuracy"] - fp32["accuracy"], abs=1e-4)
            assert row["vs_fp32"]["speedup_p50"] == pytest.approx(
                fp32["latency_ms"]["p50"] / row["latency_ms"]["p50"], rel=1e-3)
            ratio = row["throughput"][-1]["images_per_s"] / fp32["throughput"][-1]["images_per_s"]
            assert row["vs_fp32"]["throughput_ratio"] == pytest.approx(ratio, rel=1e-3)
        assert fp32["vs_fp32"] is None
    assert by_name["branch_eager"]["vs_fp32"] is None


def test_headline_splits_the_gain_into_strip_runtime_and_precision(benched):
    _, run, data, _ = benched
    head, by_name = data["headline"], rows(data)
    strip, ens, br = head["strip"], by_name["one_e_onnx_fp32"], by_name["branch_onnx_fp32"]
    assert head["runtime"] == "onnxruntime fp32" and (strip["row"], strip["versus"]) == (br["name"], ens["name"])
    assert strip["speedup_p50"] == pytest.approx(ens["latency_ms"]["p50"] / br["latency_ms"]["p50"], rel=1e-3)
    assert strip["batch"] == 8 and strip["throughput_ratio"] == pytest.approx(
        br["throughput"][-1]["images_per_s"] / ens["throughput"][-1]["images_per_s"], rel=1e-3)
    assert strip["accuracy_delta"] == pytest.approx(br["accuracy"] - ens["accuracy"], abs=1e-4)
    assert head["size_ratio"] == pytest.approx(ens["file_bytes"] / br["file_bytes"], rel=1e-3)
    assert head["params_ratio"] > 1 and head["flops_ratio"] > 1 and head["reason"] is None
    assert (head["runtime_gain"]["row"], head["runtime_gain"]["versus"]) == ("branch_onnx_fp32", "branch_eager")
    fastest = min((by_name[f"branch_onnx_{p}"] for p in ("fp16", "int8", "int8_cpu")),
                  key=lambda r: r["latency_ms"]["p50"])
    assert (head["precision_gain"]["row"], head["precision_gain"]["versus"]) == (fastest["name"], br["name"])
    assert head["ship"]["reference_row"] == "branch_onnx_fp32" and head["ship"]["row"] is not None
    assert run.stage("bench").summary == head
    assert "In ONNX Runtime fp32, the kept branch answers one image" in headline_text(BenchFile.model_validate(data))


def _row(name: str, accuracy: float, p50: float, ips: float = 100.0, status: str = "ok", **fields) -> Row:
    model, fmt = fields.pop("model", "branch"), fields.pop("format", "onnxruntime")
    figures = {"accuracy": accuracy, "latency_ms": LatencyMs(p50=p50, p90=p50, p99=p50, mean=p50, warmup=0,
                                                             iterations=3),
               "throughput": [Throughput(images_per_s=ips, batch=64, warmup=0, iterations=1)]} if status == "ok" \
        else {"reason": "not deployed"}
    return Row(name=name, label=name, model=model, format=fmt, precision=fields.pop("precision", "fp32"),
               status=status, file=f"export/{name}.onnx", triton_model=f"m_{name}", **figures, **fields)


def test_ship_pick_takes_the_fastest_deployed_branch_form_within_the_bound():
    rows_ = [_row("branch_onnx_fp32", 90.0, 1.0), _row("branch_onnx_fp16", 89.8, 0.9, precision="fp16"),
             _row("branch_onnx_int8_cpu", 89.0, 0.5, precision="int8_cpu"),  # fastest, but 1 point down
             _row("branch_onnx_int8", 0.0, 0.1, status="skipped", precision="int8"),  # rejected by the guard
             _row("one_e_onnx_fp32", 95.0, 0.01, model="ensemble"),  # not the branch
             _row("branch_eager", 90.0, 0.05, format="pytorch")]  # not a file a server runs
    pick = ship_pick(rows_, max_drop=0.5)
    assert (pick.row, pick.file, pick.triton_model) == ("branch_onnx_fp16", "export/branch_onnx_fp16.onnx",
                                                       "m_branch_onnx_fp16")
    assert "over the bound: branch_onnx_int8_cpu" in pick.reason and "-0.20 points" in pick.reason
    assert ship_pick(rows_, max_drop=1.0).row == "branch_onnx_int8_cpu"
    ties = [_row("branch_onnx_fp32", 90.0, 1.0, ips=100), _row("branch_tensorrt", 90.0, 1.0, ips=300,
                                                                format="tensorrt")]
    assert ship_pick(ties, 0.5).row == "branch_tensorrt"  # equal latency: more throughput wins
    none = ship_pick([_row("branch_onnx_fp32", 0.0, 1.0, status="skipped")], 0.5)
    assert none.row is None and "did not run" in none.reason


def test_ship_for_throughput_takes_the_most_images_per_s_across_runtimes():
    rows_ = [_row("branch_onnx_fp32", 90.0, 1.0, ips=100), _row("branch_onnx_int8_cpu", 90.0, 0.4, ips=300,
                                                                precision="int8_cpu"),
             _row("branch_openvino_int8_cpu", 90.0, 0.6, ips=500, format="openvino", precision="int8_cpu"),
             _row("branch_openvino_bf16", 80.0, 0.3, ips=900, format="openvino", precision="bf16"),  # over the bound
             _row("one_e_openvino_int8_cpu", 90.0, 0.1, ips=9000, model="ensemble", format="openvino")]
    latency, throughput = ship_pick(rows_, 0.5, "latency"), ship_pick(rows_, 0.5, "throughput")
    assert (latency.row, latency.objective) == ("branch_onnx_int8_cpu", "latency")
    assert (throughput.row, throughput.objective) == ("branch_openvino_int8_cpu", "throughput")
    assert "most images/s at batch 64 (500)" in throughput.reason and "branch_openvino_bf16" in throughput.reason
    assert throughput.other_objective.startswith("branch_onnx_int8_cpu: fastest at batch 1 (p50 0.400 ms)")
    assert latency.other_objective.startswith("branch_openvino_int8_cpu: most images/s")
    same = ship_pick(rows_[:2], 0.5, "throughput")
    assert same.row == "branch_onnx_int8_cpu" and same.other_objective is None  # one form wins both


def test_pareto_front_keeps_rows_no_other_row_beats_on_both_axes():
    a, b, c, d = (_row("a", 90.0, 1.0), _row("b", 91.0, 2.0), _row("c", 89.0, 3.0), _row("d", 91.0, 2.0))
    assert [r.name for r in pareto_front([a, b, c, d])] == ["a", "b", "d"]  # c is beaten by a; b and d tie


def test_rows_are_timed_in_turns_round_after_round(exported_run, tmp_path, monkeypatch):
    """Timed one after the other, a row's place in the order could decide what to ship on a machine whose
    speed drifts; in rounds, every row takes its turn in each round. A row whose timing fails is `failed`
    in "bench" and leaves the later rounds to the others."""
    cfg, run = benched_copy(exported_run, tmp_path, bench={"rounds": 2, "served": False, "turn_pause_ms": 2})
    turns, real, pauses, sleep = [], bench_rounds.take_turn, [], time.sleep
    monkeypatch.setattr(time, "sleep", lambda s: pauses.append(s) or sleep(s))

    def spy(timer, cfg, device, iterations, throughput_iterations):
        turns.append((timer.name, iterations, throughput_iterations))
        if timer.name == "branch_onnx_fp16" and [t[0] for t in turns].count(turns[0][0]) > 1:  # round 2
            raise RuntimeError("device lost\nsecond line")
        return real(timer, cfg, device, iterations, throughput_iterations)

    monkeypatch.setattr(bench_rounds, "take_turn", spy)
    assert execute(cfg, stage_def("bench"), run, make_ctx(cfg, run)) == "done"
    data = json.loads(run.output("bench", "bench").read_text())
    timed = [r["name"] for r in data["rows"] if r["status"] == "ok" or r["name"] == "branch_onnx_fp16"]
    assert len(timed) >= 10 and turns == [(n, 2, 1) for n in timed] + [(n, 1, 1) for n in timed]  # 3 calls: 2, 1
    assert pauses.count(0.002) == len(turns)  # bench.turn_pause_ms before every turn
    failed = rows(data)["branch_onnx_fp16"]
    assert (failed["status"], failed["failed_in"], failed["reason"]) == ("failed", "bench", "RuntimeError: device lost")
    ok = [r for r in data["rows"] if r["status"] == "ok"]
    assert all(r["latency_ms"]["iterations"] == 3 and r["throughput"][0]["iterations"] == 2 for r in ok)
    BenchFile.model_validate(data)


def test_one_thread_count_for_every_row_and_restored_after(benched):
    cfg, _, data, threads_before = benched
    assert data["threads"] == cfg.bench.threads == 1
    assert data["environment"]["torch_threads"] == 1 and data["environment"]["cpu"]
    assert data["settings"]["iterations"] == 3 and data["batch_sizes"] == [1, 8]
    assert torch.get_num_threads() == threads_before


def test_test_limit_and_a_row_that_fails_in_the_bench(benched, tmp_path, monkeypatch):
    """A file that exists but does not run is `failed` in "bench"; the other rows still run."""
    cfg, run = private_copy(benched[:2], tmp_path)
    import onnxruntime

    real = onnxruntime.InferenceSession

    def broken_int8(path, *args, **kwargs):
        if str(path).endswith("model_int8.onnx"):
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
    assert (int8["status"], int8["failed_in"]) == ("failed", "bench")
    assert int8["reason"].startswith("PipelineError: ONNX Runtime cannot load model_int8.onnx (RuntimeError: cannot")
    assert by_name["branch_onnx_fp32"]["status"] == "ok" and by_name["one_e_onnx_int8"]["status"] == "ok"
    BenchFile.model_validate(data)


def test_a_model_the_guard_rejected_is_a_skipped_row_that_says_why(exported_run, tmp_path):
    cfg, run = benched_copy(exported_run, tmp_path, bench={"ship_max_accuracy_drop": 100.0})
    manifest = json.loads(run.manifest_path.read_text())
    export = manifest["stages"]["export"]
    del export["outputs"]["onnx_int8"]
    export["summary"]["branch"]["int8"] = {"passed": False, "reason": "int8 loses 3.10 top-1 points on 64 images"}
    run.manifest_path.write_text(json.dumps(manifest))
    data = json.loads(bench_stage.run(make_ctx(cfg, run)).outputs["bench"].read_text())
    row = rows(data)["branch_onnx_int8"]
    assert (row["status"], row["reason"]) == ("skipped", "not deployed: int8 loses 3.10 top-1 points on 64 images")
    # the ship pick weighs the measured forms only, against bench.ship_max_accuracy_drop (here 100: all of them)
    ship = data["headline"]["ship"]
    measured = [r for r in data["rows"] if r["model"] == "branch" and r["format"] in DEPLOYABLE
                and r["status"] == "ok"]
    assert ship["max_accuracy_drop"] == 100.0 and "branch_onnx_int8" not in ship["reason"]
    assert f"of {len(measured)} deployed forms within 100 top-1 points" in ship["reason"]


def test_a_baseline_run_adds_the_same_network_trained_alone(benched, tmp_path):
    """Attached with one config field; here the baseline is a copy of this run in another folder, so its
    network is the kept branch and every figure that does not depend on timing must match."""
    cfg, run = private_copy(benched[:2], tmp_path / "own")
    alone = tmp_path / "alone"
    shutil.copytree(run.root, alone)
    with_baseline = validate_config({**cfg.model_dump(mode="json"), "bench": {**FAST_BENCH,
                                                                               "baseline": str(alone)}})
    data = json.loads(bench_stage.run(make_ctx(with_baseline, run)).outputs["bench"].read_text())
    by_name = rows(data)
    assert [r["name"] for r in data["rows"]][-2:] == ["baseline_eager", "baseline_onnx_fp32"]
    assert data["baseline"] == str(alone) and by_name["baseline_eager"]["file"] == str(alone / "strip/branch.pt")
    for how in ("eager", "onnx_fp32"):
        baseline, branch = by_name[f"baseline_{how}"], by_name[f"branch_{how}"]
        assert baseline["status"] == "ok" and baseline["accuracy"] == branch["accuracy"]
        assert baseline["params"] == branch["params"] and baseline["agreement"] == 100.0
    other = tmp_path / "other"
    shutil.copytree(run.root, other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["stages"]["train"]["config"]["data"]["dataset"] = "fashion-mnist"
    (other / "manifest.json").write_text(json.dumps(manifest))
    for baseline, message in ((other, "was trained on other data"), (tmp_path / "nothing", "no finished training")):
        wrong = validate_config({**cfg.model_dump(mode="json"), "bench": {**FAST_BENCH, "baseline": str(baseline)}})
        with pytest.raises(UsageError, match=message):
            bench_stage.run(make_ctx(wrong, run))


@pytest.mark.slow
def test_vanilla_run_skips_the_ensemble_rows(trained_run, tmp_path):
    cfg = validate_config(tiny_dict(tmp_path, model={"method": "vanilla"}, train={"epochs": 1},
                                    data={"synthetic_size": 160}, bench=FAST_BENCH))
    run = RunDir(cfg.run_dir)
    run_stages(cfg, run, make_ctx(cfg, run), until="bench")
    data = json.loads(run.output("bench", "bench").read_text())
    by_name = rows(data)
    assert data["method"] == "vanilla" and data["branch"] == 0
    for name in ("one_e_eager", "full_branch_eager", "one_e_compile", "one_e_onnx_fp32", "one_e_tensorrt"):
        assert by_name[name]["status"] == "skipped" and "vanilla" in by_name[name]["reason"]
    assert by_name["branch_eager"]["accuracy"] == run.stage("train").summary["test"]["branches"][0]
    assert [c["row"] for c in data["checks"]] == ["branch_eager"] and data["checks"][0]["equal"]
    assert data["headline"]["strip"] is None and "vanilla" in data["headline"]["reason"]
    assert by_name["branch_onnx_int8"]["status"] == "skipped" and "export.precisions" in by_name["branch_onnx_int8"][
        "reason"]


def test_a_disabled_bench_is_skipped(tiny_cfg):
    cfg = validate_config({**tiny_cfg.model_dump(mode="json"), "bench": {"enabled": False}})
    with pytest.raises(StageSkipped, match="bench.enabled is false"):
        bench_stage.run(make_ctx(cfg))


def test_the_served_row_without_tritonclient_says_how_to_install_it(tiny_cfg, monkeypatch):
    """`pip install -e .` alone has no tritonclient: the served row is skipped with the fix, never failed."""
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == "tritonclient" else real(name, *args))
    with pytest.raises(StageSkipped, match=r"tritonclient: pip install -e '\.\[triton\]'"):
        served_row(make_ctx(tiny_cfg), np.zeros((1, 3, 16, 16), np.float32), np.zeros(1, np.int64))


def test_without_openvino_its_rows_are_skipped_with_the_install_command(tiny_onnx, monkeypatch):
    from pipeline.deploy import openvino_runtime

    monkeypatch.setitem(sys.modules, "openvino", None)  # `import openvino` raises ImportError
    with pytest.raises(StageSkipped, match=r"OpenVINO is not installed: pip install openvino"):
        openvino_runtime.compile_onnx(tiny_onnx, "fp32", threads=1)


def _compress_entry(deployed=True, **plan):
    latency_plan = {"source": "planned", "target": {"speedup": 2.0, "ms": None}, "runtime": "onnxruntime",
                    "precision": "fp32", "batch": 1, "threads": 2, "cpu": "AMD EPYC", "plan": "16-32-64/16-32-64/1-1-3",
                    "speedup": 2.1, "p50_ms": 0.1, **plan}
    return StageRecord(status="done", outputs={}, summary={
        "deployed": deployed, "latency_plan": latency_plan,
        **({} if deployed else {"reason": "the pruned network loses 0.74 points"})})


def _target_rows(pruned_p50, branch_p50=0.2, pruned_ips=900.0, branch_ips=450.0, **pruned):
    """The kept branch and its pruned form in ONNX Runtime fp32 (fake timings: a test of the verdict, not the clock)."""
    return [_row("branch_onnx_fp32", 90.0, branch_p50, branch_ips),
            _row("pruned_onnx_fp32", 89.8, pruned_p50, pruned_ips, model="pruned", **pruned)]


def test_the_headline_target_says_met_missed_or_why_not_measured():
    from pipeline.deploy.benchfile import TargetCheck
    from pipeline.deploy.target_check import headline_target

    met = TargetCheck(**headline_target(_target_rows(0.095), _compress_entry(), "AMD EPYC", 2))
    assert (met.met, met.why, met.row, met.versus, met.same_host) == (True, "met", "pruned_onnx_fp32",
                                                                     "branch_onnx_fp32", True)
    assert abs(met.achieved_speedup - 0.2 / 0.095) < 1e-3 and met.achieved_ms == 0.095 and met.planned_speedup == 2.1
    missed = TargetCheck(**headline_target(_target_rows(0.125), _compress_entry(), "Intel Xeon", 2))
    assert (missed.met, missed.why, missed.same_host, missed.benched_on) == (False, "planner_and_bench_disagree",
                                                                            False, "Intel Xeon")
    assert abs(missed.planner_vs_bench - (1.6 / 2.1 - 1)) < 1e-3
    guarded = headline_target(_target_rows(0.1, status="skipped"), _compress_entry(deployed=False), "AMD EPYC", 2)
    assert (guarded["met"], guarded["why"], guarded["achieved_speedup"], guarded["achieved_ms"]) == \
        (False, "accuracy_guard", 1.0, 0.2) and "0.74 points" in guarded["reason"]
    skipped = headline_target(_target_rows(0.1, status="skipped"), _compress_entry(), "AMD EPYC", 2)
    assert (skipped["met"], skipped["why"]) == (None, "not_measured") and "not deployed" in skipped["reason"]
    # a batch-64 target: images/s at that batch, 900 against 450
    batched = headline_target(_target_rows(0.5, branch_p50=0.2), _compress_entry(batch=64), "AMD EPYC", 2)
    assert batched["met"] and batched["achieved_speedup"] == 2.0 and abs(batched["achieved_ms"] - 64000 / 900) < 1e-3
    unbenched = headline_target(_target_rows(0.1), _compress_entry(batch=8), "AMD EPYC", 2)
    assert unbenched["why"] == "not_measured" and "add 8 to bench.batch_sizes" in unbenched["reason"]
    ms = headline_target(_target_rows(0.095), _compress_entry(target={"speedup": None, "ms": 0.09}), "AMD EPYC", 2)
    assert (ms["kind"], ms["met"]) == ("ms", False)
    unplanned = StageRecord(status="done", outputs={}, summary={"deployed": True})
    assert headline_target(_target_rows(0.1), unplanned, "x", 2) is None
    assert headline_target(_target_rows(0.1), None, "x", 2) is None
