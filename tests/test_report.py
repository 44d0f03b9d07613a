"""The report stage on a tiny real run: report.md (headline, table, skipped rows with reasons,
environment) and the PNG plot; plus hand-edited bench.json files for the cases a tiny run lacks."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from PIL import Image

from pipeline.compare import recipe
from pipeline.config import load_config
from pipeline.deploy.benchfile import BenchFile, rich_table
from pipeline.deploy.forms import MODELS, RUNTIMES
from pipeline.deploy.unmeasured import console_lines
from pipeline.errors import ArtifactError, StageSkipped
from pipeline.plots import CURVES_DPI, CURVES_SIZE_IN, Curves, training_curves_figure
from pipeline.rundir import RunDir
from pipeline.runner import execute, stage_def
from stages import report as report_stage
from stages.report import PLOT_DPI, PLOT_SIZE_IN, load_bench, markdown, plot_figure, worth_it, write_plot
from tests.conftest import make_ctx, private_copy

PLOT_PIXELS = (round(PLOT_SIZE_IN[0] * PLOT_DPI), round(PLOT_SIZE_IN[1] * PLOT_DPI))
CURVES_PIXELS = (round(CURVES_SIZE_IN[0] * CURVES_DPI), round(CURVES_SIZE_IN[1] * CURVES_DPI))


@pytest.fixture(scope="module")
def reported(benched_run, tmp_path_factory):
    """The session's benched run (tests/conftest.py), reported in a copy of its own."""
    cfg, run = private_copy(benched_run[:2], tmp_path_factory.mktemp("report"))
    assert execute(cfg, stage_def("report"), run, make_ctx(cfg, run)) == "done"
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
    head, by_name = bench["headline"], {r["name"]: r for r in bench["rows"]}
    strip = head["strip"]
    assert text.splitlines()[2].startswith(f"Measured on {bench['environment']['cpu']} (")
    assert f"In ONNX Runtime fp32, the kept branch answers one image {strip['speedup_p50']:.2f}x faster" in text
    assert (f"- **Strip gain (same runtime, same precision):** branch, ONNX Runtime fp32 vs ONE-E, ONNX Runtime fp32: "
            f"{strip['speedup_p50']:.2f}x faster at batch 1") in text
    assert f"The branch file is {head['size_ratio']:.2f}x smaller" in text
    assert "- **Runtime gain (same model):** branch, ONNX Runtime fp32 vs branch, PyTorch eager" in text
    assert "- **Precision gain (same model, same runtime):** branch, ONNX Runtime " in text
    ship = by_name[head["ship"]["row"]]
    assert "## What to ship on this machine" in text
    served = f", Triton model `{ship['triton_model']}`" if ship["triton_model"] else ""
    assert f"`{ship['file']}`{served}. Why: " in text
    results = text.split("## Results", 1)[1].split("\n## ", 1)[0]
    table = [line for line in results.splitlines() if line.startswith("| ")]
    assert table[0].startswith("| variant | runtime | status | size MB | top-1 % | agree % | p50 ms | p99 ms | "
                               "img/s @1 | img/s @8 |")
    skipped = [r for r in bench["rows"] if r["status"] == "skipped"]
    assert skipped and len(table) == 1 + len(bench["rows"]) - len(skipped)  # the header and one line per row run
    assert not any(" | skipped | " in line for line in table)  # no dash row
    ensemble = next(line for line in table if line.startswith("| ONE-E gated ensemble (full model) |"))
    one_e = by_name["one_e_eager"]
    assert f"| {one_e['accuracy']:.2f} |" in ensemble and f"| {one_e['params']:,} |" in ensemble
    by_runtime = text.split("## The kept branch against ONE-E, runtime by runtime", 1)[1].split("\n## ", 1)[0]
    twins = [r for r in bench["rows"] if r["model"] == "branch" and r["status"] == "ok"
             and by_name.get(r["name"].replace("branch_", "one_e_", 1), {}).get("status") == "ok"]
    assert len(twins) >= 1 + 4 + 2  # eager, 4 ONNX Runtime, OpenVINO fp32 and int8_cpu (and bf16 where it ran)
    assert len([line for line in by_runtime.splitlines() if line.startswith("| ")]) == 1 + len(twins)
    ship_text = text.split("## What to ship on this machine", 1)[1].split("\n## ", 1)[0]
    assert "Shipped for latency (bench.ship_for)." in ship_text
    assert "- ONNX Runtime: batch-1 p50 " in ship_text and "- OpenVINO: batch-1 p50 " in ship_text
    assert "## Skipped and failed rows" not in text  # folded under the table, not said twice
    assert results.split("\n\nNot measured here:\n\n", 1)[0].endswith(table[-1])  # right under the table
    entries = unmeasured_entries(results)
    assert len(entries) == len({r["reason"] for r in skipped})  # forms skipped for one reason share an entry
    for row in skipped:
        assert any(names_form(entry, row) for entry in entries), (row["name"], entries)
    assert ("- torch.compile for ONE-E, branch: torch.compile with CUDA graphs is measured on CUDA only; this bench "
            "runs on cpu") in results
    assert "- branch, ONNX Runtime int8_cpu: top-1" in text and "than fp32" in text
    assert "- fp16 on this CPU: " in text and "the fp16 file is for GPUs" in text
    guard = text.split("## Export accuracy guard", 1)[1].split("\n## ", 1)[0]
    assert "| int8_cpu | ONNX Runtime on x86 CPUs" in guard and "| minmax, every layer int8 |" in guard
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
            row.update(status="skipped", reason="vanilla run: one plain network, no branches or gate to ensemble",
                       throughput=[])
    data["headline"].update(strip=None, size_ratio=None, params_ratio=None, flops_ratio=None,
                            reason="one_e_onnx_fp32 skipped: vanilla run")
    bench = BenchFile.model_validate(data)
    text = markdown(bench, "plot.png")
    assert "No headline: one_e_onnx_fp32 skipped: vanilla run." in text
    results = text.split("## Results", 1)[1].split("\n## ", 1)[0]
    assert "| ONE-E gated ensemble" not in results and "| stripped branch | PyTorch eager | ok |" in results
    vanilla = next(e for e in unmeasured_entries(results) if e.endswith(": vanilla run: one plain network, no "
                                                                         "branches or gate to ensemble"))
    assert vanilla.startswith("PyTorch eager for ONE-E, full model -> branch; torch.compile for ONE-E; ONNX Runtime "
                              "fp32/fp16/int8/int8_cpu for ONE-E; OpenVINO fp32/bf16/int8_cpu for ONE-E; ")
    assert "## The kept branch against ONE-E" not in text
    write_plot(bench, tmp_path / "plot.png")
    assert_png(tmp_path / "plot.png")


