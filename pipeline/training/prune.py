"""Structured pruning of a plain ResNet (the stripped branch) with Torch-Pruning's dependency graph.

    plan = plan_widths(branch, example, flops_ratio=0.5, multiple=16)   # which widths, within the FLOPs
    pruned = prune(branch, plan, example, importance="magnitude", steps=4)  # a SingleNet of those widths
    deeper_cut = dataclasses.replace(plan, stage_blocks=(2, 2, 1))         # fewer residual blocks as well

The plan shrinks each stage's residual width (coupled across every addition of the stage, and the
stem or the downsample that feeds it) and each stage's inner width (the blocks' first convolutions), in
steps of `multiple` channels, always the group that keeps the largest share of its original width, until
the FLOPs fit: ratios stay as even as the channel blocks allow. Multiples of 16 (channel_multiple) because
ONNX Runtime's x86 convolutions work on blocks of 8 (AVX2) or 16 (AVX-512) channels and pad a width off the
block: on the quickstart's branch, widths 8/24/48 (0.45x the MACs) ran only 1.08x faster at batch 1, all-16
widths (0.47x) 1.57x (interleaved ONNX Runtime rounds, 2-core AVX-512 Xeon).

A plan may also keep fewer residual blocks per stage (the latency planner's lever: at batch 1 a small
ResNet's time is mostly per-layer cost, which thinner layers do not cut). The first block of a stage holds
the stride and the downsample and always stays; of the others, those whose residual branch changes its
input least go (`block_contributions`: |F(x)| / |x| on the given images, in eval mode). A block with a
small branch is nearly the identity (its input is already non-negative, so relu(x + F(x)) ~ x), which
is what dropping it leaves; the BatchNorm scale of its last BN says the same without the shift and the
input's scale, and "the last blocks" ignores the network altogether.

Torch-Pruning removes the channels: per group, the lowest importance (L2 norm over every coupled
parameter, or BatchNorm scale), recomputed after each of `steps` steps; the classifier keeps its outputs.
The result is loaded into a fresh `SingleNet` whose spec carries the widths, so model files never pickle
a module and `checkpoint.load_model` rebuilds it with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import copy
import dataclasses

import torch
import torch_pruning as tp
from torch import nn

from pipeline.errors import UsageError
from pipeline.training.models import CIFAR_DEPTHS, ModelSpec, SingleNet, stage_depths, stage_layout


@dataclasses.dataclass(frozen=True)
class Plan:
    stage_widths: tuple[int, ...]  # residual width per stage
    inner_widths: tuple[int, ...]  # the blocks' inner width, per stage
    flops: int
    base_flops: int
    stage_blocks: tuple[int, ...] | None = None  # residual blocks kept per stage; None: all of them

    @property
    def ratio(self) -> float:
        return self.flops / self.base_flops

    def spec(self, spec: ModelSpec) -> ModelSpec:
        """The pruned network's spec (`spec`: the unpruned one's); a plan that keeps every block leaves
        stage_blocks unset, so width-only files keep the keys they always had."""
        _, blocks = stage_layout(spec)
        depth = self.stage_blocks or stage_depths(spec)
        return dataclasses.replace(spec, stage_widths=self.stage_widths,
                                   block_widths=tuple(w for w, n in zip(self.inner_widths, depth) for _ in range(n)),
                                   stage_blocks=None if all(n == blocks for n in depth) else tuple(depth))


def _stage_names(spec: ModelSpec) -> list[str]:
    if spec.arch not in CIFAR_DEPTHS and spec.arch != "resnet18" or spec.arch == "resnet110":
        raise UsageError(f"compress prunes basic-block ResNets (resnet20/32/44/56, resnet18), not {spec.arch}; "
                         "set compress.enabled false")
    return ["trunk.3", "trunk.4", "branch.stage"] if spec.arch in CIFAR_DEPTHS else \
        ["trunk.4", "trunk.5", "trunk.6", "branch.stage"]


def conv_geometry(model: nn.Module, example: torch.Tensor) -> dict[str, int]:
    """Per conv: kernel area x output pixels, what its FLOPs scale with besides its channels."""
    geometry, hooks = {}, []
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            def hook(m, inputs, output, name=name):
                geometry[name] = m.kernel_size[0] * m.kernel_size[1] * output.shape[2] * output.shape[3]
            hooks.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model.eval()(example[:1])
    finally:
        for h in hooks:
            h.remove()
    return geometry


def plan_flops(spec: ModelSpec, geometry: dict[str, int], stages: tuple[int, ...], inner: tuple[int, ...],
               blocks: tuple[int, ...] | None = None) -> int:
    """FLOPs (2 per multiply-add) of the convolutions and the classifier, as torch's flop counter counts,
    of a network keeping `blocks` residual blocks per stage (None: all); `geometry` is the unpruned one's."""
    blocks = blocks or stage_depths(spec)
    macs = geometry["trunk.0"] * spec.in_channels * stages[0]
    for s, name in enumerate(_stage_names(spec)):
        for b in range(blocks[s]):
            before = stages[s - 1] if b == 0 and s > 0 else stages[s]
            macs += geometry[f"{name}.{b}.conv1"] * before * inner[s]
            macs += geometry[f"{name}.{b}.conv2"] * inner[s] * stages[s]
            if b == 0 and s > 0:
                macs += geometry[f"{name}.0.downsample.0"] * stages[s - 1] * stages[s]
    return 2 * (macs + stages[-1] * spec.num_classes)


