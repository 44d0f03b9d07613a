"""Hostile and careless inputs to a run directory: planted links, damaged manifests, full or read-only
disks, leftovers of killed writers, failed commands. Each ends as one line, the documented exit code,
and nothing lost or overwritten."""

import contextlib
import json
import os
import shutil
import stat
import subprocess

import pytest
import torch
import yaml
from typer.testing import CliRunner

from pipeline import rundir
from pipeline.cli import app
from pipeline.deploy.onnx_io import run_exported_onnx
from pipeline.errors import ArtifactError, PipelineError
from pipeline.rundir import RunDir, atomic_path, sha256_file, write_text
from pipeline.runner import run_stages, stage_def, state
from pipeline.training import checkpoint
from tests.conftest import copy_run, copy_trained, make_ctx, tiny_dict, trained_epochs

runner = CliRunner()


def snapshot(root):
    return {p: sha256_file(p) for p in sorted(root.rglob("*")) if p.is_file() and p.name != ".lock"}


def one_error_line(result, code, *fragments):
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.output
    for fragment in fragments:
        assert fragment in result.output, result.output


@contextlib.contextmanager
def mounted_tmpfs(path, options):
    """A real small or read-only filesystem: needs root (CI runs as root) and mount permission."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    path.mkdir(parents=True, exist_ok=True)
    if subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True).returncode:
        pytest.skip("mount -t tmpfs is not permitted here (a container without CAP_SYS_ADMIN)")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


# --- the lock and every file written in a run directory ---------------------------------------------------

PLANTED_LOCKS = [  # (what is planted at <run>/.lock, pointing at a file the user owns)
    ("symlink", lambda victim, lock: lock.symlink_to(victim)),
    ("hard link", lambda victim, lock: os.link(victim, lock)),
    ("dangling symlink", lambda victim, lock: lock.symlink_to(victim.parent / "new-file")),
    ("folder", lambda victim, lock: lock.mkdir()),
]


@pytest.mark.parametrize("name,plant", PLANTED_LOCKS, ids=[p[0] for p in PLANTED_LOCKS])
def test_a_planted_lock_is_refused_and_its_target_untouched(tmp_path, name, plant):
    victim = tmp_path / "precious.txt"
    victim.write_text("keep me")
    run = RunDir(tmp_path / "run")
    run.root.mkdir()
    plant(victim, run.path(".lock"))
    with pytest.raises(PipelineError, match=r"\.lock is .*delete it"):
        with run.lock():
            pass
    assert victim.read_text() == "keep me" and not (tmp_path / "new-file").exists()


def test_a_planted_output_link_is_replaced_never_written_through(tmp_path):
    victim = tmp_path / "precious.txt"
    victim.write_text("keep me")
    target = tmp_path / "run" / "config.yaml"
    target.parent.mkdir()
    target.symlink_to(victim)
    write_text(target, "name: x\n")
    assert victim.read_text() == "keep me" and not target.is_symlink() and target.read_text() == "name: x\n"


def test_a_planted_stage_folder_link_is_refused(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    run = RunDir(tmp_path / "run")
    run.root.mkdir()
    run.path("train").symlink_to(elsewhere)
    with pytest.raises(PipelineError, match="is a symlink"):
        run.stage_dir("train")
    assert not list(elsewhere.iterdir())


def test_stale_temporary_files_of_killed_writers_are_removed_at_the_next_start(tmp_path):
    run = RunDir(tmp_path / "run")
    (run.root / "train").mkdir(parents=True)
    stale = [run.path("train/.last.pt.k2j_x9qa.tmp"), run.path(".manifest.json.abcdefgh.tmp")]
    kept = [run.path("train/notes.tmp"), run.path("train/last.pt")]  # not ours: left alone
    for path in stale + kept:
        path.write_text("x")
    with run.lock():
        assert [p.exists() for p in stale + kept] == [False, False, True, True]


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664), (0o027, 0o640)])
def test_written_files_get_the_mode_of_the_umask(tmp_path, umask, mode):
    previous = os.umask(umask)
    rundir.file_mode.cache_clear()
    try:
        write_text(tmp_path / "a.txt", "x")
        checkpoint.save(tmp_path / "m.pt", {"w": torch.ones(2)})
    finally:
        os.umask(previous)
        rundir.file_mode.cache_clear()
    for name in ("a.txt", "m.pt"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == mode, name


def test_equal_weights_give_equal_bytes(tmp_path):
    state_dict = {"w": torch.arange(6.0).view(2, 3), "step": 3}
    checkpoint.save(tmp_path / "a.pt", state_dict)
    checkpoint.save(tmp_path / "a.pt", state_dict)  # a second temporary file, with another random name
    checkpoint.save(tmp_path / "b.pt", state_dict)
    assert sha256_file(tmp_path / "a.pt") == sha256_file(tmp_path / "b.pt")
    assert torch.equal(torch.load(tmp_path / "b.pt", weights_only=True)["w"], state_dict["w"])


def test_the_same_weights_give_byte_equal_model_files_again(exported_run, tmp_path):
    """strip and export run again on the same trained weights: every model file (.pt and each ONNX
    precision, int8's calibration included) comes out with the same bytes."""
    cfg, run = copy_run(exported_run[:2], tmp_path, "export")
    before = {p.relative_to(run.root): sha256_file(p) for p in sorted(run.root.glob("*/*"))
              if p.suffix in (".pt", ".onnx")}
    assert sum(p.suffix == ".onnx" for p in before) == 8
    run_stages(cfg, run, make_ctx(cfg, run), until="export", force="strip")
    assert {p: sha256_file(run.root / p) for p in before} == before


# --- the manifest -----------------------------------------------------------------------------------------

BAD_MANIFESTS = [  # (name, change to the manifest's JSON text, fragment)
    ("not json", lambda m: "{not json", "is corrupted"),
    ("a list", lambda m: "[]", "not a one-pipeline manifest"),
    ("entry is a list", lambda m: json.dumps({**m, "stages": {**m["stages"], "train": []}}), "stages.train"),
    ("entry without outputs", lambda m: json.dumps(
        {**m, "stages": {"train": {k: v for k, v in m["stages"]["train"].items() if k != "outputs"}}}), "outputs"),
    ("unknown status", lambda m: json.dumps(
        {**m, "stages": {"train": {**m["stages"]["train"], "status": "great"}}}), "status"),
    ("output without sha256", lambda m: json.dumps(
        {**m, "stages": {"train": {**m["stages"]["train"], "outputs": {"model": {"path": "x"}}}}}), "sha256"),
    ("binary", lambda m: "\udcff", "is corrupted"),
]


@pytest.mark.parametrize("name,damage,fragment", BAD_MANIFESTS, ids=[b[0] for b in BAD_MANIFESTS])
def test_a_damaged_manifest_is_one_line_with_the_cheap_fix(trained_run, tmp_path, name, damage, fragment):
    config, run = copy_trained(trained_run, tmp_path)
    text = damage(json.loads(run.manifest_path.read_text()))
    run.manifest_path.write_bytes(text.encode("utf-8", "surrogateescape"))
    before = snapshot(run.root)
    for command in (["run", str(config), "--until", "select"], ["status", str(config)]):
        result = runner.invoke(app, command)
        if command[0] == "run":
            one_error_line(result, 1, fragment, "manifest.json alone", "resumes from train/last.pt")
        else:
            assert "Traceback" not in result.output and result.exit_code == 1, result.output
    assert snapshot(run.root) == before


def test_deleting_the_manifest_alone_recovers_the_run(trained_run, tmp_path):
    """What the corrupted-manifest message says to do: training resumes from last.pt, nothing is retrained."""
    config, run = copy_trained(trained_run, tmp_path)
    written = {name: sha256_file(run.path("train", name)) for name in ("model.pt", "last.pt", "metrics.jsonl")}
    run.manifest_path.unlink()
    result = runner.invoke(app, ["run", str(config), "--until", "train"])
    assert result.exit_code == 0 and "resuming from" in result.output, result.output
    assert run.stage("train").status == "done"
    # nothing trained again: no epoch reported, and last.pt and metrics.jsonl (which hold each epoch's time)
    # as they were
    assert trained_epochs(result.output) == [], result.output
    assert {name: sha256_file(run.path("train", name)) for name in written} == written


@pytest.mark.parametrize("recorded", ["../../outside.pt", "/etc/hostname", "train/../../outside.pt", "link.pt"])
def test_a_recorded_path_outside_the_run_directory_is_never_read(trained_run, tmp_path, recorded):
    config, run = copy_trained(trained_run, tmp_path)
    outside = tmp_path / "outside.pt"
    shutil.copyfile(run.path("train/model.pt"), outside)
    run.path("link.pt").symlink_to(outside)
    manifest = json.loads(run.manifest_path.read_text())
    manifest["stages"]["train"]["outputs"]["model"]["path"] = recorded
    run.manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="outside the run directory"):
        run.output("train", "model")
    result = runner.invoke(app, ["run", str(config), "--until", "select"])
    one_error_line(result, 1, "outside the run directory")


