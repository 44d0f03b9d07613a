"""`one-pipeline predict` on the tiny run's exported models: the bench's answer for the same test images
written out as PNG files, the shipped form by default, and one line naming the fix for each bad input."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.config import load_config
from pipeline.deploy import predict as predict_module
from pipeline.deploy.predict import Predictor, image_paths, softmax
from pipeline.deploy.runtime import ort_session, run_split
from pipeline.rundir import RunDir
from pipeline.training.data import load_datasets
from pipeline.training.preprocess import Preprocessing, normalise
from tests.own_images import write_bomb

runner = CliRunner()


@pytest.fixture
def benched(benched_run):
    """The session's benched run (tests/conftest.py), read only: predict writes outside the run."""
    _, run, data, _ = benched_run
    assert json.loads(run.output("bench", "bench").read_text()) == data  # no earlier test wrote to it
    return benched_run[:3]


@pytest.fixture(scope="module")
def bomb(tmp_path_factory) -> Path:
    return write_bomb(tmp_path_factory.mktemp("bomb") / "bomb.png")


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


def test_each_bad_input_gets_one_line_naming_the_fix(benched, trained_run, tmp_path, bomb):
    cfg, run, _ = benched
    good = write_pngs(load_datasets(cfg.data).test.images[:1], tmp_path / "png")[0]
    not_image = tmp_path / "notes.png"
    not_image.write_text("not an image")
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[:-30])
    (tmp_path / "album.png").mkdir()  # a folder, however it is named
    trained = trained_run[1]  # trained only: nothing exported
    cases = [
        ([str(run.root), str(not_image)], f"{not_image} is not an image PIL can read"),
        ([str(run.root), str(empty)], f"{empty} is empty (0 bytes)"),
        ([str(run.root), str(truncated)], f"{truncated} is damaged or truncated"),
        ([str(run.root), str(tmp_path / "album.png")], f"{tmp_path / 'album.png'} holds no image files"),
        ([str(run.root), str(bomb)], f"{bomb} is 30000x30000 = 900,000,000 pixels, more than the bound of "
                                     "89,478,485 (a guard against decompression bombs); if you trust the file, "
                                     "raise --max-pixels"),
        ([str(run.root), str(tmp_path / "missing.png")], "missing.png: no such file or folder"),
        ([str(run.root), str(tmp_path / "*.jpeg")], "*.jpeg: no file matches this pattern"),
        ([str(run.root), str(good), "--model", "fp64"], "--model fp64: "),
        ([str(trained.root), str(good)], "has no exported model; export it first: one-pipeline export"),
        ([str(tmp_path), str(good)], "is not a run directory (one holds a manifest.json)"),
        ([str(run.manifest_path), str(good)], f"pass the folder a run wrote, e.g. {run.root}"),
    ]
    for args, fragment in cases:
        result = runner.invoke(app, ["predict", *args], env={"COLUMNS": "500"})
        assert result.exit_code != 0 and fragment in result.output, (args, result.output)
        assert result.output.count("\n") == 1 and "Traceback" not in result.output, result.output


def test_any_image_is_converted_resized_and_cropped_and_each_line_says_so(benched, tmp_path):
    """A 16x16 RGB model takes a grayscale, an off-size, an RGBA and a 16-bit image, as predict fits them."""
    _, run, _ = benched
    grey, small, wide, deep = (tmp_path / f"{n}.png" for n in ("grey", "small", "wide", "deep"))
    Image.new("L", (16, 16), 90).save(grey)
    Image.new("RGB", (8, 8), (10, 200, 30)).save(small)
    Image.new("RGBA", (40, 20), (250, 0, 0, 255)).save(wide)
    Image.fromarray(np.full((16, 16), 128 * 257, dtype=np.uint16)).save(deep)
    result = runner.invoke(app, ["predict", str(run.root), str(grey), str(small), str(wide), str(deep)],
                           env={"COLUMNS": "300"})
    assert result.exit_code == 0, result.output
    for path, note in ((grey, "16x16 grayscale -> 16x16 RGB (converted)"), (small, "8x8 RGB -> 16x16 RGB (resized)"),
                       (wide, "40x20 RGBA -> 16x16 RGB (converted, resized, centre-cropped)"),
                       (deep, "16x16 16-bit grayscale -> 16x16 RGB (converted)")):
        assert f"{path}: {note}" in result.output
    predictor = Predictor.load(run.root, "fp32")
    assert torch.equal(predictor.pixels(grey), torch.full((3, 16, 16), 90, dtype=torch.uint8))
    assert torch.equal(predictor.pixels(small), torch.tensor([10, 200, 30], dtype=torch.uint8).view(3, 1, 1)
                       .expand(3, 16, 16))
    assert torch.equal(predictor.pixels(deep), torch.full((3, 16, 16), 128, dtype=torch.uint8))  # scaled, not clipped


