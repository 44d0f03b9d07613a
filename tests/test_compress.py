"""The compress stage on the tiny run: structured pruning to a FLOPs target, fine-tuning from a teacher,
the accuracy guard, model files without pickle, resume after an interruption, clear errors."""

import contextlib
import json
import shutil

import pytest
import torch
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.config import validate_config
from pipeline.deploy.timing import count_flops
from pipeline.errors import ConfigError
from pipeline.rundir import RunDir
from pipeline.runner import run_stages
from pipeline.training import checkpoint, fit, prune
from pipeline.training.models import ModelSpec, SingleNet
from stages import compress as compress_stage
from tests.conftest import make_ctx, press_ctrl_c_at, tiny_dict

# width-4 tiny net (stages 4/8/16): blocks of 2 channels so that half the FLOPs is reachable
SMALL = {"enabled": True, "channel_multiple": 2, "epochs": 1, "images_per_epoch": 96, "batch_size": 16, "lr": 0.02,
         "max_accuracy_drop": 100}  # the tiny run is about the mechanics; the guard has its own test


def _compress(trained_run, root, data=None, **compress):
    cfg, run = trained_run
    if not data:  # another data section is another training run
        shutil.copytree(run.root, root / cfg.name)
    data = {**cfg.data.model_dump(), **(data or {})}
    new = validate_config(tiny_dict(root, compress={**SMALL, **compress}, data=data))
    copy = RunDir(new.run_dir)
    run_stages(new, copy, make_ctx(new, copy), until="compress")
    return new, copy


@pytest.fixture(scope="module")
def compressed(trained_run, tmp_path_factory):
    return _compress(trained_run, tmp_path_factory.mktemp("compress"))


def test_pruned_file_loads_without_pickle_and_meets_the_flops_target(compressed):
    cfg, run = compressed
    summary = run.stage("compress").summary
    assert summary["deployed"] and summary["teacher"] == "one_e", summary
    payload = torch.load(run.path("compress/model.pt"), weights_only=True)  # plain tensors and primitives
    pruned = SingleNet(ModelSpec.from_dict(payload["spec"]))
    pruned.load_state_dict(payload["state_dict"])
    pruned.eval()
    branch, _ = checkpoint.load_model(run.path("strip/branch.pt"))
    image = torch.randn(1, 3, 16, 16)
    assert count_flops(pruned, image) <= cfg.compress.flops_ratio * count_flops(branch, image)
    assert count_flops(pruned, image) == summary["flops"]
    assert payload["spec"]["stage_widths"] == summary["stage_widths"] and summary["stage_widths"] != [4, 8, 16]
    assert all(w % 2 == 0 for w in summary["stage_widths"] + summary["inner_widths"])
    assert pruned.branch.fc.out_features == 4  # the classifier's outputs are untouched
    loaded, _ = checkpoint.load_model(run.path("compress/model.pt"))
    assert torch.equal(loaded(image), pruned(image))


def test_plan_flops_equal_torch_flop_counter():
    torch.manual_seed(0)
    net = SingleNet(ModelSpec("resnet20", 10, 1, "single", 1, 16)).eval()
    example = torch.randn(2, 1, 28, 28)
    plan = prune.plan_widths(net, example, 0.5, 16)
    assert (plan.stage_widths, plan.inner_widths) == ((16, 16, 32), (16, 16, 16))
    pruned = prune.prune(net, plan, example, "magnitude", 2)
    assert count_flops(pruned, example[:1]) == plan.flops <= 0.5 * count_flops(net, example[:1])


def test_unpruned_specs_keep_their_keys():
    spec = ModelSpec("resnet20", 10, 1, "single", 1, 16)
    assert "stage_widths" not in spec.to_dict() and ModelSpec.from_dict(spec.to_dict()) == spec
    pruned = ModelSpec("resnet20", 10, 1, "single", 1, 16, (16, 16, 32), (16,) * 6 + (8,) * 3)
    assert ModelSpec.from_dict(pruned.to_dict()) == pruned


def test_guard_rejects_a_destroyed_pruning(trained_run, tmp_path):
    """4% of the FLOPs (nearly the least the tiny net allows) with no fine-tune: not deployed, and the reason
    names the bound and the drop."""
    _, run = _compress(trained_run, tmp_path, flops_ratio=0.04, channel_multiple=1, epochs=0,
                       max_accuracy_drop=0.5)
    summary = run.stage("compress").summary
    assert not summary["deployed"] and summary["drop"] > 0.5
    reason = summary["reason"]
    assert "\n" not in reason and f"{summary['drop']:.2f}" in reason and "compress.max_accuracy_drop 0.5" in reason
    assert not run.path("compress/model.pt").exists() and "model" not in run.stage("compress").outputs