def unmeasured_entries(results: str) -> list[str]:
    """The entries of the results' "Not measured here:" list."""
    listed = results.split("\n\nNot measured here:\n\n", 1)[1].split("\n\n", 1)[0]
    return [line.removeprefix("- ") for line in listed.splitlines()]


def names_form(entry: str, row: dict) -> bool:
    """Whether a "Not measured here" entry names this row's form (runtime, model, precision) with its reason."""
    if not entry.endswith(f": {row['reason']}"):
        return False
    runtime, who = RUNTIMES[row["format"]].name, MODELS[row["model"]].who
    for part in entry[:-len(row["reason"]) - 2].split("; "):
        how, _, models = part.partition(" for ")
        if how.startswith(runtime) and who in models.split(", "):
            precisions = how[len(runtime):].strip()
            if not precisions or row["precision"] in precisions.split("/"):
                return True
    return False


def _not_run(row: dict, status: str, reason: str) -> None:
    row.update({key: None for key in row if key not in ("name", "label", "model", "format", "precision")})
    row.update(status=status, reason=reason, throughput=[], failed_in="export" if status == "failed" else None)


def test_skipped_forms_are_folded_by_reason_under_the_table_and_failed_rows_stay_in_it(reported):
    _, data = reported
    data = json.loads(json.dumps(data))
    by_name = {r["name"]: r for r in data["rows"]}
    shared = "not exported here: a reason several forms share"
    for name in ("one_e_onnx_fp16", "branch_onnx_fp16", "one_e_onnx_int8", "branch_onnx_int8", "one_e_onnx_int8_cpu",
                 "one_e_openvino_bf16", "branch_openvino_bf16"):
        _not_run(by_name[name], "skipped", shared)
    _not_run(by_name["branch_onnx_int8_cpu"], "failed", "export failed: boom")
    data["headline"].update(precision_gain=None, ship=None)
    bench = BenchFile.model_validate(data)
    results = markdown(bench, "plot.png").split("## Results", 1)[1].split("\n## ", 1)[0]
    table = [line for line in results.splitlines() if line.startswith("| ")]
    assert len(table) == 1 + sum(r.status != "skipped" for r in bench.rows)
    assert "| stripped branch, ONNX Runtime int8_cpu | ONNX Runtime int8_cpu | failed (export) |" in results
    entries = unmeasured_entries(results)
    assert [e for e in entries if e.endswith(shared)] == [  # models that share their precisions share a part
        f"ONNX Runtime fp16/int8/int8_cpu for ONE-E; ONNX Runtime fp16/int8 for branch; OpenVINO bf16 for ONE-E, "
        f"branch: {shared}"]
    assert not any("int8_cpu for branch" in e for e in entries)  # a failed row is in the table, not in this list
    assert "\n\nFailed (marked in the table):\n\n- ONNX Runtime int8_cpu for branch: export failed: boom" in results
    terminal = rich_table(bench)
    assert terminal.row_count == len(table) - 1  # the terminal's table: the same rows
    lines = console_lines(bench)
    assert lines[0] == "not measured here:" and f"  {entries[1]}" in lines and entries[1].endswith(shared)
    assert lines[-2:] == ["failed:", "  ONNX Runtime int8_cpu for branch: export failed: boom"]
    for row in data["rows"]:
        _not_run(row, "skipped", "nothing runs here")
    data["headline"].update({k: None for k in data["headline"] if k != "runtime"})
    nothing = markdown(BenchFile.model_validate(data), "plot.png").split("## Results", 1)[1].split("\n## ", 1)[0]
    assert "No form was measured here." in nothing and "| variant |" not in nothing


