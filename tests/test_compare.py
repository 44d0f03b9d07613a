"""`compare`: vanilla and ONE on the same seeds through the runner, summarised from the runs' own records."""

import json
import math
import re
import statistics
from pathlib import Path

import pytest
import yaml
from rich.console import Console
from scipy import stats
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.compare import gain, methods, paired, parse_seeds, welch
from pipeline.compare.report import curves
from pipeline.errors import ConfigError, UsageError
from pipeline.plots import training_curves_figure
from pipeline.rundir import RunDir
from tests.conftest import COMPARE_RUN_NAMES, COMPARE_SEEDS, COMPARE_VARIANT, tiny_dict

SEEDS = COMPARE_SEEDS
VARIANT = COMPARE_VARIANT
RUN_NAMES = COMPARE_RUN_NAMES


@pytest.fixture
def compared(compared_tiny):
    """The session's compare of the tiny config (tests/conftest.py), interrupted once and resumed."""
    return compared_tiny


def test_an_interrupted_compare_resumes_and_reuses_finished_runs(compared):
    _, result, before, log = compared
    assert sorted(p.name for p in result.root.iterdir() if p.is_dir()) == sorted(RUN_NAMES)
    for name, train in before.items():
        assert train.status == "done"
        assert RunDir(result.root / name).stage("train") == train  # not retrained: the same record
    assert "2 of 6 runs done" in log and "min left" in log  # the ETA comes from the finished runs


def test_the_table_comes_from_the_runs_recorded_accuracies(compared):
    _, result, _, _ = compared
    summary = json.loads(result.summary.read_text())
    runs = {name: RunDir(result.root / name) for name in RUN_NAMES}

    def recorded(name):
        run = runs[name]
        test = run.stage("train").summary["test"]
        return test, run.stage("select").summary["branch"]

    rows = {(r["method"], r["field"]): r for r in summary["rows"]}
    for seed in SEEDS:
        vanilla, _ = recorded(f"vanilla-seed{seed}")
        one, kept = recorded(f"one-seed{seed}")
        assert rows["vanilla", "kept"]["per_seed"][str(seed)] == vanilla["branches"][0]
        assert rows["one", "kept"]["per_seed"][str(seed)] == one["branches"][kept]
        assert rows["one", "best"]["per_seed"][str(seed)] == max(one["branches"])
        assert rows["one", "worst"]["per_seed"][str(seed)] == min(one["branches"])
        assert rows["one", "teacher"]["per_seed"][str(seed)] == one["teacher"]
        variant, _ = recorded(f"one-model.branches-2-seed{seed}")
        assert len(variant["branches"]) == 2
    kept = list(rows["one", "kept"]["per_seed"].values())
    alone = list(rows["vanilla", "kept"]["per_seed"].values())
    assert rows["one", "kept"]["mean"] == pytest.approx(statistics.mean(kept))
    assert rows["one", "kept"]["std"] == pytest.approx(statistics.stdev(kept))
    gain = summary["gains"][0]
    assert gain["method"] == "one" and gain["diff"] == pytest.approx(statistics.mean(kept) - statistics.mean(alone))
    # the paired figures are scipy's on the same seeds' recorded accuracies, and they give the verdict
    assert gain["test"] == "paired t-test" and gain["paired"]["per_seed"] == {
        str(s): rows["one", "kept"]["per_seed"][str(s)] - rows["vanilla", "kept"]["per_seed"][str(s)] for s in SEEDS}
    expected = stats.ttest_rel(kept, alone)
    if statistics.pstdev(gain["paired"]["per_seed"].values()):
        ci = expected.confidence_interval(0.95)
        assert (gain["p"], gain["paired"]["p"]) == pytest.approx((expected.pvalue, expected.pvalue))
        assert gain["ci95"] == gain["paired"]["ci95"] == pytest.approx([ci.low, ci.high])
        assert "paired t-test p = " in gain["verdict"]
    else:  # the same difference on both seeds: no spread for a t-test to measure
        assert gain["p"] is None and "on every seed" in gain["verdict"]
    assert gain["welch"]["p"] == pytest.approx(stats.ttest_ind(kept, alone, equal_var=False).pvalue, nan_ok=True)
    assert [g["method"] for g in summary["gains"]] == ["one", "one-model.branches-2"]
    markdown = result.markdown.read_text()
    assert f"**The kept ONE branch is {gain['verdict']}.**" in markdown
    assert "| ONE, model.branches=2: kept branch (chosen on validation) |" in markdown
    assert result.plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_training_curves_per_method_and_seed(compared):
    _, result, _, _ = compared
    summary = json.loads(result.summary.read_text())
    assert result.curves.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"![training curves per method and seed]({result.curves.name})" in result.markdown.read_text()
    loss_ax, lr_ax, val_ax = training_curves_figure(curves(summary), "t").axes
    assert len(loss_ax.lines) == len(lr_ax.lines) == len(val_ax.lines) == len(RUN_NAMES)
    drawn = {line.get_label(): line.get_ydata().tolist() for line in val_ax.lines}
    for seed in SEEDS:
        run = RunDir(result.root / f"one-seed{seed}")
        history = [json.loads(line) for line in run.output("train", "metrics").read_text().splitlines()]
        kept = run.stage("select").summary["branch"]
        assert drawn[f"ONE, seed {seed}"] == [r["val"]["branches"][kept] for r in history]
        assert len(drawn[f"vanilla, seed {seed}"]) == len(history)


