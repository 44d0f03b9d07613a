"""Cut the chosen branch out of the ONE model as a plain `SingleNet` (trunk + branch + classifier).

    single = strip_branch(one_model, index)       # no gate, no other branches; eval mode
    diff = branch_logit_diff(one_model, single, index, images)

The file strip/branch.pt is a `pipeline.training.checkpoint` model file (`checkpoint.load_model` rebuilds it
without ONE's multi-branch code) with `branch` and `source_sha256` (train/model.pt) added. The copy is
verified on a real validation batch: its logits must equal the branch's inside the full model.
A vanilla network is copied as is.
"""

from __future__ import annotations

import json

import torch
from torch import nn

from pipeline.errors import ArtifactError, PipelineError
from pipeline.rundir import sha256_file
from pipeline.stage import StageContext, StageResult
from pipeline.training import checkpoint
from pipeline.training.data import load_datasets
from pipeline.training.models import ModelSpec, ONENet, SingleNet, count_parameters

STRIP_ATOL = 1e-6  # same ops on the same CPU: the logits should agree to float32 rounding
CHECK_IMAGES = 32


def strip_branch(model: ONENet, index: int) -> SingleNet:
    """A SingleNet holding the trunk and branch `index` of `model` (copied weights, eval mode)."""
    spec = model.spec
    if not 0 <= index < spec.branches:
        raise PipelineError(f"branch {index} does not exist in a model with {spec.branches} branches")
    single = SingleNet(spec.single())
    prefix = f"branches.{index}."
    state = {}
    for key, value in model.state_dict().items():
        if key.startswith("trunk."):
            state[key] = value.clone()
        elif key.startswith(prefix):
            state["branch." + key[len(prefix):]] = value.clone()
    single.load_state_dict(state, strict=True)  # every SingleNet tensor must come from the ONE model
    return single.eval()


@torch.no_grad()
def branch_logit_diff(full: nn.Module, single: nn.Module, index: int | None, images: torch.Tensor) -> float:
    """Max abs difference between `single`'s logits and branch `index`'s inside `full` (eval mode).
    `index` None: `full` is itself a single network (vanilla)."""
    full.eval()
    single.eval()
    out = full(images)
    reference = out if index is None else out.branches[:, index]
    return float((single(images) - reference).abs().max())


def run(ctx: StageContext) -> StageResult:
    model_path = ctx.input("train", "model")
    selection = json.loads(ctx.input("select", "selection").read_text())
    index = int(selection["branch"])
    full, payload = checkpoint.load_model(model_path)
    spec = ModelSpec.from_dict(payload["spec"])
    if spec.method == "one":
        if index >= spec.branches:
            raise ArtifactError(f"select chose branch {index} but train/model.pt has {spec.branches} branches; "
                                "rerun with --from select")
        single = strip_branch(full, index)
        reference_index: int | None = index
    else:
        if index != 0:
            raise ArtifactError(f"select chose branch {index} of a vanilla network; rerun with --from select")
        single, reference_index = full, None  # vanilla: already a plain network

    data = load_datasets(ctx.cfg.data)
    images, _ = next(data.val.batches(min(CHECK_IMAGES, len(data.val))))
    diff = branch_logit_diff(full, single, reference_index, images)  # on CPU: deterministic kernels
    ctx.console.print(f"stripped branch {index}: max abs logit difference vs the full model {diff:.3g} "
                      f"on {len(images)} validation images")
    if not diff <= STRIP_ATOL:  # also catches NaN
        raise PipelineError(f"the stripped branch {index} differs from the full model by {diff:.3g} (max abs logit, "
                            f"bound {STRIP_ATOL:g}); the weight copy is wrong: report this as a bug")

    out_path = ctx.stage_dir("strip") / "branch.pt"
    checkpoint.save(out_path, {"spec": single.spec.to_dict(), "state_dict": single.state_dict(),
                               "data": payload["data"], "branch": index, "source_sha256": sha256_file(model_path)})
    full_params, branch_params = count_parameters(full), count_parameters(single)
    return StageResult(outputs={"model": out_path}, summary={
        "branch": index,
        "full_params": full_params,
        "branch_params": branch_params,
        "param_ratio": round(branch_params / full_params, 4),
        "full_bytes": model_path.stat().st_size,
        "branch_bytes": out_path.stat().st_size,
        "max_abs_diff": diff,
        "check_images": len(images),
    })
