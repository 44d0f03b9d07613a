"""Train ONE (or the vanilla baseline) with SGD, evaluating every head on the validation split each
epoch (or every train.eval_every epochs, and always after the last) and checkpointing every epoch; an
interrupted run resumes from `train/last.pt`.

Under torchrun every rank runs this; DistributedDataParallel averages gradients and only rank 0 writes.
"""

from __future__ import annotations

import json
import time
from typing import Any, Callable

import torch
from torch import nn

from pipeline.config import Config
from pipeline.errors import UsageError
from pipeline.rundir import write_text
from pipeline.stage import StageContext, StageResult
from pipeline.training import checkpoint, curves, fit, loop, pretrained
from pipeline.training.data import Datasets, load_datasets, training_batches
from pipeline.training.evaluate import evaluate
from pipeline.training.imagefolder import check_images
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
    fit.setup(cfg, device)
    torch.manual_seed(cfg.seed)
    data = load_datasets(cfg.data)
    if cfg.data.dataset == "imagefolder":
        check_images(cfg.data)
    spec = model_spec(cfg, data)
    model = build_model(spec).to(device)
    plan = _plan(ctx, model, spec, len(data.train))
    start = fit.resume_point(ctx, plan)
    if cfg.model.pretrained and start == fit.Start():  # a resumed run's weights are last.pt's
        pretrained.start_from(model, cfg.model.pretrained, _branch_noise(cfg))
    plan.module = _distributed(ctx, model)
    metrics_path = out_dir / "metrics.jsonl"

    def batches(epoch: int, skip: int):
        return data.train.batches(cfg.train.batch_size, seed=cfg.seed, epoch=epoch, augment=cfg.data.augment,
                                  skip=skip, rank=ctx.rank, world=ctx.world)

    def loss(batch: fit.Batch, epochs_done: float) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = batch
        return _loss(plan.module(images), labels, cfg, epochs_done)

    def write_metrics(_, history: list[dict]) -> None:
        if ctx.rank == 0:
            write_text(metrics_path, "".join(json.dumps(r) + "\n" for r in history))

    history = fit.fit(ctx, plan, start, batches, loss, record=_recorder(ctx, model, data),
                      sinks=[write_metrics, lambda epoch, history: ctx.console.print(_epoch_line(epoch, history[-1])),
                             *curves.sinks(ctx, "train")])
    test = evaluate(model, data.test, device, cfg.train.eval_batch_size, ctx.rank, ctx.world,
                    channels_last=cfg.train.channels_last)
    model_path = out_dir / "model.pt"
    if ctx.rank == 0:
        checkpoint.save(model_path, {"spec": spec.to_dict(), "state_dict": model.state_dict(),
                                     "data": data_facts(data), "epochs": cfg.train.epochs})
    write_metrics(None, history)  # also when nothing was left to train (killed between last.pt and this file)
    ctx.console.print(f"test: {_accuracy_text(test)}")
    measured = [r["images_per_s"] for r in history]
    return StageResult(
        outputs={"model": model_path, "metrics": metrics_path},
        summary={"method": cfg.model.method, "epochs": cfg.train.epochs, "val": history[-1]["val"], "test": test,
                 "params": count_parameters(model), "images_per_s": round(sum(measured) / len(measured), 1),
                 "spec": spec.to_dict()},
    )


def _branch_noise(cfg: Config) -> float:
    noise = cfg.model.pretrained_branch_noise
    return pretrained.DEFAULT_BRANCH_NOISE if noise is None else noise


def _plan(ctx: StageContext, model: nn.Module, spec: ModelSpec, train_size: int) -> fit.Plan:
    cfg = ctx.cfg.train
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model.to(memory_format=memory_format)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                                weight_decay=cfg.weight_decay)
    batches_per_epoch = training_batches(train_size, cfg.batch_size, ctx.world, cfg.accumulate)
    if batches_per_epoch == 0:
        raise UsageError(f"the training split has {train_size} images, too few for one batch of "
                         f"{2 * cfg.accumulate} per process; lower data.val_size or use more images")
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.amp) if ctx.device.type == "cuda" else None
    return fit.Plan(model=model, optimizer=optimizer, scheduler=_scheduler(optimizer, ctx.cfg, batches_per_epoch),
                    epochs=cfg.epochs, batches_per_epoch=batches_per_epoch,
                    last_path=ctx.stage_dir("train") / "last.pt", fingerprint=ctx.cfg.section_hash(*TRAIN_SECTIONS),
                    device=ctx.device, stage="train", accumulate=cfg.accumulate, amp_dtype=amp_dtype,
                    memory_format=memory_format, state_extra={"spec": spec.to_dict()})


def _distributed(ctx: StageContext, model: nn.Module) -> nn.Module:
    """Under torchrun: DistributedDataParallel (averages gradients), optionally with SyncBatchNorm."""
    if ctx.world == 1:
        return model
    if ctx.cfg.train.sync_batchnorm:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return nn.parallel.DistributedDataParallel(model, device_ids=[ctx.device.index] if ctx.device.type == "cuda"
                                               else None)


def _recorder(ctx: StageContext, model: nn.Module, data: Datasets) -> Callable[[fit.Epoch], dict[str, Any]]:
    """An epoch's record in metrics.jsonl; validation (train.eval_every) runs here, on rank 0's BatchNorm."""
    def record(epoch: fit.Epoch) -> dict[str, Any]:
        if ctx.world > 1:
            _broadcast_buffers(model)
        result = {"epoch": epoch.number, "lr": epoch.lr, "train_loss": epoch.loss, "train_acc": epoch.accuracy,
                  "seconds": epoch.seconds, "images_per_s": epoch.images_per_s}
        if _validates(epoch.number, ctx.cfg):
            started = time.perf_counter()
            result["val"] = evaluate(model, data.val, ctx.device, ctx.cfg.train.eval_batch_size, ctx.rank, ctx.world,
                                     channels_last=ctx.cfg.train.channels_last)
            result["val_seconds"] = round(time.perf_counter() - started, 2)  # what eval_every saves
        return result
    return record


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


def _epoch_line(epoch: fit.Epoch, record: dict) -> str:
    return fit.epoch_line("epoch", epoch, f", val {_accuracy_text(record['val'])}" if "val" in record else "")