def test_deploy_cost_of_the_kept_branch_matches_the_same_network_trained_alone(compared):
    _, result, _, _ = compared
    summary = json.loads(result.summary.read_text())
    cost = {c["method"]: c for c in summary["cost"]}
    assert cost["one"]["params"] == cost["vanilla"]["params"] == cost["one-model.branches-2"]["params"]
    assert cost["one"]["flops"] == cost["vanilla"]["flops"] > 0
    assert all(c["p50_ms"] > 0 for c in cost.values())
    training = {t["method"]: t for t in summary["training"]}
    assert training["one"]["train_params"] > training["one-model.branches-2"]["train_params"] > \
        training["vanilla"]["train_params"]  # the full ONE model trains more than the deployed network


def test_welch_against_the_textbook_formula():
    treated, control = [1.0, 2.0, 3.0], [4.0, 5.0, 7.0]
    result = welch(treated, control)
    va, vb = statistics.variance(treated) / 3, statistics.variance(control) / 3
    t = (2.0 - 16 / 3) / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va ** 2 / 2 + vb ** 2 / 2)
    assert result["diff"] == pytest.approx(2.0 - 16 / 3)
    assert result["p"] == pytest.approx(2 * stats.t.sf(abs(t), df))
    assert result["p"] < 0.05 and result["verdict"].startswith("worse")
    low, high = result["ci95"]
    half = stats.t.ppf(0.975, df) * math.sqrt(va + vb)
    assert (low, high) == pytest.approx((result["diff"] - half, result["diff"] + half))


def test_welch_verdicts():
    assert welch([92.0, 92.2, 92.1], [90.0, 90.1, 90.2])["verdict"].startswith("better")
    assert welch([90.1, 90.5, 89.9], [90.0, 90.4, 90.2])["verdict"].startswith("not distinguishable at this budget")
    single = welch([90.5], [90.0])
    assert single["p"] is None and "--seeds" in single["verdict"]


def test_paired_against_the_textbook_formula():
    treated, control = {"0": 90.5, "1": 92.6, "2": 94.4, "7": 80.0}, {"0": 90.0, "1": 92.0, "2": 94.0, "5": 99.0}
    result = paired(treated, control)  # seeds 7 and 5 have no partner: left out
    diffs = [0.5, 0.6, 0.4]
    mean, sd = statistics.mean(diffs), statistics.stdev(diffs)
    t = mean / (sd / math.sqrt(3))
    assert result["per_seed"] == pytest.approx({"0": 0.5, "1": 0.6, "2": 0.4}) and result["n"] == 3
    assert (result["diff"], result["sd"]) == pytest.approx((mean, sd))
    assert result["p"] == pytest.approx(2 * stats.t.sf(t, 2))
    half = stats.t.ppf(0.975, 2) * sd / math.sqrt(3)
    assert result["ci95"] == pytest.approx([mean - half, mean + half])
    assert result["verdict"].startswith("better")


