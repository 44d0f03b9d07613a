"""`one-pipeline predict` on the tiny run's exported models: the bench's answer for the same test images
written out as PNG files, the shipped form by default, and one line naming the fix for each bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.deploy.predict import Predictor, softmax
from pipeline.deploy.runtime import ort_session, run_split
from pipeline.runner import execute, stage_def
from pipeline.training.data import load_datasets
from pipeline.training.preprocess import Preprocessing, normalise
from tests.conftest import make_ctx
from tests.test_bench import benched_copy

runner = CliRunner()


@pytest.fixture(scope="module")
def benched(exported_run, tmp_path_factory):
    cfg, run = benched_copy(exported_run, tmp_path_factory.mktemp("predict"))
    assert execute(cfg, stage_def("bench"), run, make_ctx(cfg, run)) == "done"
    return cfg, run, json.loads(run.output("bench", "bench").read_text())


def write_pngs(images: torch.Tensor, folder) -> list:
    """uint8 (N, C, H, W) -> one lossless PNG per image (mode L for one channel, RGB for three)."""
    folder.mkdir(exist_ok=True)
    paths = []
    for index, image in enumerate(images):
        array = image.permute(1, 2, 0).numpy()
        path = folder / f"test_{index:03d}.png"
        Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array).save(path)
        paths.append(path)
    return paths


def test_predict_gives_the_bench_answer_on_the_test_images_as_pngs(benched, tmp_path):
    cfg, run, bench = benched
    test = load_datasets(cfg.data).test
    paths = write_pngs(test.images, tmp_path / "png")
    predictor = Predictor.load(run.root, "fp32")
    predictions = predictor.predict(paths, top=len(predictor.class_names))
    names = predictor.class_names
    labels = [names.index(p.top[0][0]) for p in predictions]
    row = next(r for r in bench["rows"] if r["name"] == "branch_onnx_fp32")
    assert 100.0 * float(np.mean(np.array(labels) == test.labels.numpy())) == pytest.approx(row["accuracy"], abs=1e-9)
    # the same probabilities as the bench's path (ImageSet batches through ONNX Runtime), image by image
    reference = softmax(run_split(ort_session(predictor.path, ["CPUExecutionProvider"]), test, len(test)))
    got = np.array([[dict(p.top)[name] for name in names] for p in predictions])
    np.testing.assert_allclose(got, reference, rtol=1e-6, atol=1e-9)


def test_one_normalisation_for_training_bench_and_predict(benched, tmp_path):
    cfg, run, _ = benched
    test = load_datasets(cfg.data).test
    predictor = Predictor.load(run.root, "fp32")
    assert predictor.preprocessing == Preprocessing("synthetic", *test.sample_shape, test.mean, test.std)
    pixels = predictor.pixels(write_pngs(test.images[:3], tmp_path / "png")[2])
    assert torch.equal(pixels, test.images[2])  # the PNG round trip is lossless
    assert torch.equal(predictor.preprocessing.tensor(pixels), test.normalise(test.images[2:3])[0])
    assert torch.equal(normalise(test.images[2:3], test.mean, test.std), next(test.batches(3))[0][2:3])


def test_cli_prints_the_shipped_form_and_top_k_with_class_names(benched, tmp_path):
    cfg, run, bench = benched
    test = load_datasets(cfg.data).test
    paths = write_pngs(test.images[:2], tmp_path / "png")
    result = runner.invoke(app, ["predict", str(run.root), *map(str, paths), "--top", "2"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    ship = next(r for r in bench["rows"] if r["name"] == bench["headline"]["ship"]["row"])
    assert f"({ship['precision']}: the form the bench picked to ship ({ship['name']}))" in result.output
    predictor = Predictor.load(run.root, ship["precision"])
    for path, prediction in zip(paths, predictor.predict(paths, top=2)):
        block = result.output.split(str(path), 1)[1].splitlines()[1:3]
        assert [line.split()[0] for line in block] == [name for name, _ in prediction.top]
        assert all(name.startswith("synthetic-") for name, _ in prediction.top)


def test_each_bad_input_gets_one_line_naming_the_fix(benched, trained_run, tmp_path):
    cfg, run, _ = benched
    good = write_pngs(load_datasets(cfg.data).test.images[:1], tmp_path / "png")[0]
    not_image = tmp_path / "notes.png"
    not_image.write_text("not an image")
    small = tmp_path / "small.png"
    Image.new("RGB", (8, 8)).save(small)
    grey = tmp_path / "grey.png"
    Image.new("L", (16, 16)).save(grey)
    trained = trained_run[1]  # trained only: nothing exported
    cases = [
        ([str(run.root), str(not_image)], "is not an image PIL can read"),
        ([str(run.root), str(tmp_path / "missing.png")], "no such file; pass the path of a PNG or JPEG image"),
        ([str(run.root), str(small)], "is 8x8 3-channel; the model takes 16x16 RGB images: resize it to 16x16"),
        ([str(run.root), str(grey)], "is 16x16 1-channel; the model takes 16x16 RGB images: convert it to RGB"),
        ([str(run.root), str(good), "--model", "fp64"], "--model fp64: "),
        ([str(trained.root), str(good)], "has no exported model; export it first: one-pipeline export"),
        ([str(tmp_path), str(good)], "is not a run directory (one holds a manifest.json)"),
        ([str(run.manifest_path), str(good)], f"pass the folder a run wrote, e.g. {run.root}"),
    ]
    for args, fragment in cases:
        result = runner.invoke(app, ["predict", *args], env={"COLUMNS": "500"})
        assert result.exit_code != 0 and fragment in result.output, (args, result.output)
        assert result.output.count("\n") == 1 and "Traceback" not in result.output, result.output


def test_a_pruned_ship_pick_is_predicted_with_the_pruned_file(tmp_path):
    """The bench may ship the pruned branch (compress): predict then runs pruned_<precision>.onnx, not the
    unpruned branch's file of the same precision."""
    from pipeline.deploy.predict import shipped_form
    from pipeline.rundir import RunDir

    run = RunDir(tmp_path / "run")
    bench = run.stage_dir("bench") / "bench.json"
    rows = [{"name": "pruned_openvino_int8_cpu", "model": "pruned", "precision": "int8_cpu"},
            {"name": "branch_onnx_int8_cpu", "model": "branch", "precision": "int8_cpu"}]
    for pick, form in (("pruned_openvino_int8_cpu", "pruned_int8_cpu"), ("branch_onnx_int8_cpu", "int8_cpu")):
        bench.write_text(json.dumps({"headline": {"ship": {"row": pick}}, "rows": rows}))
        run.record("bench", {"status": "done", "outputs": run.describe_outputs({"bench": bench})})
        assert shipped_form(run) == (form, f"{form}: the form the bench picked to ship ({pick})")