def test_plot_with_no_measured_row(reported, tmp_path):
    _, data = reported
    data = json.loads(json.dumps(data))
    for row in data["rows"]:
        row.update({key: None for key in row if key not in ("name", "label", "model", "format", "precision")})
        row.update(status="failed", failed_in="export", reason="export failed: boom", throughput=[])
    data["headline"].update({k: None for k in data["headline"] if k != "runtime"})
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


def test_a_bench_json_of_an_older_schema_is_refused_in_one_line_that_says_to_rerun_the_bench(reported, tmp_path):
    """A version 2 file has no pruned rows, headline.prune or headline.target: the report refuses it."""
    path = tmp_path / "bench.json"
    for older in (2, None):
        path.write_text(json.dumps({**reported[1], "schema_version": older}))
        with pytest.raises(ArtifactError) as refused:
            load_bench(path)
        assert str(refused.value) == (f"{path} has bench schema_version {older or 'none'}, this one-pipeline reads 3; "
                                      "rerun the bench: one-pipeline run CONFIG --from bench")


def test_nothing_to_report_when_the_bench_was_skipped(tiny_cfg, tmp_path):
    run = RunDir(tmp_path / "run")
    run.record("bench", {"status": "skipped", "reason": "bench.enabled is false in the config", "outputs": {}})
    with pytest.raises(StageSkipped, match="bench.enabled is false"):
        report_stage.run(make_ctx(tiny_cfg, run))


