"""The report stage on a tiny real run: report.md (headline, table, skipped rows with reasons,
environment) and the PNG plot; plus hand-edited bench.json files for the cases a tiny run lacks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from pipeline.deploy.benchfile import BenchFile
from pipeline.errors import ArtifactError, StageSkipped
from pipeline.rundir import RunDir
from pipeline.runner import execute, stage_def
from stages import report as report_stage
from stages.report import PLOT_DPI, PLOT_SIZE_IN, load_bench, markdown, write_plot
from tests.conftest import make_ctx
from tests.test_bench import exported

PLOT_PIXELS = (round(PLOT_SIZE_IN[0] * PLOT_DPI), round(PLOT_SIZE_IN[1] * PLOT_DPI))


@pytest.fixture(scope="module")
def reported(trained_run, tmp_path_factory):
    cfg, run = exported(trained_run, tmp_path_factory.mktemp("report"), ["fp32", "int8"])
    ctx = make_ctx(cfg, run)
    assert execute(cfg, stage_def("bench"), run, ctx) == "done"
    assert execute(cfg, stage_def("report"), run, ctx) == "done"
    bench = json.loads(run.output("bench", "bench").read_text())
    return run, bench


def assert_png(path: Path) -> None:
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size == PLOT_PIXELS
        image.verify()
    with Image.open(path) as image:
        assert len(image.convert("RGB").getcolors(maxcolors=1 << 20)) > 20  # something was drawn


def test_report_markdown_has_headline_table_reasons_and_environment(reported):
    run, bench = reported
    text = run.output("report", "report").read_text()
    head = bench["headline"]
    assert f"**{head['speedup_p50']:.2f}x faster**" in text
    assert f"**{head['size_ratio']:.2f}x smaller**" in text
    assert f"{head['branch_accuracy']:.2f}% top-1 against {head['ensemble_accuracy']:.2f}%" in text
    table = [line for line in text.splitlines() if line.startswith("| ")]
    assert table[0].startswith("| variant | format | precision | status | size MB | top-1 % | agree % | p50 ms")
    assert len(table) == 1 + len(bench["rows"])  # the header and one line per row
    ensemble = next(line for line in table if line.startswith("| ONE-E gated ensemble"))
    one_e = next(r for r in bench["rows"] if r["name"] == "one_e_eager")
    assert f"| {one_e['accuracy']:.2f} |" in ensemble and f"| {one_e['params']:,} |" in ensemble
    assert "## Skipped and failed rows" in text
    for row in bench["rows"]:
        if row["status"] != "ok":
            assert row["reason"] in text
    assert "stripped branch, ONNX Runtime int8: top-1" in text and "than fp32" in text
    assert f"onnxruntime {bench['environment']['onnxruntime']}" in text and "tensorrt not installed" in text
    assert "](accuracy_vs_latency.png)" in text


def test_plot_is_a_png_of_the_expected_size(reported):
    run, _ = reported
    assert_png(run.output("report", "plot"))


def test_report_without_a_headline_says_why(reported, tmp_path):
    """A vanilla-like bench: no ensemble row, so no speed-up; the report says so, the plot still draws."""
    _, data = reported
    data = json.loads(json.dumps(data))
    for row in data["rows"]:
        if row["model"] != "branch":
            row.update({key: None for key in row if key not in ("name", "label", "model", "format", "precision")})
            row.update(status="skipped", reason="vanilla run: one plain network, no branches or gate to ensemble")
    data["headline"].update(speedup_p50=None, size_ratio=None, params_ratio=None, flops_ratio=None,
                            ensemble_accuracy=None, accuracy_delta=None,
                            reason="one_e_eager skipped: vanilla run")
    bench = BenchFile.model_validate(data)
    text = markdown(bench, "plot.png")
    assert "No headline: one_e_eager skipped: vanilla run." in text
    assert "| ONE-E gated ensemble (full model) | PyTorch eager | fp32 | skipped |" in text
    write_plot(bench, tmp_path / "plot.png")
    assert_png(tmp_path / "plot.png")


def test_plot_with_no_measured_row(reported, tmp_path):
    _, data = reported
    data = json.loads(json.dumps(data))
    for row in data["rows"]:
        row.update({key: None for key in row if key not in ("name", "label", "model", "format", "precision")})
        row.update(status="failed", failed_in="export", reason="export failed: boom")
    data["headline"].update({k: None for k in data["headline"] if k not in ("ensemble_row", "branch_row")})
    bench = BenchFile.model_validate(data)
    write_plot(bench, tmp_path / "plot.png")
    assert_png(tmp_path / "plot.png")
    assert "failed (export)" in markdown(bench, "plot.png")


def test_report_rejects_a_bench_json_off_schema(reported, tmp_path):
    data = json.loads(json.dumps(reported[1]))
    path = tmp_path / "bench.json"
    path.write_text(json.dumps({**data, "schema_version": 99}))
    with pytest.raises(ArtifactError, match="schema_version"):
        load_bench(path)
    del data["rows"][0]["reason"]
    path.write_text(json.dumps({**data, "rows": [{**data["rows"][0], "status": "skipped"}]}))
    with pytest.raises(ArtifactError, match="does not follow the bench schema"):
        load_bench(path)
    path.write_text("{not json")
    with pytest.raises(ArtifactError):
        load_bench(path)


def test_nothing_to_report_when_the_bench_was_skipped(tiny_cfg, tmp_path):
    run = RunDir(tmp_path / "run")
    run.record("bench", {"status": "skipped", "reason": "bench.enabled is false in the config", "outputs": {}})
    with pytest.raises(StageSkipped, match="bench.enabled is false"):
        report_stage.run(make_ctx(tiny_cfg, run))
