"""The config sections of the stages after training: compress, export, engine, triton and bench.

They are part of the one schema in `pipeline/config.py` (which re-exports them); they live here to keep
that file short.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Union

from pydantic import Field, field_validator, model_validator

from pipeline.config_base import ExportPrecision, Precision, Section

# the precisions a latency target may be measured in, per runtime (int8_cpu: the export stage's ORT int8 form)
TARGET_PRECISIONS = {"onnxruntime": ("fp32", "int8_cpu"), "openvino": ("fp32", "bf16", "int8_cpu"),
                     "tensorrt": ("fp32", "fp16", "int8")}


class CompressConfig(Section):
    enabled: bool = Field(False, description="Prune the kept branch to compress.flops_ratio of its FLOPs (or to a "
                                             "latency target) and fine-tune it (stage compress); false: the branch "
                                             "is deployed as is")
    flops_ratio: float = Field(0.5, gt=0, le=1, description="Share of the kept branch's FLOPs the pruned network "
                                                            "may keep (not used with a latency target)")
    channel_multiple: Union[Literal["auto"], int] = Field(
        16, description="Every pruned width is a multiple of this (or the original width): CPU convolution kernels "
                        "work on channel blocks (8 on AVX2, 16 on AVX-512); a width off the block is padded and saves "
                        "nothing. auto: the block of this CPU's kernels (16 with AVX-512, else 8; 8 for tensorrt)")
    target_speedup: float | None = Field(
        None, gt=1, description="Latency target: the pruned network runs this many times faster than the kept "
                                "branch (batch p50, measured on this host in target_runtime at target_precision and "
                                "the bench's threads); the planner times candidate widths and depths and keeps the "
                                "one with the most parameters that meets it (compress/plan.json). None: flops_ratio")
    target_ms: float | None = Field(None, gt=0, description="Latency target in milliseconds per call of target_batch "
                                                            "images (p50, measured like target_speedup); set one of "
                                                            "the two")
    target_batch: int | None = Field(None, ge=1, description="Batch the latency target is measured at; None: 1")
    target_runtime: Literal["onnxruntime", "openvino", "tensorrt"] | None = Field(
        None, description="Runtime the latency target is measured in (tensorrt: on a host with an NVIDIA GPU); "
                          "None: onnxruntime")
    target_precision: Literal["fp32", "fp16", "bf16", "int8", "int8_cpu"] | None = Field(
        None, description="Precision the latency target is measured at: onnxruntime fp32 or int8_cpu; openvino fp32, "
                          "bf16 or int8_cpu; tensorrt fp32, fp16 or int8; None: fp32")
    plan_candidates: int | None = Field(None, ge=2, description="Most candidate plans the latency planner builds and "
                                                                "times; None: 40")
    plan: Path | None = Field(None, description="Prune to the plan this file names without planning: a compress/"
                                                "plan.json of another run, or a JSON file whose `chosen` names "
                                                "stage_widths, inner_widths and stage_blocks (one plan for every "
                                                "run of a comparison); None: plan here")
    importance: Literal["magnitude", "bn_scale"] = Field(
        "magnitude", description="Which channels go: lowest L2 norm over the coupled group (magnitude) or lowest "
                                 "BatchNorm scale (bn_scale)")
    steps: int = Field(4, ge=1, description="Prune in this many steps, importance recomputed after each")
    teacher: Literal["one_e", "branch", "none"] | None = Field(
        None, description="Distillation teacher for the fine-tune: one_e (the ONE model's gated ensemble), branch "
                          "(the unpruned kept branch), none (cross-entropy only); None: one_e for ONE, branch "
                          "for vanilla")
    temperature: float = Field(4.0, gt=0, description="Distillation temperature T")
    kd_weight: float = Field(1.0, ge=0, description="Weight of T^2 * KL(teacher || student) beside the CE")
    epochs: int = Field(1, ge=0, description="Fine-tune passes (0: no fine-tune)")
    images_per_epoch: int | None = Field(None, ge=2, description="Fine-tune on this many images of each epoch's "
                                                                 "shuffled order; None: the whole training split")
    batch_size: int = Field(128, ge=2, description="Fine-tune batch")
    lr: float = Field(0.01, gt=0, description="SGD learning rate of the fine-tune")
    schedule: Literal["cosine", "constant"] = Field("cosine", description="cosine: to 0 over the fine-tune, per step")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum")
    weight_decay: float = Field(1e-4, ge=0, description="L2 weight decay")
    max_accuracy_drop: float = Field(0.5, ge=0, description="Most validation top-1 points the pruned fp32 network "
                                                            "may lose against the kept branch; worse is not "
                                                            "deployed")

    @field_validator("channel_multiple")
    @classmethod
    def _positive_multiple(cls, value: str | int) -> str | int:
        if isinstance(value, int) and value < 1:
            raise ValueError("channel_multiple must be auto or a channel count >= 1")
        return value

    @model_validator(mode="after")
    def _one_target(self) -> CompressConfig:
        latency = self.target_speedup is not None or self.target_ms is not None
        if self.target_speedup is not None and self.target_ms is not None:
            raise ValueError("target_speedup and target_ms are two latency targets; set one of them")
        if latency and "flops_ratio" in self.model_fields_set and \
                self.flops_ratio != CompressConfig.model_fields["flops_ratio"].default:
            raise ValueError(f"flops_ratio {self.flops_ratio:g} and a latency target are two targets; leave "
                             "flops_ratio out (a latency target replaces it) or drop the latency target")
        settings = [k for k in ("target_batch", "target_runtime", "target_precision") if getattr(self, k) is not None]
        if settings and not latency:
            raise ValueError(f"{settings[0]} describes a latency target, but neither target_speedup nor target_ms is "
                             "set; set one or leave it out")
        runtime, precision = self.target_runtime or "onnxruntime", self.target_precision or "fp32"
        if precision not in TARGET_PRECISIONS[runtime]:
            raise ValueError(f"target_precision {precision} is not among {runtime}'s precisions; choose one of "
                             f"{', '.join(TARGET_PRECISIONS[runtime])}")
        return self


class ExportConfig(Section):
    opset: int = Field(20, ge=18, le=23, description="ONNX opset (the dynamo exporter needs >= 18)")
    precisions: list[ExportPrecision] = Field(
        default_factory=lambda: ["fp32"], description="ONNX models to produce; int8: symmetric Q/DQ for TensorRT, "
                                                      "int8_cpu: uint8 activations for ONNX Runtime on x86 CPUs")
    ensemble: bool = Field(True, description="Also export the full model's gated ensemble (ONE-E) in the same "
                                             "precisions, for the like-for-like bench")
    atol: float = Field(1e-4, gt=0, description="fp32: max abs logit difference ONNX Runtime vs PyTorch, plus rtol "
                                                "x the image's largest absolute logit")
    rtol: float = Field(1e-4, ge=0, description="fp32: the share of each image's largest absolute logit added to atol "
                                                "(rounding grows with the logits' scale)")
    fp16_atol: float = Field(5e-2, gt=0, description="fp16: max abs logit difference vs PyTorch fp32, plus "
                                                     "fp16_rtol x the image's largest absolute logit")
    fp16_rtol: float = Field(1e-2, ge=0, description="fp16: the share of each image's largest absolute logit added to "
                                                     "fp16_atol")
    max_accuracy_drop: float = Field(0.5, ge=0, description="fp16/int8: most top-1 points lost against the fp32 "
                                                            "ONNX on the whole validation split; worse is not deployed")
    calibration_size: int = Field(1024, ge=1, description="int8: training images for calibration, balanced over "
                                                          "classes")
    calibration_methods: list[Literal["minmax", "entropy", "percentile"]] = Field(
        default_factory=lambda: ["minmax", "percentile", "entropy"], min_length=1,
        description="int8: calibrations tried in order, each with every layer int8, then with the first conv "
                    "and the classifier in float; the first within max_accuracy_drop is kept")
    check_size: int = Field(64, ge=2, description="Validation images for the parity check")

    @model_validator(mode="after")
    def _fp32_first(self) -> ExportConfig:
        if "fp32" not in self.precisions:
            raise ValueError("precisions must include fp32 (the others are converted from it)")
        return self


class EngineConfig(Section):
    enabled: bool = Field(True, description="Build a TensorRT engine (skipped with a reason without TensorRT or a GPU)")
    precision: Literal["auto"] | Precision = Field(
        "auto", description="Which exported ONNX the engine is built from; auto: the lowest precision that passed "
                            "the export accuracy guard (int8, else fp16, else fp32)")
    ensemble: bool = Field(True, description="Also build an engine of the full model's ONE-E output (exported "
                                             "with export.ensemble), for the like-for-like bench")
    min_batch: int = Field(1, ge=1, description="Optimization profile: smallest batch")
    opt_batch: int = Field(32, ge=1, description="Optimization profile: the batch TensorRT tunes for")
    max_batch: int = Field(128, ge=1, description="Optimization profile: largest batch")
    workspace_mb: int = Field(1024, ge=16, description="Builder workspace memory limit")
    verify: bool = Field(True, description="After the build, run export.check_size validation images through the "
                                           "engine and compare with ONNX Runtime on the same ONNX file")
    fp32_atol: float = Field(1e-2, gt=0, description="fp32 engine: max abs logit difference vs ONNX Runtime "
                                                     "(TensorRT may use TF32 kernels for fp32 tensors), plus "
                                                     "fp32_rtol x the image's largest absolute logit")
    fp32_rtol: float = Field(1e-2, ge=0, description="fp32 engine: the share of each image's largest absolute logit "
                                                     "added to fp32_atol (TF32 rounds like fp16)")
    fp16_atol: float = Field(5e-2, gt=0, description="fp16 engine: max abs logit difference vs ONNX Runtime, plus "
                                                     "fp16_rtol x the image's largest absolute logit")
    fp16_rtol: float = Field(1e-2, ge=0, description="fp16 engine: the share of each image's largest absolute logit "
                                                     "added to fp16_atol")
    int8_min_agreement: float = Field(0.9, ge=0, le=1, description="int8 engine: least top-1 agreement with "
                                                                    "ONNX Runtime on the same Q/DQ ONNX")

    @model_validator(mode="after")
    def _ordered(self) -> EngineConfig:
        if not self.min_batch <= self.opt_batch <= self.max_batch:
            raise ValueError("need min_batch <= opt_batch <= max_batch")
        return self


class TritonConfig(Section):
    enabled: bool = Field(True, description="Write the Triton model repository")
    model_name: str | None = Field(None, pattern=r"^[A-Za-z0-9_.-]+$", description="None: the run name")
    max_batch_size: int = Field(128, ge=1, description="Largest batch Triton forms")
    dynamic_batching: bool = Field(True, description="Let Triton batch concurrent requests")
    max_queue_delay_us: int = Field(100, ge=0, description="Dynamic batching: longest wait for a fuller batch")
    instance_count: int = Field(1, ge=1, description="Model instances per model")
    tensorrt_accelerator: bool = Field(True, description="onnxruntime backend: build TensorRT on the serving GPU")
    openvino: bool = Field(True, description="Also serve the int8_cpu form with Triton's openvino backend (CPU "
                                             "instances; the fastest x86 form at large batches, see the bench)")


class BenchConfig(Section):
    enabled: bool = Field(True, description="Measure every deployed form (bench) and report it")
    batch_sizes: list[int] = Field(default_factory=lambda: [1, 8, 64], min_length=1,
                                   description="Batches for the throughput figures (latency is at batch 1)")
    warmup: int = Field(10, ge=0, description="Untimed iterations before each measurement")
    iterations: int = Field(100, ge=3, description="Timed batch-1 calls per row (p50/p90/p99 over these)")
    throughput_iterations: int = Field(20, ge=1, description="Timed calls per batch size per row")
    rounds: int = Field(5, ge=1, description="The timed calls are split into rounds in which every row takes its "
                                             "turn, so a machine that slows down mid-bench slows every row alike")
    turn_pause_ms: float = Field(50, ge=0, description="Pause before every turn of a timed round (bench, latency "
                                 "planner, compare): the last runtime's spinning threads go idle first (on 2 "
                                 "cores they stole the next row's time slices); 0 for checks whose timings nobody "
                                 "reads")
    threads: int | None = Field(None, ge=1, description="CPU threads for every row; None: all cores")
    test_limit: int | None = Field(None, ge=1, description="Evaluate on the first N test images only")
    served: bool = Field(True, description="Add a row measured through a real Triton server (skipped with a reason "
                                          "until `python -m pipeline.deploy.triton_server setup` has run)")
    baseline: Path | None = Field(None, description="Another run directory (e.g. a model.method: vanilla run of "
                                                     "the same backbone) whose network is benched beside this one")
    ship_max_accuracy_drop: float = Field(0.5, ge=0, description="What to ship: the fastest deployed form of the "
                                                                 "branch within this many top-1 points of its fp32 "
                                                                 "ONNX")
    ship_for: Literal["latency", "throughput"] = Field(
        "latency", description="What 'fastest' means for the ship pick: latency, batch-1 p50 (one request at a "
                               "time); throughput, images/s at the largest of batch_sizes (a batching server)")
    openvino: bool = Field(True, description="OpenVINO rows (CPU): fp32 and int8_cpu compiled at f32, and bf16 where "
                                             "the CPU has it, behind export.max_accuracy_drop (skipped with the "
                                             "install command where OpenVINO is missing)")

    @property
    def turn_pause_s(self) -> float:
        return self.turn_pause_ms / 1e3

    @field_validator("batch_sizes")
    @classmethod
    def _batches(cls, value: list[int]) -> list[int]:
        if any(b < 1 for b in value) or len(set(value)) != len(value):
            raise ValueError("batch_sizes must be distinct sizes >= 1")
        return sorted(value)