def test_training_curves_are_drawn_and_linked(reported):
    run, _ = reported
    history = [json.loads(line) for line in run.output("train", "metrics").read_text().splitlines()]
    with Image.open(run.output("report", "curves")) as image:
        assert image.format == "PNG" and image.size == CURVES_PIXELS
        assert len(image.convert("RGB").getcolors(maxcolors=1 << 20)) > 20
    text = run.output("report", "report").read_text()
    training = text.split("## Training", 1)[1].split("\n## ", 1)[0]
    last = history[-1]
    assert f"{len(history)} epoch(s). At epoch {last['epoch']}: training loss {last['train_loss']:.4f}" in training
    assert f"ONE-E {last['val']['teacher']:.2f}%" in training and "](training_curves.png)" in training
    fig = training_curves_figure([Curves("tiny", history, kept=1)], "t")
    loss_ax, lr_ax, val_ax = fig.axes
    assert [line.get_ydata().tolist() for line in loss_ax.lines] == [[r["train_loss"] for r in history]]
    assert [line.get_ydata().tolist() for line in lr_ax.lines] == [[r["lr"] for r in history]]
    drawn = {line.get_label(): line.get_ydata().tolist() for line in val_ax.lines}
    assert drawn == {**{f"branch {i}" + (" (kept)" if i == 1 else ""): [r["val"]["branches"][i] for r in history]
                        for i in range(3)}, "ONE-E (gated ensemble)": [r["val"]["teacher"] for r in history]}
    assert_legend_covers_nothing(fig)


def assert_legend_covers_nothing(fig) -> None:
    FigureCanvasAgg(fig).draw()
    legends = [ax.get_legend() for ax in fig.axes if ax.get_legend()]
    assert legends
    for legend in legends:
        for ax in fig.axes:
            assert not legend.get_window_extent().overlaps(ax.get_window_extent())


def test_latency_axis_reads_in_plain_milliseconds_and_the_legend_covers_no_point(reported):
    _, data = reported
    data = json.loads(json.dumps(data))
    measured = [row for row in data["rows"] if row["status"] == "ok"]
    for factor, row in zip((1, 4, 40), measured):  # latencies over 10x apart: a log axis
        row["latency_ms"] = {**row["latency_ms"], **{k: 0.2 * factor for k in ("p50", "p90", "p99")}}
    fig = plot_figure(BenchFile.model_validate(data))
    FigureCanvasAgg(fig).draw()
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.get_xticklabels(which="both") if t.get_text()]
    assert ax.get_xscale() == "log" and labels and all(re.fullmatch(r"\d+(\.\d+)?", t) for t in labels), labels
    assert_legend_covers_nothing(fig)


def test_a_one_run_says_whether_one_paid_from_its_compare_else_what_was_measured(reported):
    run, _ = reported
    text = run.path("report/report.md").read_text()
    assert "Is ONE worth its training cost?" in text and "one-pipeline compare CONFIG --seeds 0,1,2" in text
    assert "measured so far" not in text and "Fashion-MNIST" not in text  # no project findings in a user's report
    cfg = load_config(run.root / "config.yaml")
    compare_dir = cfg.output_root / f"{cfg.name}-compare"
    compare_dir.mkdir()
    verdict = {"gains": [{"verdict": "+1.23 points, paired p = 0.01"}]}
    try:  # a compare of this recipe is quoted; one of another recipe (more epochs) is not
        for epochs, quoted in ((cfg.train.epochs + 1, False), (cfg.train.epochs, True)):
            other = cfg.model_copy(update={"train": cfg.train.model_copy(update={"epochs": epochs})})
            (compare_dir / "compare.json").write_text(json.dumps({**verdict, "recipe": recipe(other)}))
            assert execute(cfg, stage_def("report"), run, make_ctx(cfg, run)) == "done"
            text = run.path("report/report.md").read_text()
            assert ("+1.23 points, paired p = 0.01" in text) is quoted
            assert ("Is ONE worth its training cost?" in text) is not quoted
    finally:
        shutil.rmtree(compare_dir)
        execute(cfg, stage_def("report"), run, make_ctx(cfg, run))