def plan_params(spec: ModelSpec, stages: tuple[int, ...], inner: tuple[int, ...],
                blocks: tuple[int, ...] | None = None) -> int:
    """Parameters (conv weights, BatchNorm scales and shifts, the classifier) of a network keeping `blocks`
    residual blocks per stage (None: all), counted without building it: the planner ranks thousands of plans."""
    blocks = blocks or stage_depths(spec)
    stem = 7 * 7 if spec.arch == "resnet18" else 3 * 3

    def conv_bn(kernel: int, cin: int, cout: int) -> int:
        return kernel * cin * cout + 2 * cout

    count = conv_bn(stem, spec.in_channels, stages[0])
    for s in range(len(stages)):
        for b in range(blocks[s]):
            before = stages[s - 1] if b == 0 and s > 0 else stages[s]
            count += conv_bn(9, before, inner[s]) + conv_bn(9, inner[s], stages[s])
            if b == 0 and s > 0:
                count += conv_bn(1, stages[s - 1], stages[s])
    return count + (stages[-1] + 1) * spec.num_classes


def plan_widths(model: SingleNet, example: torch.Tensor, flops_ratio: float, multiple: int) -> Plan:
    """The widths (multiples of `multiple`, or the original width) with at most `flops_ratio` of the FLOPs."""
    spec = model.spec
    geometry = conv_geometry(model, example)
    original, _ = stage_layout(spec)
    widths = list(original) * 2  # residual widths, then inner widths
    base = plan_flops(spec, geometry, original, original)

    def flops(w: list[int]) -> int:
        return plan_flops(spec, geometry, tuple(w[:len(original)]), tuple(w[len(original):]))

    def smaller(i: int) -> int:
        return (widths[i] - 1) // multiple * multiple  # the next multiple below

    while flops(widths) > flops_ratio * base:
        options = [i for i in range(len(widths)) if smaller(i) >= 1]
        if not options and multiple >= max(original):
            raise UsageError(f"compress.channel_multiple {multiple} is not smaller than any width of the branch "
                             f"(the widest layer has {max(original)} channels), so no layer can be pruned; set "
                             f"channel_multiple below {max(original)}")
        if not options:
            raise UsageError(f"compress.flops_ratio {flops_ratio:g} leaves a layer with no channel: with at least "
                             f"{multiple} channels per layer (compress.channel_multiple) the smallest network keeps "
                             f"{flops(widths) / base:.3f} of the FLOPs; raise flops_ratio to at least that or "
                             "lower channel_multiple")
        # the group keeping the largest share of its width goes first; ties: the one saving the most
        share = {i: widths[i] / (list(original) * 2)[i] for i in options}
        pick = max(options, key=lambda i: (share[i], flops(widths) - flops([*widths[:i], smaller(i),
                                                                            *widths[i + 1:]]), -i))
        widths[pick] = smaller(pick)
    return Plan(tuple(widths[:len(original)]), tuple(widths[len(original):]), flops(widths), base)