# --- where outputs go -------------------------------------------------------------------------------------

def test_output_root_that_is_a_file(trained_run, tmp_path):
    config = tmp_path / "c.yaml"
    (tmp_path / "a-file").write_text("x")
    config.write_text(yaml.safe_dump(tiny_dict(tmp_path / "a-file")))
    one_error_line(runner.invoke(app, ["train", str(config)]), 1, "set output_root to a writable folder")
    assert (tmp_path / "a-file").read_text() == "x"


@pytest.mark.parametrize("args", [["--branch", "[/]"], ["--branch", "[bold]1"], ["--set", "name=x[/]"]])
def test_markup_in_command_line_values_is_printed_as_typed(tmp_path, args):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(tiny_dict(tmp_path / "runs")))
    result = runner.invoke(app, ["select", str(config), *args])
    one_error_line(result, 2, args[1].removeprefix("name="))


def test_markup_in_the_output_path_is_printed_as_typed(trained_run, tmp_path):
    config, run = copy_trained(trained_run, tmp_path, output_root=tmp_path / "runs[/]x[bold]")
    result = runner.invoke(app, ["train", str(config)])
    assert result.exit_code == 0 and "runs[/]x[bold]" in result.output.replace("\n", ""), result.output
    status = runner.invoke(app, ["status", str(run.root)])
    assert status.exit_code == 0 and "runs[/]x" in status.output.replace("\n", ""), status.output


