"""The whole chain on a tiny run, like a build tool: cached reruns, reruns on change, --force, --until."""

import shutil

import pytest
import yaml
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.rundir import RunDir
from pipeline.runner import STAGE_NAMES

runner = CliRunner()
# the tiny config's fast bench, one batch size, and no served row (it starts a tritonserver of its own:
# tests/test_server.py tests it); these tests are about the runner and caching
BENCH_OVERRIDES = {"batch_sizes": [8], "test_limit": 64, "served": False}


@pytest.fixture(scope="module")
def full_run(trained_run, tmp_path_factory):
    """One complete `run` of the tiny config on a copy of the trained run."""
    cfg, run = trained_run
    root = tmp_path_factory.mktemp("chain")
    shutil.copytree(run.root, root / "runs" / cfg.name)
    raw = {**yaml.safe_load(cfg.to_yaml()), "output_root": str(root / "runs")}
    raw["bench"] = {**raw["bench"], **BENCH_OVERRIDES}
    # fp32 only: these tests are about the runner and caching, not about int8 numerics (which differ
    # between CPUs: tests/test_export.py covers quantization with bounds that hold on every x86 CPU)
    raw["export"] = {**raw["export"], "precisions": ["fp32"], "ensemble": False}
    # the tiny run goes through compress too (blocks of 2 channels, a few fine-tune batches, any accuracy)
    raw["compress"] = {"enabled": True, "channel_multiple": 2, "epochs": 1, "images_per_epoch": 64,
                       "batch_size": 16, "max_accuracy_drop": 100}
    config = root / "tiny.yaml"
    config.write_text(yaml.safe_dump(raw))
    result = runner.invoke(app, ["run", str(config)])
    assert result.exit_code == 0, result.output
    return config, RunDir(root / "runs" / cfg.name), result.output


def finished(run):
    """Per stage, when its record was written and its outputs' mtimes (the record's time is in whole seconds)."""
    def when(record):
        return record and (record.finished,
                           [run.recorded_path(o.path).stat().st_mtime_ns for o in record.outputs.values()])
    return {name: when(run.stage(name)) for name in STAGE_NAMES}


def test_run_produces_every_artifact(full_run):
    config, run, output = full_run
    statuses = {name: run.stage(name).status for name in STAGE_NAMES}
    assert statuses["engine"] == "skipped" and "TensorRT" in run.stage("engine").reason
    assert all(s == "done" for n, s in statuses.items() if n != "engine"), statuses
    for path in ("export/model_fp32.onnx", "compress/model.pt", "export/pruned_fp32.onnx", "bench/bench.json",
                 "report/report.md", "report/accuracy_vs_latency.png", "config.yaml"):
        assert run.path(path).exists(), path
    assert list(run.path("triton").glob("*/config.pbtxt"))


def test_second_run_skips_every_stage(full_run):
    config, run, _ = full_run
    before = finished(run)
    result = runner.invoke(app, ["run", str(config)])
    assert result.exit_code == 0
    assert result.output.count("up to date") == len(STAGE_NAMES) - 1  # engine: "skipped: <reason>"
    assert finished(run) == before


def test_a_stage_command_on_a_cached_skip_exits_non_zero(full_run):
    """`one-pipeline engine CONFIG` after `run` recorded the skip: nothing built, so not 0 (docs/DEPLOY.md)."""
    config, run, _ = full_run
    before = finished(run)
    result = runner.invoke(app, ["engine", str(config)])
    assert result.exit_code == 1 and "TensorRT" in result.output and "Traceback" not in result.output
    assert finished(run) == before  # the skip was cached, not rerun


def test_changed_opset_reruns_export_and_after_not_training(full_run, tmp_path):
    config, run, _ = full_run
    before = finished(run)
    result = runner.invoke(app, ["run", str(config), "--set", "export.opset=18"])
    assert result.exit_code == 0, result.output
    after = finished(run)
    assert [n for n in STAGE_NAMES if after[n] == before[n]] == ["train", "select", "strip", "compress"]
    status = runner.invoke(app, ["status", str(config)])  # the file still says opset 20: export is stale
    assert "stale" in status.output


def test_from_and_until(full_run):
    config, run, _ = full_run
    before = finished(run)
    result = runner.invoke(app, ["run", str(config), "--from", "strip", "--until", "export"])
    assert result.exit_code == 0, result.output
    after = finished(run)
    assert after["train"] == before["train"] and after["select"] == before["select"]
    assert after["strip"] != before["strip"] and after["export"] != before["export"]
    assert after["bench"] == before["bench"]  # --until export stopped there


def test_force_is_a_flag_on_run_and_on_every_stage_command(full_run, monkeypatch):
    """--force reruns what the command runs: every stage for `run`, the one stage for a stage command."""
    config, run, _ = full_run
    before = finished(run)
    result = runner.invoke(app, ["strip", str(config), "--force"])
    assert result.exit_code == 0, result.output
    after = finished(run)
    assert [n for n in STAGE_NAMES if after[n] != before[n]] == ["strip"]
    calls = []
    monkeypatch.setattr("pipeline.cli.run_stages", lambda cfg, run, ctx, **kw: calls.append(kw) or {})
    assert runner.invoke(app, ["run", str(config), "--force"]).exit_code == 0
    assert runner.invoke(app, ["strip", str(config), "--force"]).exit_code == 0
    assert calls == [{"until": None, "force": "train", "only": None},
                     {"until": None, "force": "strip", "only": "strip"}]
    result = runner.invoke(app, ["run", str(config), "--force", "--from", "strip"])
    assert result.exit_code == 2 and "give one of them" in result.output and "Traceback" not in result.output
    result = runner.invoke(app, ["run", str(config), "--from", "strp"])
    assert result.exit_code == 2 and "--from 'strp' is not a stage" in result.output


def test_export_branch_override_out_of_range(full_run):
    config, run, _ = full_run
    result = runner.invoke(app, ["export", str(config), "--branch", "7"])
    assert result.exit_code == 2
    assert "select.branch 7 is out of range; this model has branches 0, 1, 2" in result.output
    result = runner.invoke(app, ["export", str(config), "--branch", "1"])
    assert result.exit_code == 0, result.output
    assert run.stage("select").summary["branch"] == 1


def test_engine_alone_exits_non_zero_with_the_reason(full_run):
    config, _, _ = full_run
    result = runner.invoke(app, ["engine", str(config)])
    assert result.exit_code == 1
    assert "TensorRT" in result.output and "Traceback" not in result.output
