"""Stage records are typed, and a stage reads only the stages its row of the runner's table declares (those
are the stages its fingerprint covers): an undeclared read is refused, and no stage reaches past its context."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from pipeline.errors import UndeclaredRead
from pipeline.rundir import RunDir, StageRecord
from pipeline.runner import STAGES, stage_def
from tests.conftest import make_ctx

ROOT = Path(__file__).parent.parent


def test_a_stage_reading_a_stage_it_does_not_declare_is_refused(trained_run):
    cfg, run = trained_run
    ctx = make_ctx(cfg, run).for_stage("select", stage_def("select").reads)
    assert ctx.record("train").done and ctx.summary("train")["method"] == "one"
    for read in (lambda: ctx.record("strip"), lambda: ctx.summary("bench"), lambda: ctx.input("export", "onnx_fp32")):
        with pytest.raises(UndeclaredRead, match="stage 'select' read stage '(strip|bench|export)', which its row"):
            read()
    assert make_ctx(cfg, run).record("strip") is None  # a context of no stage (the CLI's) reads any: not run yet


def test_no_stage_reaches_past_its_context():
    """stages/ read the manifest only through ctx.record/input/summary, which check the declared reads (bench
    reads another run's manifest for bench.baseline: that is not a stage of this run)."""
    direct = re.compile(r"\b(ctx\.)?run\.(stage|output|manifest)\(")
    found = [f"{path.name}:{number}: {line.strip()}" for path in sorted((ROOT / "stages").glob("*.py"))
             for number, line in enumerate(path.read_text().splitlines(), 1)
             if direct.search(line) and "another run's" not in line]
    assert not found, found


def test_every_declared_read_is_an_earlier_stage():
    order = [s.name for s in STAGES]
    for stage in STAGES:
        assert all(order.index(r) < order.index(stage.name) for r in stage.reads), stage


def test_records_are_typed_and_older_manifests_load(tmp_path):
    run = RunDir(tmp_path / "run")
    run.root.mkdir()
    run.manifest_path.write_text(json.dumps({"stages": {
        "train": {"status": "done", "fingerprint": "f", "outputs": {}, "summary": {"method": "one"},
                  "written_by": "an older one-pipeline"},  # a key this version does not know: kept
        "engine": {"status": "skipped", "reason": "TensorRT is not installed", "outputs": {}}}}))
    train, engine = run.stage("train"), run.stage("engine")
    assert isinstance(train, StageRecord) and train.done and train.summary == {"method": "one"}
    assert train.wall_s is None and train.model_extra == {"written_by": "an older one-pipeline"}
    assert not engine.done and engine.reason == "TensorRT is not installed" and engine.summary == {}
    assert run.stage("bench") is None
    with pytest.raises(Exception):
        train.status = "failed"  # frozen: reading a record never changes the manifest