def test_the_worth_it_sentence_quotes_no_figure_the_run_did_not_measure(reported):
    """Fashion-MNIST runs too: the project's own compares are pointed to (docs/RESULTS.md), never quoted."""
    run, _ = reported
    cfg = load_config(run.root / "config.yaml")
    for dataset in ("synthetic", "fashion-mnist"):
        other = cfg.model_copy(update={"data": cfg.data.model_copy(update={"dataset": dataset})})
        sentence = worth_it(make_ctx(other, run))
        assert "one-pipeline compare CONFIG" in sentence and not re.search(r"[-+]?\d+\.\d+|\d+%", sentence)
        assert ("docs/RESULTS.md" in sentence) is (dataset == "fashion-mnist")


def _with_target(data: dict, **check) -> BenchFile:
    """The tiny run's bench.json with a latency target check in its headline (fake figures: a test of the wording)."""
    data = json.loads(json.dumps(data))
    data["headline"]["target"] = {
        "kind": "speedup", "value": 2.0, "runtime": "onnxruntime", "precision": "fp32", "batch": 1,
        "row": "pruned_onnx_fp32", "versus": "branch_onnx_fp32", "plan": "16-32-64/16-32-64/1-1-3",
        "plan_source": "planned", "planned_speedup": 2.1, "planned_ms": 0.1, "achieved_speedup": 2.05,
        "achieved_ms": 0.098, "planner_vs_bench": -0.0238, "met": True, "why": "met",
        "reason": "the bench measured the target met", "planned_on": data["environment"]["cpu"],
        "benched_on": data["environment"]["cpu"], "planned_threads": 1, "benched_threads": 1, "same_host": True,
        **check}
    return BenchFile.model_validate(data)


PLAN = {"key": {"target": {"speedup": 2.0, "ms": None}, "runtime": "onnxruntime", "precision": "fp32", "batch": 1,
                "threads": 2, "cpu": "AMD EPYC", "channel_multiple": 16}, "seconds": 12.3,
        "branch": {"label": "16-32-64/16-32-64/3-3-3", "flops": 100, "flops_ratio": 1.0, "params": 270000,
                   "p50_ms": 0.2, "speedup": 1.0, "spread": [1.0, 1.0], "rounds": 20},
        "chosen": {"label": "16-32-64/16-32-64/1-1-3", "flops": 53, "flops_ratio": 0.53, "params": 225000,
                   "p50_ms": 0.095, "speedup": 2.1, "spread": [1.9, 2.3], "rounds": 18, "meets": True,
                   "chosen": True},
        "candidates": [
            {"label": "16-32-64/16-32-64/1-2-3", "flops": 65, "flops_ratio": 0.65, "params": 250000, "p50_ms": 0.13,
             "speedup": 1.55, "spread": [1.4, 1.6], "rounds": 8, "meets": False, "chosen": False, "neighbour": True},
            {"label": "16-32-64/16-32-64/1-1-3", "flops": 53, "flops_ratio": 0.53, "params": 225000,
             "p50_ms": 0.095, "speedup": 2.1, "spread": [1.9, 2.3], "rounds": 18, "meets": True, "chosen": True,
             "neighbour": False},
            {"label": "16-32-48/16-32-48/1-2-3", "flops": 51, "flops_ratio": 0.51, "params": 200000, "p50_ms": 0.09,
             "speedup": 2.03, "spread": [1.8, 2.2], "rounds": 8, "meets": True, "chosen": False, "neighbour": True},
            {"label": "16-16-16/16-16-16/1-1-1", "flops": 15, "flops_ratio": 0.15, "params": 20000, "p50_ms": 0.04,
             "speedup": 4.9, "spread": [4.5, 5.1], "rounds": 3, "meets": True, "chosen": False, "neighbour": False}]}