def test_interrupted_fine_tune_resumes_to_the_same_weights(trained_run, tmp_path, monkeypatch):
    settings = {"epochs": 2, "images_per_epoch": 64}  # 4 batches per epoch
    _, whole = _compress(trained_run, tmp_path / "a", **settings)
    press_ctrl_c_at(monkeypatch, 7)  # a check after each of epoch 1's 4 batches, one after the epoch, then epoch 2's
    with pytest.raises(fit.Interrupted, match="run the same command again to resume"):
        _compress(trained_run, tmp_path / "b", **settings)
    cfg = validate_config(tiny_dict(tmp_path / "b", compress={**SMALL, **settings}))
    saved = torch.load(cfg.run_dir / "compress/last.pt", weights_only=True)
    assert (saved["epoch"], saved["batch"]) == (1, 2)
    steps = []

    @contextlib.contextmanager
    def count_steps():
        yield lambda: steps.append(1) and False

    monkeypatch.setattr(fit, "catch_sigint", count_steps)
    resumed = RunDir(cfg.run_dir)
    run_stages(cfg, resumed, make_ctx(cfg, resumed), until="compress")
    assert len(steps) == 2 + 1  # the rest of epoch 2 (and the check after it) only: it resumed, not started over
    a = torch.load(whole.path("compress/model.pt"), weights_only=True)["state_dict"]
    b = torch.load(resumed.path("compress/model.pt"), weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_without_augmentation_the_teacher_runs_once_per_image_and_the_fine_tune_is_the_same(trained_run, tmp_path,
                                                                                           monkeypatch):
    passes = []
    real_pass, real_rule = compress_stage.teacher_logits, compress_stage.caches_teacher
    monkeypatch.setattr(compress_stage, "teacher_logits", lambda *a: passes.append(1) or real_pass(*a))
    settings = {"epochs": 2, "images_per_epoch": None}  # 2 x 320 images drawn from 320: worth one pass
    _, cached = _compress(trained_run, tmp_path / "cached", data={"augment": False}, **settings)
    assert passes == [1]
    monkeypatch.setattr(compress_stage, "caches_teacher", lambda *a: False)
    _, per_batch = _compress(trained_run, tmp_path / "per_batch", data={"augment": False}, **settings)
    assert passes == [1]
    a = torch.load(cached.path("compress/model.pt"), weights_only=True)["state_dict"]
    b = torch.load(per_batch.path("compress/model.pt"), weights_only=True)["state_dict"]
    assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-4) for k in a)
    monkeypatch.setattr(compress_stage, "caches_teacher", real_rule)
    _compress(trained_run, tmp_path / "augmented", **settings)  # a crop is new each time it is drawn
    assert passes == [1]


@pytest.mark.parametrize("compress, fragment", [
    ({"flops_ratio": 0}, "compress.flops_ratio"), ({"flops_ratio": 1.5}, "compress.flops_ratio"),
])
def test_impossible_ratios_are_config_errors(tmp_path, compress, fragment):
    with pytest.raises(ConfigError, match=fragment):
        validate_config(tiny_dict(tmp_path, compress={"enabled": True, **compress}))


def test_one_e_teacher_on_a_vanilla_run_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="compress.teacher branch"):
        validate_config(tiny_dict(tmp_path, model={"method": "vanilla"}, compress={"enabled": True,
                                                                                    "teacher": "one_e"}))