def test_the_pixel_bound_can_be_raised(benched, tmp_path):
    _, run, _ = benched
    big = tmp_path / "big.png"
    Image.new("RGB", (200, 100)).save(big)
    refused = runner.invoke(app, ["predict", str(run.root), str(big), "--max-pixels", "19999"], env={"COLUMNS": "500"})
    assert refused.exit_code == 2 and "more than the bound of 19,999" in refused.output, refused.output
    taken = runner.invoke(app, ["predict", str(run.root), str(big), "--max-pixels", "20000"], env={"COLUMNS": "500"})
    assert taken.exit_code == 0 and f"{big}: 200x100 RGB -> 16x16 RGB" in taken.output, taken.output


class CountingSession:
    """An ONNX Runtime session that records how many images each call carries."""

    def __init__(self, session):
        self.session, self.batches = session, []

    def get_inputs(self):
        return self.session.get_inputs()

    def get_outputs(self):
        return self.session.get_outputs()

    def run(self, names, feed):
        self.batches.append(len(next(iter(feed.values()))))
        return self.session.run(names, feed)


def test_folders_and_globs_in_bounded_batches_into_a_csv(benched, tmp_path, monkeypatch):
    cfg, run, _ = benched
    test = load_datasets(cfg.data).test
    paths = write_pngs(test.images[:11], tmp_path / "png")
    (tmp_path / "png" / "notes.txt").write_text("not an image, not picked from the folder")
    nested = tmp_path / "more" / "deeper"
    nested.mkdir(parents=True)
    extra = write_pngs(test.images[11:14], nested)
    predictor = Predictor.load(run.root, "fp32")
    predictor.session = CountingSession(predictor.session)
    images = image_paths([tmp_path / "png", str(tmp_path / "more" / "**" / "*.png"), paths[0]])
    assert images == [*paths, *extra]  # the folder's files sorted, then the glob's; each once
    predictions = predictor.predict(images, top=2, batch_size=4)
    assert predictor.session.batches == [4, 4, 4, 2]  # never more than the batch at once
    assert [p.top for p in predictions] == [p.top for p in Predictor.load(run.root, "fp32").predict(images, top=2)]
    output = tmp_path / "preds.csv"
    bars = []

    class Bar(predict_module.Progress):
        def __init__(self, *columns, **options):
            super().__init__(*columns, **options)
            bars.append(self)

    monkeypatch.setattr(predict_module, "PROGRESS_FROM", 10)  # 14 images: past it
    monkeypatch.setattr(predict_module, "Progress", Bar)
    result = runner.invoke(app, ["predict", str(run.root), str(tmp_path / "png"), str(nested / "*.png"), "--top", "2",
                                 "--output", str(output), "--model", "fp32"], env={"COLUMNS": "300"})
    assert result.exit_code == 0 and f"14 image(s) (none needed fitting): {output}" in result.output, result.output
    assert not bars[0].disable and bars[0].tasks[0].completed == 14  # a progress bar, the summary, no line each
    assert str(paths[0]) not in result.output
    with output.open() as f:
        rows = list(csv.DictReader(f))
    assert [Path(r["path"]) for r in rows] == images
    assert [[(r["label_1"], float(r["probability_1"])), (r["label_2"], float(r["probability_2"]))] for r in rows] == \
        [p.top for p in predictions]


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
        bench.write_text(json.dumps({"schema_version": 3, "headline": {"ship": {"row": pick}}, "rows": rows}))
        run.record("bench", {"status": "done", "outputs": run.describe_outputs({"bench": bench})})
        assert shipped_form(run) == (form, f"{form}: the form the bench picked to ship ({pick})")


def test_a_bench_json_of_an_older_schema_is_refused_in_one_line_that_says_to_rerun_the_bench(benched, tmp_path):
    """predict's default form is the bench's pick: a version 2 bench.json (no pruned forms) is not read."""
    _, run, bench = benched
    copy = tmp_path / "run"
    shutil.copytree(run.root, copy)
    path = copy / "bench" / "bench.json"
    path.write_text(json.dumps({**bench, "schema_version": 2}))
    moved = RunDir(copy)
    record = moved.stage("bench").model_dump(mode="json")
    moved.record("bench", {**record, "outputs": moved.describe_outputs({"bench": path})})
    good = write_pngs(load_datasets(load_config(copy / "config.yaml").data).test.images[:1], tmp_path / "png")[0]
    result = runner.invoke(app, ["predict", str(copy), str(good)], env={"COLUMNS": "500"})
    assert result.exit_code == 1 and result.output.count("\n") == 1 and "Traceback" not in result.output, \
        result.output
    assert f"{path} has bench schema_version 2, this one-pipeline reads 3; rerun the bench: one-pipeline run " \
           "CONFIG --from bench" in result.output
    assert runner.invoke(app, ["predict", str(copy), str(good), "--model", "fp32"]).exit_code == 0  # asked: no pick