def test_the_headline_states_the_latency_target_and_whether_the_bench_met_it(reported):
    _, data = reported
    headline = markdown(_with_target(data), "plot.png").split("## Headline", 1)[1].split("\n## ", 1)[0]
    assert ("**Latency target 2x the kept branch in onnxruntime fp32 at batch 1: met: the bench measured 2.05x "
            "(0.098 ms) in pruned_onnx_fp32 against branch_onnx_fp32; the planner measured 2.10x (0.100 ms) for "
            "plan 16-32-64/16-32-64/1-1-3, -2.4% off.**") in headline
    assert "MISSED" not in headline and "was measured on" not in headline
    missed = markdown(_with_target(data, achieved_speedup=1.6, achieved_ms=0.125, planner_vs_bench=-0.238,
                                   met=False, why="planner_and_bench_disagree", reason="x"), "plot.png")
    assert ("2x the kept branch in onnxruntime fp32 at batch 1: MISSED: the bench measured 1.60x (0.125 ms) in "
            "pruned_onnx_fp32 against branch_onnx_fp32, where the planner measured 2.10x") in missed
    assert "the planner and the bench disagree (-24%)" in missed
    guarded = markdown(_with_target(data, achieved_speedup=1.0, achieved_ms=0.2, planner_vs_bench=None, met=False,
                                    why="accuracy_guard", reason="the accuracy guard kept the pruned network back "
                                                                 "(it loses 0.74 points)"), "plot.png")
    assert ("MISSED: the accuracy guard kept the pruned network back (it loses 0.74 points); the kept branch ships at "
            "1.00x (the planner measured 2.10x") in guarded
    unmeasured = markdown(_with_target(data, achieved_speedup=None, achieved_ms=None, planner_vs_bench=None,
                                       met=None, why="not_measured", reason="pruned_openvino_bf16 skipped: no bf16"),
                          "plot.png")
    assert "not measured by the bench (pruned_openvino_bf16 skipped: no bf16)" in unmeasured
    assert "**Latency target" not in markdown(BenchFile.model_validate(data), "plot.png")


def test_the_report_says_when_the_plan_was_made_on_another_cpu(reported):
    _, data = reported
    other = markdown(_with_target(data, planned_on="AMD EPYC 9000", planned_threads=2, same_host=False), "plot.png")
    assert (f"The plan was measured on AMD EPYC 9000 with 2 thread(s) and benched on {data['environment']['cpu']} "
            "with 1: a plan's speed-up holds on the host it was planned on; plan again there") in other


def test_the_report_shows_the_chosen_plan_among_its_neighbours(reported):
    _, data = reported
    text = markdown(_with_target(data), "plot.png", plan=PLAN)
    section = text.split("## Latency plan (compress/plan.json)", 1)[1].split("\n## ", 1)[0]
    assert "Planned for 2x in onnxruntime fp32 at batch 1, 2 thread(s), on AMD EPYC (channel multiple 16): 5 plans " \
           "timed in 12 s" in section
    table = [line for line in section.splitlines() if line.startswith("| ")]
    assert table[0].startswith("| plan (widths / inner widths / blocks) |")
    assert [line.split(" | ")[0:2] for line in table[1:]] == [
        ["| 16-32-64/16-32-64/3-3-3", "kept branch"], ["| 16-32-64/16-32-64/1-2-3", "neighbour"],
        ["| 16-32-64/16-32-64/1-1-3", "**chosen**"], ["| 16-32-48/16-32-48/1-2-3", "neighbour"]]
    assert "| 0.530x | 225,000 | 0.095 | 2.10x (1.90-2.30) | 18 | yes |" in table[3]
    assert "16-16-16/16-16-16/1-1-1" not in section  # neither chosen nor a neighbour
    pinned = markdown(_with_target(data), "plot.png", plan={"chosen": PLAN["chosen"], "pinned_from": "p.json"})
    assert "A plan given without its measurements. Pinned from `p.json`." in pinned
    assert "## Latency plan" not in markdown(_with_target(data), "plot.png")
