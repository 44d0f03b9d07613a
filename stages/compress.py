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

import itertools
import time
from typing import Any

import torch
from rich.markup import escape
from torch import nn

from pipeline.deploy import compress_plan
from pipeline.errors import PipelineError, StageSkipped, UsageError
from pipeline.rundir import sha256_file, write_json
from pipeline.stage import StageContext, StageResult
from pipeline.training import checkpoint, loop, prune
from pipeline.training.data import Datasets, ImageSet, load_datasets, training_batches
from pipeline.training.evaluate import evaluate
from pipeline.training.loop import Interrupted
from pipeline.training.loop import catch_sigint as _catch_sigint  # a name tests replace
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
    out_dir = ctx.stage_dir("compress")
    branch_path = ctx.input("strip", "model")
    branch, payload = checkpoint.load_model(branch_path)
    kind = teacher_kind(ctx)
    device = ctx.device
    if ctx.cfg.train.threads:
        torch.set_num_threads(ctx.cfg.train.threads)
    if ctx.cfg.train.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=device.type == "cuda")
    data = load_datasets(ctx.cfg.data)
    example, _ = next(data.val.batches(64))  # the first traces the graph; all rank blocks when depth is cut

    planned = compress_plan.stage_plan(ctx, branch, example, data.val)
    plan = planned.plan
    started = time.perf_counter()
    student = prune.prune(branch, plan, example, cfg.importance, cfg.steps)
    ctx.console.print(f"pruned to stage widths {list(plan.stage_widths)}, inner widths {list(plan.inner_widths)}: "
                      f"{plan.flops / 1e6:.1f} of {plan.base_flops / 1e6:.1f} MFLOPs ({plan.ratio:.3f}x) in "
                      f"{time.perf_counter() - started:.1f} s")
    teacher_path = ctx.input("train", "model") if kind == "one_e" else branch_path
    teacher: nn.Module | None = None
    if kind == "one_e":
        teacher = EnsembleNet(checkpoint.load_model(teacher_path)[0])
    elif kind == "branch":
        teacher = branch
    student = student.to(device)  # the unpruned branch runs only as the teacher (moved below); select has its accuracy
    if teacher is not None:
        teacher = teacher.to(device).eval().requires_grad_(False)
    batch = ctx.cfg.train.eval_batch_size
    pruned_val = evaluate(student, data.val, device, batch)["branches"][0]
    fingerprint = "-".join([ctx.cfg.section_hash("seed", "data", "compress"), sha256_file(branch_path)[:16],
                            sha256_file(teacher_path)[:16], *filter(None, [planned.fingerprint])])
    history = _finetune(ctx, student, teacher, data, fingerprint)

    kept = ctx.summary("select")  # the kept branch's accuracies, as training measured them
    val = {"branch": kept["val"], "pruned": evaluate(student, data.val, device, batch)["branches"][0]}
    test = {"branch": kept["test"], "pruned": evaluate(student, data.test, device, batch)["branches"][0]}
    drop = round(val["branch"] - val["pruned"], 4)
    summary: dict[str, Any] = {
        "stage_widths": list(plan.stage_widths), "inner_widths": list(plan.inner_widths), "flops": plan.flops,
        "branch_flops": plan.base_flops, "flops_ratio": round(plan.ratio, 4), "target_flops_ratio": cfg.flops_ratio,
        "params": count_parameters(student), "branch_params": count_parameters(branch), "teacher": kind,
        "importance": cfg.importance, "epochs": cfg.epochs, "history": history, "val_after_pruning": pruned_val,
        "val": val, "test": test, "drop": drop, "max_accuracy_drop": cfg.max_accuracy_drop,
        "deployed": drop <= cfg.max_accuracy_drop, **planned.summary,
    }
    model_path = out_dir / "model.pt"
    outputs = {"summary": out_dir / "summary.json", **planned.outputs}
    if summary["deployed"]:
        checkpoint.save(model_path, {"spec": student.spec.to_dict(), "state_dict": student.cpu().state_dict(),
                                     "data": payload["data"], "branch": payload["branch"],
                                     "source_sha256": payload["source_sha256"], "pruned_from": sha256_file(branch_path),
                                     "teacher": kind, "flops": plan.flops})
        outputs["model"] = model_path
        verdict = "deployed"
    else:
        model_path.unlink(missing_ok=True)  # no file of an earlier, passing config is left to export
        summary["reason"] = (f"the pruned network loses {drop:.2f} validation top-1 points ({val['pruned']:.2f}% vs "
                             f"the kept branch's {val['branch']:.2f}%) > compress.max_accuracy_drop "
                             f"{cfg.max_accuracy_drop:g}; the kept branch is deployed unpruned")
        verdict = f"[yellow]not deployed[/yellow]: {escape(summary['reason'])}"
    write_json(outputs["summary"], summary)
    ctx.console.print(f"pruned val {val['pruned']:.2f}% (after pruning {pruned_val:.2f}%, kept branch "
                      f"{val['branch']:.2f}%), test {test['pruned']:.2f}% vs {test['branch']:.2f}%: {verdict}")
    return StageResult(outputs=outputs, summary=summary)


