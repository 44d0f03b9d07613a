"""Train ONE (or the vanilla baseline) with SGD, evaluating every head on the validation split each
epoch (or every train.eval_every epochs, and always after the last) and checkpointing every epoch; an
interrupted run resumes from `train/last.pt`.

Under torchrun every rank runs this; DistributedDataParallel averages gradients and only rank 0 writes.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import time
from typing import Any

import torch
from rich.markup import escape
from torch import nn

from pipeline.config import Config
from pipeline.errors import PipelineError, UsageError
from pipeline.rundir import write_text
from pipeline.stage import StageContext, StageResult
from pipeline.training import checkpoint, loop
from pipeline.training.data import Datasets, load_datasets, training_batches
from pipeline.training.evaluate import evaluate
from pipeline.training.imagefolder import check_images
from pipeline.training.loop import Interrupted
from pipeline.training.loop import catch_sigint as _catch_sigint  # a name tests replace
from pipeline.training.loop import progress_bar as _progress
from pipeline.training.loss import one_loss
from pipeline.training.models import ModelSpec, build_model, count_parameters

TRAIN_SECTIONS = ("seed", "data", "model", "loss", "train")


def model_spec(cfg: Config, data: Datasets) -> ModelSpec:
    spec = ModelSpec(arch=cfg.model.arch, num_classes=data.num_classes, in_channels=data.input_shape[0],
                     branches=cfg.model.branches, width=cfg.model.width)
    return spec if cfg.model.method == "one" else spec.single()


def data_facts(data: Datasets) -> dict[str, Any]:
    """What a deployed model needs to know about its input (carried by every model file)."""
    return {"dataset": data.name, "class_names": data.class_names, "mean": list(data.mean), "std": list(data.std),
            "input_shape": list(data.input_shape)}


def run(ctx: StageContext) -> StageResult:
    cfg, device = ctx.cfg, ctx.device
    out_dir = ctx.stage_dir("train")
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=device.type == "cuda")
        torch.backends.cudnn.benchmark = False
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    torch.manual_seed(cfg.seed)

    data = load_datasets(cfg.data)
    if cfg.data.dataset == "imagefolder":
        check_images(cfg.data)
    spec = model_spec(cfg, data)
    model = build_model(spec).to(device)
    memory_format = torch.channels_last if cfg.train.channels_last else None
    if memory_format:
        model = model.to(memory_format=memory_format)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.train.lr, momentum=cfg.train.momentum,
                                nesterov=cfg.train.nesterov, weight_decay=cfg.train.weight_decay)
    batches_per_epoch = training_batches(len(data.train), cfg.train.batch_size, ctx.world, cfg.train.accumulate)
    if batches_per_epoch == 0:
        raise UsageError(f"the training split has {len(data.train)} images, too few for one batch of "
                         f"{2 * cfg.train.accumulate} per process; lower data.val_size or use more images")
    scheduler = _scheduler(optimizer, cfg, batches_per_epoch)
    fingerprint = cfg.section_hash(*TRAIN_SECTIONS)
    last_path = out_dir / "last.pt"
    metrics_path = out_dir / "metrics.jsonl"
    start_epoch, skip_batches, history = 0, 0, []
    if last_path.exists() and not ctx.fresh:
        start_epoch, skip_batches, history = loop.resume(last_path, fingerprint, model, optimizer, scheduler)
        ctx.console.print(f"resuming from {escape(str(last_path))}: epoch {start_epoch + 1}, batch {skip_batches}")

    trained = model
    if ctx.world > 1:
        if cfg.train.sync_batchnorm:
            trained = nn.SyncBatchNorm.convert_sync_batchnorm(trained)
        trained = nn.parallel.DistributedDataParallel(trained, device_ids=[device.index] if device.type == "cuda"
                                                      else None)
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.train.amp) if device.type == "cuda" else None
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)

    def save_last(epoch: int, batch: int) -> None:
        if ctx.rank == 0:
            loop.save_state(last_path, model, optimizer, scheduler, epoch=epoch, batch=batch,
                            fingerprint=fingerprint, history=history, spec=spec.to_dict())

    with _progress(ctx) as progress, _catch_sigint() as interrupted:
        task = progress.add_task("train", total=(cfg.train.epochs - start_epoch) * batches_per_epoch - skip_batches)
        for epoch in range(start_epoch, cfg.train.epochs):
            trained.train()
            started = time.perf_counter()
            totals = torch.zeros(3)  # loss sum, correct (first branch or the net), samples
            batches = data.train.batches(cfg.train.batch_size, seed=cfg.seed, epoch=epoch, augment=cfg.data.augment,
                                         skip=skip_batches, rank=ctx.rank, world=ctx.world)
            batches = itertools.islice(batches, batches_per_epoch - skip_batches)  # see training_batches
            for step, (images, labels) in enumerate(batches, start=skip_batches):
                progress_in_run = epoch + step / batches_per_epoch
                optimizer.zero_grad(set_to_none=True)
                for part in range(cfg.train.accumulate):
                    # interleaved micro-batches: the same split DistributedSampler makes across processes
                    x = images[part::cfg.train.accumulate].to(device, non_blocking=True,
                                                              memory_format=memory_format or torch.contiguous_format)
                    y = labels[part::cfg.train.accumulate].to(device, non_blocking=True)
                    last_part = part == cfg.train.accumulate - 1
                    with (contextlib.nullcontext() if last_part or ctx.world == 1 else trained.no_sync()):
                        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                            loss, logits = _loss(trained(x), y, cfg, progress_in_run)
                        if not torch.isfinite(loss):
                            raise PipelineError(f"the loss became {loss.item()} at epoch {epoch + 1}; lower "
                                                "train.lr or turn off train.amp")
                        scaler.scale(loss / cfg.train.accumulate).backward()
                    totals += torch.tensor([loss.item() * len(y), (logits.argmax(1) == y).sum().item(), len(y)])
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                progress.update(task, advance=1, description=(
                    f"{ctx.label}epoch {epoch + 1}/{cfg.train.epochs} loss {totals[0] / totals[2]:.3f} "
                    f"acc {100 * totals[1] / totals[2]:.1f}% "
                    f"{totals[2] * ctx.world / max(time.perf_counter() - started, 1e-9):.0f} img/s"))
                if interrupted():
                    save_last(epoch, step + 1)
                    raise Interrupted(f"interrupted at epoch {epoch + 1}, batch {step + 1}; checkpoint saved to "
                                      f"{last_path}: run the same command again to resume")
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - started
            skip_batches = 0
            if ctx.world > 1:
                _broadcast_buffers(model)
            record = {"epoch": epoch + 1, "lr": optimizer.param_groups[0]["lr"],
                      "train_loss": float(totals[0] / totals[2]), "train_acc": float(100 * totals[1] / totals[2]),
                      "seconds": round(seconds, 2), "images_per_s": round(totals[2].item() * ctx.world / seconds, 1)}
            if _validates(epoch + 1, cfg):
                val_started = time.perf_counter()
                record["val"] = evaluate(model, data.val, device, cfg.train.eval_batch_size, ctx.rank, ctx.world,
                                         channels_last=memory_format is not None)
                record["val_seconds"] = round(time.perf_counter() - val_started, 2)  # what eval_every saves
            history.append(record)
            save_last(epoch + 1, 0)
            if ctx.rank == 0:
                write_text(metrics_path, "".join(json.dumps(r) + "\n" for r in history))
            ctx.console.print(_epoch_line(record))
            if interrupted():  # Ctrl-C during the validation pass: stop here too, even after the last epoch
                raise Interrupted(f"interrupted after epoch {epoch + 1}; checkpoint saved to {last_path}: run "
                                  "the same command again to resume")

    test = evaluate(model, data.test, device, cfg.train.eval_batch_size, ctx.rank, ctx.world,
                    channels_last=memory_format is not None)
    model_path = out_dir / "model.pt"
    val = history[-1]["val"]
    if ctx.rank == 0:
        checkpoint.save(model_path, {"spec": spec.to_dict(), "state_dict": model.state_dict(),
                                     "data": data_facts(data), "epochs": cfg.train.epochs})
        write_text(metrics_path, "".join(json.dumps(r) + "\n" for r in history))
    ctx.console.print(f"test: {_accuracy_text(test)}")
    measured = [r["images_per_s"] for r in history]
    return StageResult(
        outputs={"model": model_path, "metrics": metrics_path},
        summary={"method": cfg.model.method, "epochs": cfg.train.epochs, "val": val, "test": test,
                 "params": count_parameters(model), "images_per_s": round(sum(measured) / len(measured), 1),
                 "spec": spec.to_dict()},
    )


def _validates(epoch: int, cfg: Config) -> bool:
    """train.eval_every: validate every N epochs and always after the last (the model that is selected)."""
    return epoch == cfg.train.epochs or epoch % (cfg.train.eval_every or 1) == 0


def _loss(out, labels: torch.Tensor, cfg: Config, progress_in_run: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, logits whose accuracy the progress bar shows: the teacher's for ONE)."""
    if isinstance(out, tuple):
        return one_loss(out, labels, cfg.loss, progress_in_run, cfg.train.epochs).total, out.teacher
    return nn.functional.cross_entropy(out.float(), labels), out


def _broadcast_buffers(model: nn.Module) -> None:
    """BatchNorm running statistics drift apart per rank; evaluate (and save) rank 0's on every rank."""
    for buffer in model.buffers():
        torch.distributed.broadcast(buffer, src=0)


def _scheduler(optimizer: torch.optim.Optimizer, cfg: Config,
               steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    return loop.scheduler(optimizer, cfg.train.schedule, cfg.train.epochs, steps_per_epoch, cfg.train.milestones,
                          cfg.train.gamma)


def _accuracy_text(acc: dict) -> str:
    text = "branches " + " ".join(f"{a:.2f}" for a in acc["branches"])
    if "teacher" in acc:
        text += f" | ONE-E (gated) {acc['teacher']:.2f} | average {acc['average']:.2f}"
    return text + " (% top-1)"


def _epoch_line(record: dict) -> str:
    val = f", val {_accuracy_text(record['val'])}" if "val" in record else ""
    return f"epoch {record['epoch']}: loss {record['train_loss']:.3f}{val}, {record['images_per_s']:.0f} img/s"