@pytest.mark.parametrize("compress, fragments", [
    ({"flops_ratio": 0.05}, ["leaves a layer with no channel", "channel_multiple"]),
    # the tiny branch's widths are 4/8/16: blocks of 16 leave no layer anything to prune, whatever the ratio
    ({"flops_ratio": 0.5, "channel_multiple": 16}, ["compress.channel_multiple 16 is not smaller than any width",
                                                    "widest layer has 16 channels"]),
])
def test_a_ratio_that_leaves_a_layer_with_no_channel_is_one_line(trained_run, tmp_path, compress, fragments):
    cfg, run = trained_run
    shutil.copytree(run.root, tmp_path / cfg.name)
    import yaml
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny_dict(tmp_path, compress={**SMALL, **compress})))
    result = CliRunner().invoke(app, ["run", str(path), "--until", "compress"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    output = " ".join(result.output.split())  # the console wraps long lines
    assert all(fragment in output for fragment in fragments), output


@pytest.fixture(scope="module")
def deployed(compressed, tmp_path_factory):
    """The compressed run taken through export (fp32 + fp16, branch and pruned) and triton."""
    from tests.conftest import copy_run

    return copy_run(compressed, tmp_path_factory.mktemp("deployed"), "triton",
                    export={"precisions": ["fp32", "fp16"], "ensemble": False, "max_accuracy_drop": 100})


def test_pruned_onnx_agrees_with_pytorch(deployed):
    import onnxruntime as ort

    from pipeline.training.data import load_datasets

    cfg, run = deployed
    summary = run.stage("export").summary
    assert summary["compress"]["deployed"] and summary["pruned_deployed"] == ["fp32", "fp16"]
    model, _ = checkpoint.load_model(run.output("compress", "model"))
    images, _ = next(load_datasets(cfg.data).val.batches(64))
    session = ort.InferenceSession(str(run.output("export", "pruned_onnx_fp32")), providers=["CPUExecutionProvider"])
    got = session.run(["logits"], {"input": images.numpy()})[0]
    with torch.no_grad():
        want = model(images).numpy()
    assert abs(got - want).max() < 1e-4 and (got.argmax(1) == want.argmax(1)).all()
    branch = ort.InferenceSession(str(run.output("export", "onnx_fp32")), providers=["CPUExecutionProvider"])
    assert branch.get_inputs()[0].shape[1:] == session.get_inputs()[0].shape[1:]  # the same input, a smaller net
    assert run.output("export", "pruned_onnx_fp32").stat().st_size < run.output("export", "onnx_fp32").stat().st_size


def test_triton_repository_serves_the_pruned_models(deployed):
    from pipeline.deploy.onnx_io import read_onnx_io

    _, run = deployed
    models = run.stage("triton").summary["models"]
    assert {"tiny_pruned_onnx", "tiny_pruned_onnx_fp16", "tiny_onnx"} <= models.keys()
    served = run.path("triton", "tiny_pruned_onnx", "1", "model.onnx")
    assert served.read_bytes() == run.output("export", "pruned_onnx_fp32").read_bytes()
    assert "tiny_pruned_onnx" in run.path("triton", "README.txt").read_text()
    class_names = torch.load(run.path("compress/model.pt"), weights_only=True)["data"]["class_names"]
    assert read_onnx_io(served).class_names == tuple(class_names)


@pytest.mark.server
def test_a_real_server_answers_with_the_pruned_models_logits(deployed, tmp_path):
    import onnxruntime as ort
    import tritonclient.http as httpclient

    from pipeline.deploy import triton_server
    from pipeline.errors import PipelineError

    _, run = deployed
    try:
        env = None if triton_server.external_command() else triton_server.setup_env()
    except PipelineError as exc:
        pytest.skip(f"server environment: {exc}")
    server = triton_server.TritonServer(run.path("triton"), env=env, command=triton_server.external_command(),
                                        log=tmp_path / "server.log")
    server.start(timeout_s=180)
    try:
        images = torch.randn(4, 3, 16, 16).numpy()
        tensor = httpclient.InferInput("input", list(images.shape), "FP32")
        tensor.set_data_from_numpy(images)
        with httpclient.InferenceServerClient(server.endpoints.http) as client:
            got = client.infer("tiny_pruned_onnx", [tensor]).as_numpy("logits")
    finally:
        server.stop(timeout_s=60)
    session = ort.InferenceSession(str(run.output("export", "pruned_onnx_fp32")), providers=["CPUExecutionProvider"])
    want = session.run(["logits"], {"input": images})[0]
    assert abs(got - want).max() < 2e-2 and (got.argmax(1) == want.argmax(1)).all()


def test_bench_and_report_put_the_pruned_rows_beside_the_branch(deployed, tmp_path):
    from tests.conftest import copy_run

    _, run = copy_run(deployed, tmp_path, "report", bench={"served": False, "batch_sizes": [8]})  # else the fast bench
    bench = json.loads(run.path("bench/bench.json").read_text())
    rows = {r["name"]: r for r in bench["rows"]}
    for name in ("pruned_eager", "pruned_onnx_fp32", "pruned_onnx_fp16"):
        assert rows[name]["status"] == "ok" and rows[name]["model"] == "pruned", rows[name]
    assert rows["pruned_onnx_fp32"]["flops"] < rows["branch_onnx_fp32"]["flops"]
    assert rows["pruned_onnx_fp32"]["triton_model"] == "tiny_pruned_onnx"
    prune_gain = bench["headline"]["prune"]
    assert (prune_gain["row"], prune_gain["versus"]) == ("pruned_onnx_fp32", "branch_onnx_fp32")
    assert "Prune gain (same runtime, same precision)" in run.path("report/report.md").read_text()


def test_a_pruning_the_guard_rejects_is_named_by_every_later_stage(trained_run, tmp_path):
    from tests.conftest import copy_run

    cfg, run = _compress(trained_run, tmp_path / "c", flops_ratio=0.04, channel_multiple=1, epochs=0,
                         max_accuracy_drop=0.5)
    reason = run.stage("compress").summary["reason"]
    _, run = copy_run((cfg, run), tmp_path / "d", "bench",
                      export={"precisions": ["fp32"], "ensemble": False},
                      bench={"served": False, "batch_sizes": [8]})
    assert run.stage("export").summary["compress"] == {"deployed": False, "reason": reason}
    assert not list(run.path("export").glob("pruned_*"))
    assert reason in run.path("triton", "README.txt").read_text()
    rows = {r["name"]: r for r in json.loads(run.path("bench/bench.json").read_text())["rows"]}
    assert rows["pruned_onnx_fp32"]["status"] == "skipped" and reason in rows["pruned_onnx_fp32"]["reason"]


def _records(values: dict[str, list[float]]) -> list[dict]:
    return [{"variant": key, "seed": seed, "test": v, "branch_test": 80.0, "val": v, "flops_ratio": 0.5,
             "deployed": True, "run": "-"} for key, vs in values.items() for seed, v in enumerate(vs)]


def test_compress_table_says_whether_ones_teacher_pays():
    from pipeline.compare.compress import VARIANTS, markdown, summarise

    base = validate_config(tiny_dict("/tmp", compress={"enabled": True}))
    values = {key: [70.0, 71.0, 72.5] for key, *_ in VARIANTS}
    values["one-ensemble"] = [72.0, 72.5, 74.6]
    table = summarise(base, [0, 1, 2], _records(values))
    assert [p["diff"] for p in table["pairs"]] == pytest.approx([5.6 / 3] * 2)  # seed by seed: 2.0, 1.5, 2.1
    assert table["pairs"][0]["p"] < 0.05 and "pays its training cost" in table["verdict"]
    assert "| ONE kept branch pruned, KD from ONE-E | one_e | 72.00 | 72.50 | 74.60 |" in markdown(table)
    records = _records(values)
    records[0]["deployed"] = False  # one-ensemble, seed 0: over the guard's bound
    assert "| 80.00 | 2 of 3 |" in markdown(summarise(base, [0, 1, 2], records))
    values["one-ensemble"] = [70.1, 70.9, 72.6]  # within the seeds' noise: no claim
    table = summarise(base, [0, 1, 2], _records(values))
    assert "does not pay here" in table["verdict"]


@pytest.mark.slow
def test_compare_compress_prunes_both_methods_five_ways(compared_tiny, tmp_path):
    import yaml
    from rich.console import Console

    from pipeline.compare import compare
    from pipeline.compare.compress import VARIANTS, compress_compare

    # the session's compare of the same tiny config (tests/conftest.py): its runs are reused, not run again
    shutil.copytree(compared_tiny[1].root, tmp_path / "runs" / "tiny-compare", ignore=shutil.ignore_patterns(".lock"))
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_dict(tmp_path / "runs")))
    compare(config, [], [0, 1], [], Console(quiet=True))
    assert not (tmp_path / "runs" / "tiny-compare" / "one-seed0" / "compress" / "model.pt").exists()  # plain compare
    # SMALL as command-line overrides: the same compress runs as with SMALL in the file
    compress_compare(config, [f"compress.{key}={value}" for key, value in SMALL.items()], [0, 1], Console(quiet=True))
    table = json.loads((tmp_path / "runs" / "tiny-compare" / "compress.json").read_text())
    assert [r["variant"] for r in table["rows"]] == [key for key, *_ in VARIANTS]
    assert len(table["runs"]) == 10 and all(len(r["per_seed"]) == 2 for r in table["rows"])
    run = RunDir(tmp_path / "runs" / "tiny-compare" / "compress-vanilla-branch-seed1")
    assert run.stage("compress").summary["teacher"] == "branch" and run.stage("train").summary["method"] == \
        "vanilla"
    assert "ONE's teacher" in (tmp_path / "runs" / "tiny-compare" / "compress.md").read_text()