def test_read_only_filesystem(trained_run, tmp_path):
    with mounted_tmpfs(tmp_path / "ro", "ro,size=1m") as root:
        config = tmp_path / "c.yaml"
        config.write_text(yaml.safe_dump(tiny_dict(root)))
        one_error_line(runner.invoke(app, ["train", str(config)]), 1, "Read-only file system", "output_root")


def test_disk_full_for_real_fails_cleanly_and_keeps_earlier_outputs(trained_run, tmp_path):
    """A real full filesystem: `torch.save` into a file would raise its zip writer's RuntimeError."""
    with mounted_tmpfs(tmp_path / "small", "size=2m") as root:
        config, run = copy_trained(trained_run, tmp_path, output_root=root)
        assert runner.invoke(app, ["run", str(config), "--until", "strip"]).exit_code == 0
        with open(root / "filler", "wb", buffering=0) as f, contextlib.suppress(OSError):  # to the last block
            while True:
                f.write(b"\0" * 65536)
        before = snapshot(run.root)
        result = runner.invoke(app, ["strip", str(config), "--force"])
        one_error_line(result, 1, "disk full while writing", "free some space")
        assert snapshot(run.root) == before  # the manifest's records and config.yaml included
        assert not [p for p in run.root.rglob("*.tmp")]


