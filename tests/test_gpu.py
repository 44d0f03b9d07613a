"""CUDA paths: training with AMP and channels_last, and the bench's GPU rows. Skipped without a GPU."""

import json
import shutil

import pytest
import torch

from pipeline.config import validate_config
from pipeline.rundir import RunDir
from pipeline.runner import run_stages
from pipeline.stage import StageContext
from tests.conftest import tiny_dict

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; none is visible here")]


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_train_with_amp_and_channels_last_on_cuda(tmp_path, amp):
    cfg = validate_config(tiny_dict(tmp_path, train={"device": "cuda", "amp": amp, "channels_last": True,
                                                     "deterministic": False}))
    run = RunDir(cfg.run_dir)
    run_stages(cfg, run, StageContext(cfg, run, torch.device("cuda")), until="train")
    summary = run.stage("train").summary
    assert min(summary["test"]["branches"]) > 50  # learnt (chance is 25%)
    assert run.stage("train").device == "cuda"


def test_bench_measures_cuda_rows(trained_run, tmp_path):
    cfg, run = trained_run
    shutil.copytree(run.root, tmp_path / cfg.name)
    raw = json.loads(json.dumps(cfg.model_dump(mode="json")))
    raw["output_root"] = str(tmp_path)
    cfg = validate_config(raw)
    run = RunDir(cfg.run_dir)
    run_stages(cfg, run, StageContext(cfg, run, torch.device("cuda")), until="bench")
    rows = {r["name"]: r for r in json.loads(run.output("bench", "bench").read_text())["rows"]}
    assert rows["branch_eager"]["status"] == "ok"
    for name in ("one_e_compile", "branch_compile"):  # torch.compile runs on CUDA: measured, not failed
        assert rows[name]["status"] == "ok", (name, rows[name]["reason"])
    assert "CUDAExecutionProvider" in (rows["branch_onnx_fp32"].get("provider") or "")