def test_the_verdict_is_paired_when_seeds_pair_up():
    # a steady +0.5 on seeds whose own spread is 4 points: clear when paired, lost in Welch's groups
    treated, control = {"0": 90.5, "1": 92.6, "2": 94.4}, {"0": 90.0, "1": 92.0, "2": 94.0}
    result = gain(treated, control)
    assert result["test"] == "paired t-test" and result["verdict"] == result["paired"]["verdict"]
    assert result["verdict"].startswith("better") and result["welch"]["verdict"].startswith("not distinguishable")
    unpaired = gain({"0": 90.5, "1": 92.6}, {"2": 90.0, "3": 92.0})
    assert unpaired["test"] == "Welch's t-test" and unpaired["paired"]["p"] is None
    assert unpaired["verdict"] == unpaired["welch"]["verdict"]
    steady = paired({"0": 91.0, "1": 92.0}, {"0": 90.0, "1": 91.0})
    assert steady["p"] is None and "on every seed" in steady["verdict"]


def test_one_paired_test_with_its_edge_cases_serves_compare_and_compress():
    """compare's gain and `compare --compress`'s pairs are the same paired t-test: no seed in common, one
    seed, or the same difference on every seed give no p-value and no interval (never an error or a
    certainty); with a spread, both report scipy's ttest_rel."""
    from pipeline.compare.compress import paired as pruned_paired

    def records(treated: dict, control: dict) -> list[dict]:
        return [{"variant": variant, "seed": int(seed), "test": value}
                for variant, values in (("a", treated), ("b", control)) for seed, value in values.items()]

    cases = [({"0": 91.0}, {"1": 90.0}, 0, None), ({"0": 91.0}, {"0": 90.0}, 1, 1.0),
             ({"0": 91.0, "1": 92.5}, {"0": 90.0, "1": 91.5}, 2, 1.0)]
    for treated, control, n, diff in cases:
        figures, pruned = paired(treated, control), pruned_paired(records(treated, control), "a", "b")
        assert (figures["n"], figures["p"], figures["ci95"]) == (n, None, None) and figures["verdict"]
        assert (pruned["n"], pruned["p"]) == (n, None) and figures["diff"] == pruned["diff"] == diff
        assert "no significance figure" in pruned["text"] or "no seed run by both" in pruned["text"]
    assert "on every seed" in paired(*cases[2][:2])["verdict"] and "--seeds" in paired(*cases[1][:2])["verdict"]
    treated, control = {"0": 90.5, "1": 92.6, "2": 94.4}, {"0": 90.0, "1": 92.0, "2": 94.0}
    expected = stats.ttest_rel(list(treated.values()), list(control.values())).pvalue
    assert paired(treated, control)["p"] == pytest.approx(expected)
    assert pruned_paired(records(treated, control), "a", "b")["p"] == pytest.approx(expected)


def test_methods_and_seeds_from_the_command_line():
    assert [m.key for m in methods(["branches=4", "loss.temperature=2"])] == [
        "vanilla", "one", "one-model.branches-4", "one-loss.temperature-2"]
    assert parse_seeds("0, 1,2") == [0, 1, 2]
    for bad, error, match in [(["seed=3"], UsageError, "compare sets seed itself"),
                              (["branches"], UsageError, "expected FIELD=VALUE"),
                              (["threads=2"], ConfigError, "several sections"),
                              (["brnches=2"], ConfigError, "did you mean 'branches'"),
                              (["branches=4", "model.branches=4"], UsageError, "given twice")]:
        with pytest.raises(error, match=match):
            methods(bad)
    for bad in ("0,0", "a", "-1", ""):
        with pytest.raises(UsageError, match="--seeds"):
            parse_seeds(bad)


def test_compare_help_names_shipped_regime_configs():
    shown = CliRunner().invoke(app, ["compare", "--help"], terminal_width=200).output
    named = set(re.findall(r"configs/[A-Za-z0-9_.-]+\.yaml", shown))
    assert {"configs/edge_small_data_long.yaml", "configs/edge_noisy_labels.yaml"} <= named
    assert all((Path(__file__).parent.parent / path).is_file() for path in named)