def _finetune(ctx: StageContext, student: nn.Module, teacher: nn.Module | None, data: Datasets,
              fingerprint: str) -> list[dict[str, Any]]:
    """SGD on the distillation loss for compress.epochs, resumable from compress/last.pt."""
    cfg, device = ctx.cfg.compress, ctx.device
    if cfg.epochs == 0:
        return []
    images = min(len(data.train), cfg.images_per_epoch or len(data.train))
    per_epoch = training_batches(images, cfg.batch_size, 1, 1)
    if per_epoch == 0:
        raise UsageError(f"compress.images_per_epoch {images} is too few for one batch of compress.batch_size "
                         f"{cfg.batch_size}; raise it")
    memory_format = torch.channels_last if ctx.cfg.train.channels_last else torch.contiguous_format
    student.to(memory_format=memory_format)  # train.channels_last: NHWC, as in training
    optimizer = torch.optim.SGD(student.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                weight_decay=cfg.weight_decay)
    scheduler = loop.scheduler(optimizer, cfg.schedule, cfg.epochs, per_epoch)
    last_path = ctx.stage_dir("compress") / "last.pt"
    start_epoch, skip, history = 0, 0, []
    torch.manual_seed(ctx.cfg.seed)
    # a checkpoint of other inputs (another branch, teacher or compress config) is a finished or abandoned
    # fine-tune of something else, not this one's progress: start over
    if last_path.exists() and not ctx.fresh and checkpoint.load(last_path).get("fingerprint") == fingerprint:
        start_epoch, skip, history = loop.resume(last_path, fingerprint, student, optimizer, scheduler,
                                                 stage="compress", what="seed/data/compress")
        ctx.console.print(f"resuming the fine-tune from {escape(str(last_path))}: epoch {start_epoch + 1}, "
                          f"batch {skip}")

    def save(epoch: int, batch: int) -> None:
        loop.save_state(last_path, student, optimizer, scheduler, epoch=epoch, batch=batch,
                        fingerprint=fingerprint, history=history)

    remaining = (cfg.epochs - start_epoch) * per_epoch - skip
    cached = None
    if teacher is not None:
        teacher.to(memory_format=memory_format)
        if caches_teacher(ctx, remaining * cfg.batch_size, len(data.train)):
            started = time.perf_counter()
            # in the fine-tune's batches: on a 2-core CPU, batches of 128 ran ONE-E 1.2x faster than 512
            cached = teacher_logits(teacher, data.train, device, cfg.batch_size, memory_format)
            ctx.console.print(f"teacher logits of the {len(data.train):,} training images computed once in "
                              f"{time.perf_counter() - started:.1f} s (no augmentation: they never change)")
    with loop.progress_bar(ctx) as progress, _catch_sigint() as interrupted:
        task = progress.add_task("fine-tune", total=remaining)
        for epoch in range(start_epoch, cfg.epochs):
            student.train()
            started, seen, loss_sum = time.perf_counter(), 0, 0.0
            batches = data.train.indexed_batches(cfg.batch_size, seed=ctx.cfg.seed, epoch=epoch,
                                                 augment=ctx.cfg.data.augment, skip=skip)
            for step, (x, y, idx) in enumerate(itertools.islice(batches, per_epoch - skip), start=skip):
                x = x.to(device, memory_format=memory_format, non_blocking=True)
                y = y.to(device, non_blocking=True)
                if cached is not None:
                    target = cached[idx.to(device)]
                elif teacher is not None:
                    with torch.no_grad():
                        target = teacher(x)
                else:
                    target = None
                loss = distill_loss(student(x), target, y, cfg.temperature, cfg.kd_weight)
                if not torch.isfinite(loss):
                    raise PipelineError(f"the fine-tune loss became {loss.item()} at epoch {epoch + 1}; lower "
                                        "compress.lr")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                seen, loss_sum = seen + len(y), loss_sum + loss.item() * len(y)
                progress.update(task, advance=1, description=(
                    f"{ctx.label}fine-tune {epoch + 1}/{cfg.epochs} loss {loss_sum / seen:.3f} "
                    f"{seen / max(time.perf_counter() - started, 1e-9):.0f} img/s"))
                if interrupted():
                    save(epoch, step + 1)
                    raise Interrupted(f"interrupted at fine-tune epoch {epoch + 1}, batch {step + 1}; checkpoint "
                                      f"saved to {last_path}: run the same command again to resume")
            skip = 0
            seconds = time.perf_counter() - started
            history.append({"epoch": epoch + 1, "loss": loss_sum / max(seen, 1), "seconds": round(seconds, 2),
                            "images_per_s": round(seen / max(seconds, 1e-9), 1)})
            save(epoch + 1, 0)
    student.to(memory_format=torch.contiguous_format)  # the model file holds plain tensors
    return history


def caches_teacher(ctx: StageContext, images_to_draw: int, train_size: int) -> bool:
    """One teacher pass over the training set instead of one per drawn image: only without augmentation
    (an augmented image is new each time) and when the fine-tune draws more images than the set holds."""
    return not ctx.cfg.data.augment and images_to_draw > train_size


def teacher_logits(teacher: nn.Module, images: ImageSet, device: torch.device, batch_size: int,
                   memory_format: torch.memory_format) -> torch.Tensor:
    """The frozen teacher's logits of every image of the set, in its order (eval mode: independent of the batch)."""
    with torch.no_grad():
        return torch.cat([teacher(x.to(device, memory_format=memory_format)) for x, _ in images.batches(batch_size)])
