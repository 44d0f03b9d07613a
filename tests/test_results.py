"""docs/RESULTS.md and the README's key results are rendered from docs/results/ and current; a figure changed in
one place only fails here."""

import json
import re
import shutil

import pytest
from typer.testing import CliRunner

from pipeline import results
from pipeline.cli import app
from pipeline.errors import ArtifactError


def _key_block(readme: str) -> str:
    return readme.split(results.KEY_BEGIN, 1)[1].split(results.KEY_END, 1)[0]


def _figures(text: str) -> list[str]:
    return re.findall(r"[-+]?\d[\d,]*(?:\.\d+)?", text)


def test_docs_results_is_current():
    assert results.RESULTS_PATH.read_text() == results.results_markdown(), \
        "docs/RESULTS.md is stale: run `one-pipeline results --write`"


def test_the_readmes_key_results_are_current():
    readme = results.README_PATH.read_text()
    assert results.key_results_markdown() in readme, "stale key results: run `one-pipeline results --write`"


def test_a_newcomer_finds_the_key_results_quickstart_and_own_data_steps_in_the_first_100_lines():
    first = "\n".join(results.README_PATH.read_text().splitlines()[:100])
    for text in (results.KEY_END, "## Quickstart", "## Your own images", "one-pipeline predict"):
        assert text in first, f"{text!r} is not in the README's first 100 lines"


def test_every_figure_of_the_key_results_is_in_docs_results():
    measured = results.RESULTS_PATH.read_text()
    block = _key_block(results.README_PATH.read_text())
    figures = _figures(block.split("|---|---|---|", 1)[1])
    assert len(figures) > 20
    missing = [f for f in figures if f.lstrip("+-") not in measured]
    assert not missing, f"README key results not in docs/RESULTS.md: {missing}"


def test_every_decimal_figure_in_the_readme_is_in_docs_results():
    """The pitch, the quickstart's report excerpt and the rest cite only measured figures."""
    measured, readme = results.RESULTS_PATH.read_text(), results.README_PATH.read_text()
    not_ours = ("Python ", "TensorRT ", "arXiv:", "ResNet-32: ", "% -> ")  # versions, and the paper's own figures
    decimals = [m.group() for m in re.finditer(r"\d+\.\d{2,}", readme)
                if not readme[:m.start()].endswith(not_ours)]
    missing = [d for d in decimals if d not in measured]
    assert decimals and not missing, f"README figures not in docs/RESULTS.md: {missing}"


@pytest.fixture
def records(tmp_path):
    folder = tmp_path / "results"
    shutil.copytree(results.RESULTS_DIR, folder)
    return folder


def _edit(path, old, new):
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))


@pytest.mark.parametrize("file,old,new", [
    ("compare_edge.json", '"90.34 ± 0.22"', '"90.35 ± 0.22"'),
    ("compress_compare_edge.json", '"-0.66"', '"-0.67"'),
    ("gain_map.json", '"+0.84 (-0.08 to +1.75), 0.067"', '"+0.85 (-0.08 to +1.75), 0.067"'),
    ("quickstart.json", '"wall_s": 387.2', '"wall_s": 430.0'),
])
def test_a_figure_changed_in_the_records_alone_fails(records, file, old, new):
    _edit(records / file, old, new)
    assert results.key_results_markdown(records) not in results.README_PATH.read_text()
    assert results.results_markdown(records) != results.RESULTS_PATH.read_text()


def test_a_bench_figure_changed_alone_fails(records):
    bench = json.loads((records / "quickstart_bench.json").read_text())
    ship = next(r for r in bench["rows"] if r["name"] == bench["headline"]["ship"]["row"])
    ship["accuracy"] = round(ship["accuracy"] - 0.11, 2)
    (records / "quickstart_bench.json").write_text(json.dumps(bench))
    assert f"{ship['accuracy']:.2f}%" in results.key_results_markdown(records)
    assert results.key_results_markdown(records) not in results.README_PATH.read_text()


def test_a_figure_changed_in_the_readme_alone_fails():
    readme = results.README_PATH.read_text()
    edited = readme.replace("-0.63 (95% CI", "-0.53 (95% CI", 1)
    assert edited != readme and results.key_results_markdown() not in edited


def test_every_section_names_its_command_date_cpu_and_version():
    for record in results.load_records():
        text = "\n".join(results.section(record))
        assert f"Command: `{record['command']}`" in text
        assert f"Measured: {record['date']} on {record['cpu']}" in text and f"one-pipeline {record['version']}" in text
        assert ("Transcribed from an earlier record" in text) == bool(record.get("transcribed")), record["_name"]
    assert any(not r.get("transcribed") for r in results.load_records())


def test_the_quickstart_section_folds_what_was_not_measured_into_one_line():
    quickstart = next(r for r in results.load_records() if r["_name"] == "quickstart")
    tables, notes = results.tables_and_notes(quickstart)
    bench = json.loads((results.RESULTS_DIR / quickstart["bench"]).read_text())
    skipped = [row["name"] for row in bench["rows"] if row["status"] != "ok"]
    measured = [row["label"] for row in bench["rows"] if row["status"] == "ok"]
    assert [row[0].split(", PyTorch eager")[0] for row in tables[0]["rows"]] == measured
    folded = [n for n in notes if n.startswith("Not measured here")]
    assert len(folded) == 1 and all(f"`{name}`" in folded[0] for name in skipped)


def test_a_record_without_its_date_is_refused(records):
    data = json.loads((records / "compare_edge.json").read_text())
    del data["date"]
    (records / "compare_edge.json").write_text(json.dumps(data))
    with pytest.raises(ArtifactError, match="compare_edge.json: a result record needs date"):
        results.load_records(records)


def test_the_command_prints_docs_results_and_refuses_a_readme_without_markers():
    printed = CliRunner().invoke(app, ["results"])
    assert printed.exit_code == 0 and printed.output == results.results_markdown()
    with pytest.raises(ArtifactError, match="key-results markers"):
        results.readme_with_key_results("# a README without the table\n")
