"""Your own images end to end: the recipe (configs/imagefolder_resnet18.yaml, made tiny) on a generated
ImageFolder of mixed modes and uneven classes through every stage, `predict`, `compare` and
`compare --compress`, with every split answering only what the Split interface declares."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.config import load_config
from pipeline.deploy.predict import Predictor
from pipeline.rundir import RunDir
from pipeline.runner import run_stages
from pipeline.training.data import load_datasets
from tests.conftest import FAST_BENCH, make_ctx
from tests.own_images import CLASSES, COUNTS, interface_only, write_own_images

ROOT = Path(__file__).parent.parent
RECIPE = ROOT / "configs/imagefolder_resnet18.yaml"
runner = CliRunner()

# the recipe made tiny: a 4-channel ResNet-20 (resnet18 runs in its own test below), 16 px, one epoch
TINY = ["data.image_size=16", "data.num_workers=0", "data.val_size=6", "model.arch=resnet20", "model.width=4",
        "train.epochs=1", "train.batch_size=8", "train.eval_batch_size=64", "train.device=cpu",
        "compress.epochs=1", "compress.batch_size=8", "compress.channel_multiple=2", "compress.max_accuracy_drop=100",
        "export.max_accuracy_drop=100", "export.calibration_size=16", "export.check_size=8", "export.ensemble=false",
        "export.calibration_methods=[minmax]", "bench.served=false",
        *(f"bench.{key}={value}" for key, value in FAST_BENCH.items())]


def tiny(root: Path, images: Path, *more: str) -> list[str]:
    return [*TINY, f"data.root={images}", f"output_root={root / 'runs'}", *more]


@pytest.fixture(scope="module")
def own_run(tmp_path_factory):
    """The tiny recipe on the generated folder, every stage (shared: copy it to change it)."""
    root = tmp_path_factory.mktemp("own")
    images = write_own_images(root / "images")
    cfg = load_config(RECIPE, tiny(root, images))
    run = RunDir(cfg.run_dir)
    with interface_only():
        results = run_stages(cfg, run, make_ctx(cfg, run))
    return cfg, run, results, root, images


def test_the_recipe_validates_and_says_why(own_run):
    cfg = load_config(RECIPE)
    assert (cfg.data.dataset, cfg.model.arch, cfg.train.schedule) == ("imagefolder", "resnet18", "cosine")
    assert cfg.data.val_size < 1000 and cfg.compress.enabled and "int8_cpu" in cfg.export.precisions
    text = RECIPE.read_text()
    assert "# pretrained:" in text and "argued" in text.lower()
    settings = [line for line in text.splitlines() if ":" in line.split("#")[0] and not line.startswith("#")]
    sections = {"data:", "model:", "loss:", "train:", "compress:", "export:", "engine:", "bench:"}
    bare = [line for line in settings if "#" not in line and line.strip() not in sections
            and not line.startswith(("name:", "seed:"))]
    assert not bare, f"recipe settings without a reason: {bare}"


def test_every_stage_runs_on_folder_data(own_run):
    cfg, run, results, _, _ = own_run
    engine = results.pop("engine")  # skipped without TensorRT and a GPU
    assert engine in ("done", "skipped") and set(results.values()) == {"done"}, results
    data = load_datasets(cfg.data)
    assert data.class_names == list(CLASSES) and len(data.test) == sum(COUNTS["test"])
    assert run.stage("compress").summary["deployed"]
    assert run.stage("export").summary["deployed"] == ["fp32", "int8_cpu"]
    assert run.stage("export").summary["pruned_deployed"] == ["fp32", "int8_cpu"]
    rows = {r["name"]: r for r in json.loads(run.output("bench", "bench").read_text())["rows"]}
    for name in ("branch_eager", "pruned_eager", "branch_onnx_fp32", "branch_onnx_int8_cpu", "pruned_onnx_int8_cpu"):
        assert rows[name]["status"] == "ok", rows[name]
    assert not [row for row in rows.values() if row["status"] == "failed"]  # OpenVINO's guard and rows among them
    assert (run.root / "report" / "report.md").is_file()


def test_predict_on_a_folder_and_a_glob_gives_the_bench_answer_into_a_csv(own_run, tmp_path):
    cfg, run, _, _, images = own_run
    output = tmp_path / "preds.csv"
    args = ["predict", str(run.root), str(images / "test" / "apple"), str(images / "test" / "[bc]*" / "*.*"),
            "--model", "fp32", "--top", "2", "--output", str(output), "--batch-size", "4"]
    result = runner.invoke(app, args, env={"COLUMNS": "300"})
    assert result.exit_code == 0, result.output
    with output.open() as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["path", "label_1", "probability_1", "label_2", "probability_2"]
    paths = sorted((images / "test").rglob("*.*"))
    assert sorted(Path(r[0]) for r in rows[1:]) == paths  # every test image once: the folder's and the glob's
    assert all(r[1] in CLASSES and 1 >= float(r[2]) >= float(r[4]) >= 0 for r in rows[1:])
    # the same preprocessing as training: the CSV's top-1 on the test folder is the bench's accuracy
    correct = [Path(r[0]).parent.name == r[1] for r in rows[1:]]
    bench = {r["name"]: r for r in json.loads(run.output("bench", "bench").read_text())["rows"]}
    assert 100.0 * np.mean(correct) == pytest.approx(bench["branch_onnx_fp32"]["accuracy"], abs=1e-9)
    assert "16x16 RGB (converted, resized, centre-cropped)" in result.output  # the grayscale ones, for one
    assert "rotated (EXIF)" in result.output


def test_every_mode_loads_the_same_way_in_training_bench_and_predict(own_run):
    """The test split as training's evaluation and the bench read it (FolderSet) and as predict reads
    the same files: equal tensors, for every mode of the folder."""
    cfg, run, _, _, _ = own_run
    test = load_datasets(cfg.data).test
    predictor = Predictor.load(run.root, "fp32")
    files = [Path(path) for path, _ in test.base.samples]
    from_predict = torch.stack([predictor.preprocessing.tensor(predictor.pixels(f)) for f in files])
    assert torch.equal(test.inputs(range(len(test))), from_predict)
    assert torch.equal(next(test.batches(len(test)))[0], from_predict)


@pytest.mark.slow
def test_compare_and_compare_compress_run_on_folder_data(own_run):
    _, _, _, root, images = own_run
    sets = [arg for override in tiny(root, images, "name=own") for arg in ("--set", override)]
    with interface_only():
        result = runner.invoke(app, ["compare", str(RECIPE), "--seeds", "0", "--compress", *sets],
                               env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    compared = root / "runs" / "own-compare"
    assert (compared / "compare.md").is_file() and (compared / "compress.md").is_file()
    table = json.loads((compared / "compress.json").read_text())
    assert {r["variant"] for r in table["runs"]} == {"one-ensemble", "one-labels", "one-branch", "vanilla-labels",
                                                     "vanilla-branch"}


@pytest.mark.slow
def test_resnet18_at_32_pixels_trains_exports_and_predicts(own_run):
    """The recipe's own backbone at 32 px (layer4 at 1x1), one epoch, through export (fp32) and predict. Its
    cost is its ~30M parameters (weight updates, checkpoints, ONNX files), not pixels: a smaller image would
    save little, and the full chain runs on a 4-channel ResNet-20 above."""
    _, _, _, root, images = own_run
    # the parity check's defaults (atol + rtol x the largest logit) hold for a ResNet-18's large logits
    cfg = load_config(RECIPE, tiny(root, images, "name=own18", "model.arch=resnet18", "data.image_size=32",
                                   "compress.enabled=false", "export.precisions=[fp32]",
                                   "bench.enabled=false"))
    run = RunDir(cfg.run_dir)
    with interface_only():
        results = run_stages(cfg, run, make_ctx(cfg, run), until="export")
    assert results["export"] == "done"
    result = runner.invoke(app, ["predict", str(run.root), str(images / "test")], env={"COLUMNS": "300"})
    assert result.exit_code == 0 and result.output.count("-> 32x32 RGB") == sum(COUNTS["test"]), result.output