def test_cli_reuses_the_runs_and_rejects_bad_input_in_one_line(compared):
    config, result, _, _ = compared
    trained = {name: RunDir(result.root / name).stage("train") for name in RUN_NAMES}
    ok = CliRunner().invoke(app, ["compare", str(config), "--seeds", "0,1", "--variant", VARIANT])
    assert ok.exit_code == 0, ok.output
    assert "compare: " in ok.output and "compare.md" in ok.output
    assert {name: RunDir(result.root / name).stage("train") for name in RUN_NAMES} == trained
    bad = CliRunner().invoke(app, ["compare", str(config), "--seeds", "1,1"])
    assert bad.exit_code == 2 and bad.output.count("\n") == 1 and "distinct seeds" in bad.output
    assert "Traceback" not in bad.output


def _table(markdown: str, heading: str) -> list[list[str]]:
    """The cells of the first table under `## heading` (header and separator left out)."""
    body = markdown.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    lines = [line for line in body.splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:]]


def test_compare_md_tables_hold_the_summarys_figures(compared):
    """Every number in compare.md's tables, read back, is the figure compare.json holds (to the printed
    precision): a sign, a column or a row out of place fails."""
    _, result, _, _ = compared
    summary, markdown = json.loads(result.summary.read_text()), result.markdown.read_text()
    near = lambda value: pytest.approx(value, abs=0.0051)  # noqa: E731 - printed with 2 decimals

    accuracy = _table(markdown, "Test top-1 (%)")
    assert [cells[0] for cells in accuracy] == [row["label"] for row in summary["rows"]]
    for cells, row in zip(accuracy, summary["rows"]):
        mean, _, std = cells[1].partition(" ± ")
        assert (float(mean), float(std)) == (near(row["mean"]), near(row["std"]))
        assert [float(c) for c in cells[2:]] == [near(row["per_seed"][str(s)]) for s in SEEDS]

    gains = _table(markdown, "Gain of the kept branch over the network trained alone")
    assert [cells[0] for cells in gains] == [figures["label"] for figures in summary["gains"]]
    for cells, figures in zip(gains, summary["gains"]):
        assert float(cells[1]) == near(figures["diff"])
        assert [float(c) for c in cells[2:2 + len(SEEDS)]] == [near(figures["paired"]["per_seed"][str(s)])
                                                               for s in SEEDS]
        for test, (interval, p) in zip(("paired", "welch"), (cells[-5:-3], cells[-3:-1])):
            low, high = (float(x) for x in interval.split(" to "))
            assert (low, high) == (near(figures[test]["ci95"][0]), near(figures[test]["ci95"][1]))
            assert float(p) == pytest.approx(figures[test]["p"], rel=1e-2)
        assert cells[-1] == figures["verdict"].split(":")[0]

    cost = {c["method"]: c for c in summary["cost"]}
    costs = _table(markdown, "Cost")
    assert [cells[0] for cells in costs] == [t["label"] for t in summary["training"]]
    for cells, train in zip(costs, summary["training"]):
        deployed = cost[train["method"]]
        assert float(cells[1]) == pytest.approx(train["train_s"], abs=0.051)
        assert float(cells[2]) == pytest.approx(train["images_per_s"], abs=0.51)
        assert [int(c.replace(",", "")) for c in cells[3:5]] == [train["train_params"], deployed["params"]]
        assert float(cells[5]) == near(deployed["flops"] / 1e6) and float(cells[6]) == pytest.approx(
            deployed["p50_ms"], abs=0.00051)


def test_the_map_puts_each_compare_s_paired_gain_in_one_table_and_one_plot(compared, tmp_path):
    _, result, _, _ = compared
    summary = json.loads(result.summary.read_text())
    noisy = {**summary, "name": "tiny-noisy", "recipe": {**summary["recipe"], "train_size": 100, "label_noise": 0.4}}
    noisy_file = tmp_path / "noisy.json"
    noisy_file.write_text(json.dumps(noisy))
    plot = tmp_path / "map.png"
    drawn = CliRunner().invoke(app, ["gain-map", str(result.root), str(noisy_file), "--plot", str(plot)])
    assert drawn.exit_code == 0, drawn.output
    rows = [line for line in drawn.output.splitlines() if line.startswith("| `")]
    gain = summary["gains"][0]
    interval = f"({gain['ci95'][0]:+.2f} to {gain['ci95'][1]:+.2f})" if gain["ci95"] else ""
    assert [row.split(" | ")[0] for row in rows] == ["| `tiny`", "| `tiny-noisy`"]
    assert all(f"| {gain['diff']:+.2f} {interval}".rstrip() in row for row in rows)
    assert "100 images, 3 epochs, 40% noisy labels | 300 |" in rows[1]
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    old = tmp_path / "old.json"
    old.write_text(json.dumps({**summary, "compare_version": 1}))
    refused = CliRunner().invoke(app, ["gain-map", str(old), "--plot", str(tmp_path / "old.png")])
    assert refused.exit_code == 1 and refused.output.count("\n") == 1 and "Traceback" not in refused.output
    assert "predates the paired statistics" in refused.output and not (tmp_path / "old.png").exists()