# --- failed and skipped commands --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def stripped_once(trained_run, tmp_path_factory):
    config, run = copy_trained(trained_run, tmp_path_factory.mktemp("stripped"))
    result = runner.invoke(app, ["run", str(config), "--until", "strip"])
    assert result.exit_code == 0, result.output
    return trained_run[0], run


@pytest.fixture
def stripped(stripped_once, tmp_path):
    """A private copy of the trained run taken through strip once for the module, and a config that names it."""
    return copy_trained(stripped_once, tmp_path)


def _no_space(*args, **kwargs):
    raise OSError(28, "No space left on device")


FAILED_COMMANDS = [  # (name, arguments after the config, monkeypatch or None, exit code)
    ("branch out of range", ["select", "--branch", "99"], None, 2),
    ("branch out of range, later stage", ["strip", "--branch", "7"], None, 2),
    ("disk full on --force", ["strip", "--force"], _no_space, 1),
]


@pytest.mark.parametrize("name,args,patch,code", FAILED_COMMANDS, ids=[f[0] for f in FAILED_COMMANDS])
def test_a_failed_command_leaves_the_earlier_records_as_they_were(stripped, monkeypatch, name, args, patch, code):
    config, run = stripped
    before = snapshot(run.root)
    if patch:
        monkeypatch.setattr(checkpoint.torch, "save", patch)
    result = runner.invoke(app, [args[0], str(config), *args[1:]])
    one_error_line(result, code)
    assert snapshot(run.root) == before  # manifest.json and config.yaml included


def test_a_skip_is_retried_when_tensorrt_or_the_gpu_changed(trained_run, tmp_path):
    cfg, _ = trained_run
    run = RunDir(tmp_path / "run")
    engine = stage_def("engine")
    from pipeline.runner import fingerprint

    for recorded, expected in ((rundir.environment(), "skipped"), ({**rundir.environment(), "tensorrt": "10.13.0"},
                                                                    "stale")):
        run.record("engine", {"status": "skipped", "reason": "TensorRT is not installed", "outputs": {},
                              "fingerprint": fingerprint(cfg, engine, run), "environment": recorded})
        assert state(cfg, engine, run)[0] == expected


def test_an_onnx_exported_from_another_checkpoint_is_refused(tmp_path, tiny_onnx):
    import onnx

    run = RunDir(tmp_path / "run")
    (run.root / "export").mkdir(parents=True)
    (run.root / "strip").mkdir()
    run.path("strip/branch.pt").write_bytes(b"branch")
    run.record("strip", {"status": "done", "fingerprint": "t",
                         "outputs": run.describe_outputs({"model": run.path("strip/branch.pt")})})
    for written_from, refused in (("0" * 64, True), (sha256_file(run.path("strip/branch.pt")), False)):
        proto = onnx.load(str(tiny_onnx))
        proto.metadata_props.add(key="checkpoint_sha256", value=written_from)
        onnx.save(proto, str(run.path("export/model_fp32.onnx")))
        run.record("export", {"status": "done", "fingerprint": "t",
                              "outputs": run.describe_outputs({"onnx_fp32": run.path("export/model_fp32.onnx")})})
        with pytest.raises(ArtifactError, match="another checkpoint.*--from export") if refused else \
                contextlib.nullcontext():
            assert run_exported_onnx(run, "onnx_fp32") == run.path("export/model_fp32.onnx")


def test_atomic_path_maps_only_write_failures(tmp_path):
    with pytest.raises(PipelineError, match="disk full while writing"):
        with atomic_path(tmp_path / "x"):
            raise OSError(28, "No space left on device")
    with pytest.raises(FileNotFoundError):  # not a write failure: raised as it is
        with atomic_path(tmp_path / "y"):
            raise FileNotFoundError(2, "No such file")
    assert not list(tmp_path.iterdir())