def _importance(kind: str) -> tp.importance.Importance:
    if kind == "bn_scale":
        return tp.importance.BNScaleImportance()
    return tp.importance.GroupMagnitudeImportance(p=2)


@torch.no_grad()
def block_contributions(model: SingleNet, images: torch.Tensor) -> list[list[float]]:
    """Per stage, per block: the mean over `images` of |F(x)| / |x|, how much the block's residual branch
    (up to its last BatchNorm, before the addition) changes its input, in eval mode."""
    names = _stage_names(model.spec)
    modules = dict(model.named_modules())
    inputs: dict[tuple[int, int], torch.Tensor] = {}
    branches: dict[tuple[int, int], torch.Tensor] = {}
    hooks = []
    for s, name in enumerate(names):
        for b, block in enumerate(modules[name]):
            def keep_input(module, args, key=(s, b)) -> None:
                inputs[key] = args[0]

            def keep_branch(module, args, out, key=(s, b)) -> None:
                branches[key] = out

            hooks += [block.register_forward_pre_hook(keep_input), block.bn2.register_forward_hook(keep_branch)]
    try:
        model.eval()(images.cpu())
    finally:
        for hook in hooks:
            hook.remove()
    norms = {key: (branches[key].flatten(1).norm(dim=1) / x.flatten(1).norm(dim=1).clamp_min(1e-12)).mean().item()
             for key, x in inputs.items()}
    return [[norms[(s, b)] for b in range(len(modules[name]))] for s, name in enumerate(names)]


def kept_blocks(model: SingleNet, blocks: tuple[int, ...], images: torch.Tensor) -> list[list[int]]:
    """Per stage, the indices of the `blocks[s]` blocks that stay: the first (stride, downsample) and those
    whose residual branch contributes most (`block_contributions`), in their order."""
    kept = []
    for keep, scores in zip(blocks, block_contributions(model, images)):
        others = sorted(range(1, len(scores)), key=lambda b: (-scores[b], b))[:keep - 1]
        kept.append([0, *sorted(others)])
    return kept


def prune(model: SingleNet, plan: Plan, example: torch.Tensor, importance: str = "magnitude",
          steps: int = 1) -> SingleNet:
    """A SingleNet with `plan`'s blocks and widths holding `model`'s most important blocks and channels
    (`model` is untouched); `example`: images, which also rank the blocks when the plan drops some."""
    spec, names = model.spec, _stage_names(model.spec)
    work = copy.deepcopy(model).cpu().eval()
    blocks = plan.stage_blocks or stage_depths(spec)
    if blocks != stage_depths(spec):
        for name, kept in zip(names, kept_blocks(work, blocks, example)):
            stage = work.get_submodule(name)
            work.set_submodule(name, nn.Sequential(*[stage[b] for b in kept]))
    modules = dict(work.named_modules())
    # each group is named by the conv whose outputs it is: the stem or a stage's downsample (residual
    # width), and each block's first conv (inner width)
    groups = [(modules["trunk.0"] if s == 0 else modules[f"{name}.0.downsample.0"], plan.stage_widths[s])
              for s, name in enumerate(names)]
    groups += [(modules[f"{name}.{b}.conv1"], plan.inner_widths[s]) for s, name in enumerate(names)
               for b in range(blocks[s])]
    scorer = _importance(importance)
    example = example[:1].cpu()
    for step in range(1, steps + 1):
        with torch.enable_grad():  # DepGraph traces autograd
            graph = tp.DependencyGraph().build_dependency(work, example_inputs=example)
        for conv, target in groups:
            want = max(target, conv.out_channels - -(-(conv.out_channels - target) // (steps - step + 1)))
            if want >= conv.out_channels:
                continue
            everything = graph.get_pruning_group(conv, tp.prune_conv_out_channels, idxs=list(range(conv.out_channels)))
            scores = scorer(everything)
            drop = torch.argsort(scores, stable=True)[:conv.out_channels - want]
            graph.get_pruning_group(conv, tp.prune_conv_out_channels, idxs=sorted(drop.tolist())).prune()
    pruned = SingleNet(plan.spec(spec))
    pruned.load_state_dict(work.state_dict(), strict=True)  # every block and width where the plan says
    return pruned.eval()