def test_the_map_draws_the_gain_against_training_set_size_for_compares_of_the_same_images_seen(compared, tmp_path):
    from pipeline.compare.gain_map import plot, size_sweep

    summary = json.loads(compared[1].summary.read_text())

    def recipe(name: str, train_size: int | None, epochs: int, noise: float | None = None) -> dict:
        return {**summary, "name": name,
                "recipe": {**summary["recipe"], "train_size": train_size, "epochs": epochs, "label_noise": noise}}

    small, mid, large = recipe("2500", 2500, 120), recipe("5000", 5000, 60), recipe("10000", 10000, 30)
    others = [recipe("all", None, 2), recipe("noisy", 5000, 60, 0.4), recipe("short", 5000, 15)]
    assert [s["name"] for s in size_sweep([mid, *others, large, small])] == ["2500", "5000", "10000"]
    assert size_sweep([mid, *others]) == []  # no two sizes for the same images seen and noise

    def width(path: Path) -> int:  # of a PNG, from its IHDR chunk
        return int.from_bytes(path.read_bytes()[16:20], "big")

    plot([mid, *others, large, small], tmp_path / "sweep.png")
    plot([mid, *others], tmp_path / "regimes.png")
    assert width(tmp_path / "sweep.png") > width(tmp_path / "regimes.png")  # the size panel beside the regimes


@pytest.mark.slow
def test_compare_compress_plans_once_and_pins_that_plan_for_every_variant(compared, tmp_path, monkeypatch):
    """A latency target: one plan (fake timings), pinned in every run's compress, reused by a second compare."""
    import shutil

    from pipeline.compare.compress import VARIANTS, compress_compare
    from pipeline.deploy import plan_timing
    from tests.test_latency_plan import FakeClock

    _, result, _, _ = compared
    shutil.copytree(result.root, tmp_path / "runs" / "tiny-compare", ignore=shutil.ignore_patterns(".lock"))
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_dict(tmp_path / "runs")))
    overrides = ["compress.target_speedup=1.3", "compress.channel_multiple=2", "compress.plan_candidates=16",
                 "compress.epochs=0", "compress.max_accuracy_drop=100"]
    monkeypatch.setattr(plan_timing, "RuntimeClock", FakeClock)
    FakeClock.calls = 0
    compress_compare(config, overrides, [0], Console(quiet=True))
    planned = FakeClock.calls
    root = tmp_path / "runs" / "tiny-compare"
    [pinned] = root.glob("compress-plan-*.json")
    chosen = json.loads(pinned.read_text())["chosen"]
    assert planned > 0 and pinned.name == f"compress-plan-{chosen['label'].replace('/', '_')}.json"
    for key, *_ in VARIANTS:
        summary = RunDir(root / f"compress-{key}-seed0").stage("compress").summary
        assert summary["latency_plan"]["source"] == "pinned" and summary["latency_plan"]["pinned_from"] == str(pinned)
        assert (summary["stage_widths"], summary["inner_widths"], summary["stage_blocks"]) == \
            (chosen["stage_widths"], chosen["inner_widths"], chosen["stage_blocks"])
    table = json.loads((root / "compress.json").read_text())
    assert {r["plan"] for r in table["runs"]} == {chosen["label"]} and table["recipe"]["plans"] == [chosen["label"]]
    assert f"Pruned to the latency plan {chosen['label']} (planned once, pinned for every run)" in \
        (root / "compress.md").read_text()
    compress_compare(config, overrides, [0], Console(quiet=True))  # the same key: the plan is reused, not timed
    assert FakeClock.calls == planned and list(root.glob("compress-plan-*.json")) == [pinned]
