"""Make the kept branch smaller: prune whole channels to `compress.flops_ratio` of its FLOPs (Torch-Pruning,
see pipeline/training/prune.py), or channels and residual blocks to a latency target measured on this host
(`compress.target_speedup` / `target_ms`: pipeline/deploy/compress_plan.py, the plan in compress/plan.json),
then fine-tune it with CE + T^2 * KL(teacher || student), the teacher being ONE's gated ensemble (`one_e`),
the unpruned branch (`branch`) or nobody (`none`), frozen in eval mode and fed the same augmented batch.
Without augmentation the teacher's logits of an image never change, so when the fine-tune draws more images
than the training set holds they are computed once, in one pass.

The pruned fp32 network is deployed only when it loses at most `compress.max_accuracy_drop` validation
top-1 points against the kept branch; either way compress/summary.json and the stage summary say what it
measured, and `deployed` / `reason` tell later stages whether compress/model.pt exists and why not.
The fine-tune checkpoints compress/last.pt after every epoch and on Ctrl-C, and resumes from it like
training does (deterministic CPU runs end with the weights of an uninterrupted run).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from rich.markup import escape
from torch import nn

from pipeline.deploy import compress_plan
from pipeline.deploy.guard import guard
from pipeline.errors import StageSkipped, UsageError
from pipeline.rundir import sha256_file, write_json
from pipeline.stage import StageContext, StageResult
from pipeline.training import checkpoint, curves, fit, loop, prune
from pipeline.training.data import Datasets, ImageSet, load_datasets, training_batches
from pipeline.training.evaluate import evaluate
from pipeline.training.loss import distill_loss
from pipeline.training.models import EnsembleNet, count_parameters


def teacher_kind(ctx: StageContext) -> str:
    method = ctx.summary("train").get("method", ctx.cfg.model.method)
    kind = ctx.cfg.compress.teacher or ("one_e" if method == "one" else "branch")
    if kind == "one_e" and method != "one":
        raise UsageError("compress.teacher one_e is the ONE model's ensemble, which this vanilla run does not "
                         "have; use compress.teacher branch or none")
    return kind


def run(ctx: StageContext) -> StageResult:
    cfg = ctx.cfg.compress
    if not cfg.enabled:
        raise StageSkipped("compress.enabled is false: the kept branch is deployed unpruned")
    branch_path = ctx.input("strip", "model")
    branch, payload = checkpoint.load_model(branch_path)
    kind = teacher_kind(ctx)
    device = ctx.device
    fit.setup(ctx.cfg, device)
    data = load_datasets(ctx.cfg.data)
    example, _ = next(data.val.batches(64))  # the first traces the graph; all rank blocks when depth is cut

    planned = compress_plan.stage_plan(ctx, branch, example, data.val)
    plan = planned.plan
    started = time.perf_counter()
    student = prune.prune(branch, plan, example, cfg.importance, cfg.steps)
    ctx.console.print(f"pruned to stage widths {list(plan.stage_widths)}, inner widths {list(plan.inner_widths)}: "
                      f"{plan.flops / 1e6:.1f} of {plan.base_flops / 1e6:.1f} MFLOPs ({plan.ratio:.3f}x) in "
                      f"{time.perf_counter() - started:.1f} s")
    student = student.to(device)  # the unpruned branch runs only as the teacher (moved below); select has its accuracy
    teacher, teacher_path = _teacher(ctx, kind, branch, branch_path)
    batch = ctx.cfg.train.eval_batch_size
    pruned_val = evaluate(student, data.val, device, batch)["branches"][0]
    fingerprint = "-".join([ctx.cfg.section_hash("seed", "data", "compress"), sha256_file(branch_path)[:16],
                            sha256_file(teacher_path)[:16], *filter(None, [planned.fingerprint])])
    history = _finetune(ctx, student, teacher, data, fingerprint)

    kept = ctx.summary("select")  # the kept branch's accuracies, as training measured them
    val = {"branch": kept["val"], "pruned": evaluate(student, data.val, device, batch)["branches"][0]}
    test = {"branch": kept["test"], "pruned": evaluate(student, data.test, device, batch)["branches"][0]}
    verdict = guard("the pruned network", val["pruned"], val["branch"], len(data.val), cfg.max_accuracy_drop,
                    against="the kept branch", setting="compress.max_accuracy_drop")
    summary: dict[str, Any] = {
        "stage_widths": list(plan.stage_widths), "inner_widths": list(plan.inner_widths), "flops": plan.flops,
        "branch_flops": plan.base_flops, "flops_ratio": round(plan.ratio, 4), "target_flops_ratio": cfg.flops_ratio,
        "params": count_parameters(student), "branch_params": count_parameters(branch), "teacher": kind,
        "importance": cfg.importance, "epochs": cfg.epochs, "history": history, "val_after_pruning": pruned_val,
        "val": val, "test": test, "drop": verdict.drop, "max_accuracy_drop": cfg.max_accuracy_drop,
        "deployed": verdict.passed, **planned.summary,
    }
    if not verdict.passed:
        summary["reason"] = f"{verdict.reason}; the kept branch is deployed unpruned"
    outputs = {**_write(ctx, summary, student, payload, branch_path, plan.flops), **planned.outputs}
    said = "deployed" if verdict.passed else f"[yellow]not deployed[/yellow]: {escape(summary['reason'])}"
    ctx.console.print(f"pruned val {val['pruned']:.2f}% (after pruning {pruned_val:.2f}%, kept branch "
                      f"{val['branch']:.2f}%), test {test['pruned']:.2f}% vs {test['branch']:.2f}%: {said}")
    return StageResult(outputs=outputs, summary=summary)


def _teacher(ctx: StageContext, kind: str, branch: nn.Module, branch_path: Path) -> tuple[nn.Module | None, Path]:
    """The frozen teacher on the device (None for `none`) and the file it comes from (for the fingerprint)."""
    teacher_path = ctx.input("train", "model") if kind == "one_e" else branch_path
    teacher: nn.Module | None = None
    if kind == "one_e":
        teacher = EnsembleNet(checkpoint.load_model(teacher_path)[0])
    elif kind == "branch":
        teacher = branch
    if teacher is not None:
        teacher = teacher.to(ctx.device).eval().requires_grad_(False)
    return teacher, teacher_path


def _write(ctx: StageContext, summary: dict[str, Any], student: nn.Module, payload: dict[str, Any],
           branch_path: Path, flops: int) -> dict[str, Path]:
    """compress/summary.json, and compress/model.pt when the guard deploys the pruned network."""
    out_dir = ctx.stage_dir("compress")
    model_path = out_dir / "model.pt"
    outputs = {"summary": out_dir / "summary.json"}
    if summary["deployed"]:
        checkpoint.save(model_path, {"spec": student.spec.to_dict(), "state_dict": student.cpu().state_dict(),
                                     "data": payload["data"], "branch": payload["branch"],
                                     "source_sha256": payload["source_sha256"], "pruned_from": sha256_file(branch_path),
                                     "teacher": summary["teacher"], "flops": flops})
        outputs["model"] = model_path
    else:
        model_path.unlink(missing_ok=True)  # no file of an earlier, passing config is left to export
    write_json(outputs["summary"], summary)
    return outputs


def _finetune(ctx: StageContext, student: nn.Module, teacher: nn.Module | None, data: Datasets,
              fingerprint: str) -> list[dict[str, Any]]:
    """SGD on the distillation loss for compress.epochs, resumable from compress/last.pt."""
    cfg = ctx.cfg.compress
    if cfg.epochs == 0:
        return []
    plan = _plan(ctx, student, len(data.train), fingerprint)
    torch.manual_seed(ctx.cfg.seed)
    start = fit.resume_point(ctx, plan, other_config="restart")
    cached = None
    if teacher is not None:
        teacher.to(memory_format=plan.memory_format)
        if caches_teacher(ctx, fit.remaining_batches(plan, start) * cfg.batch_size, len(data.train)):
            started = time.perf_counter()
            # in the fine-tune's batches: on a 2-core CPU, batches of 128 ran ONE-E 1.2x faster than 512
            cached = teacher_logits(teacher, data.train, ctx.device, cfg.batch_size, plan.memory_format)
            ctx.console.print(f"teacher logits of the {len(data.train):,} training images computed once in "
                              f"{time.perf_counter() - started:.1f} s (no augmentation: they never change)")

    def batches(epoch: int, skip: int):
        return data.train.indexed_batches(cfg.batch_size, seed=ctx.cfg.seed, epoch=epoch,
                                          augment=ctx.cfg.data.augment, skip=skip)

    def loss(batch: fit.Batch, _: float) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels, indices = batch
        if cached is not None:
            target = cached[indices]
        elif teacher is not None:
            with torch.no_grad():
                target = teacher(images)
        else:
            target = None
        logits = student(images)
        return distill_loss(logits, target, labels, cfg.temperature, cfg.kd_weight), logits

    history = fit.fit(ctx, plan, start, batches, loss, record=_record,
                      sinks=[lambda epoch, _: ctx.console.print(fit.epoch_line(plan.title, epoch)),
                             *curves.sinks(ctx, "compress")])
    student.to(memory_format=torch.contiguous_format)  # the model file holds plain tensors
    return history


def _plan(ctx: StageContext, student: nn.Module, train_size: int, fingerprint: str) -> fit.Plan:
    cfg = ctx.cfg.compress
    images = min(train_size, cfg.images_per_epoch or train_size)
    per_epoch = training_batches(images, cfg.batch_size, 1, 1)
    if per_epoch == 0:
        raise UsageError(f"compress.images_per_epoch {images} is too few for one batch of compress.batch_size "
                         f"{cfg.batch_size}; raise it")
    memory_format = torch.channels_last if ctx.cfg.train.channels_last else torch.contiguous_format
    student.to(memory_format=memory_format)  # train.channels_last: NHWC, as in training
    optimizer = torch.optim.SGD(student.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                weight_decay=cfg.weight_decay)
    return fit.Plan(model=student, optimizer=optimizer, epochs=cfg.epochs, batches_per_epoch=per_epoch,
                    scheduler=loop.scheduler(optimizer, cfg.schedule, cfg.epochs, per_epoch),
                    last_path=ctx.stage_dir("compress") / "last.pt", fingerprint=fingerprint, device=ctx.device,
                    stage="compress", depends_on="seed/data/compress", title="fine-tune epoch",
                    resuming="resuming the fine-tune", loss_hint="lower compress.lr", memory_format=memory_format)


def _record(epoch: fit.Epoch) -> dict[str, Any]:
    """A fine-tune epoch in compress/summary.json's history."""
    return {"epoch": epoch.number, "loss": epoch.loss, "seconds": epoch.seconds, "images_per_s": epoch.images_per_s}


def caches_teacher(ctx: StageContext, images_to_draw: int, train_size: int) -> bool:
    """One teacher pass over the training set instead of one per drawn image: only without augmentation
    (an augmented image is new each time) and when the fine-tune draws more images than the set holds."""
    return not ctx.cfg.data.augment and images_to_draw > train_size


def teacher_logits(teacher: nn.Module, images: ImageSet, device: torch.device, batch_size: int,
                   memory_format: torch.memory_format) -> torch.Tensor:
    """The frozen teacher's logits of every image of the set, in its order (eval mode: independent of the batch)."""
    with torch.no_grad():
        return torch.cat([teacher(x.to(device, memory_format=memory_format)) for x, _ in images.batches(batch_size)])
