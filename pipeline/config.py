"""The one config schema: every field, its default and what it allows (the deploy sections in config_deploy.py).

A config is a YAML file validated here; unknown keys, wrong types and impossible values are
rejected with the file, the field path and what is allowed (close matches suggested).
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
from pathlib import Path
from typing import Any, Literal, Union

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from pipeline.config_base import ExportPrecision, Precision, Section  # noqa: F401 (re-exported)
from pipeline.config_deploy import (  # noqa: F401 (re-exported: one schema, one import)
    TARGET_PRECISIONS,
    BenchConfig,
    CompressConfig,
    EngineConfig,
    ExportConfig,
    TritonConfig,
)
from pipeline.errors import ConfigError


class DataConfig(Section):
    dataset: Literal["fashion-mnist", "cifar10", "cifar100", "imagefolder", "synthetic"] = Field(
        "fashion-mnist", description="synthetic: generated patterns, for tests only")
    root: Path | None = Field(None, description="Where the dataset lies; None: the dataset's default places")
    download: bool = Field(True, description="Download with torchvision when the files are not found")
    val_size: int = Field(5000, ge=1, description="Training images held out for branch selection")
    train_size: int | None = Field(None, ge=2, description="Train on this many of the remaining images (the same "
                                                           "ones for every seed); None: all of them")
    augment: bool = Field(True, description="Random crop (padding 4) + horizontal flip on training images")
    image_size: int = Field(224, ge=8, description="imagefolder only: side of the square crop")
    num_workers: int = Field(2, ge=0, description="imagefolder only: decoding processes")
    max_image_pixels: int | None = Field(None, ge=1, description=(
        "imagefolder only: the most pixels (width x height) an image may have; a larger file is refused as a "
        "possible decompression bomb. None: PIL's bound (89,478,485)"))
    synthetic_size: int = Field(256, ge=8, description="synthetic only: training images (tests)")
    label_noise: float | None = Field(None, ge=0, lt=1, description=(
        "Share of the training labels replaced by a random other class (symmetric noise), the same labels for "
        "every seed and method; validation and test labels stay clean. None: no noise"))

    @model_validator(mode="after")
    def _noise_on_memory_sets(self) -> DataConfig:
        if self.label_noise is not None and self.dataset == "imagefolder":
            raise ValueError("label_noise is not supported for imagefolder (its labels are the folders); "
                             "leave it out")
        return self


class ModelConfig(Section):
    arch: Literal["resnet20", "resnet32", "resnet44", "resnet56", "resnet110", "resnet18"] = Field(
        "resnet20", description="CIFAR ResNets (basic blocks; resnet110: bottleneck), resnet18: ImageNet style")
    method: Literal["one", "vanilla"] = Field("one", description="vanilla: the same backbone as one plain network")
    branches: int = Field(3, ge=2, le=8, description="ONE branches m")
    width: int = Field(16, ge=4, le=128, description="CIFAR ResNets: channels of the first stage")
    pretrained: str | None = Field(None, description=(
        "resnet18 only: a torchvision ResNet-18 state dict (a path) or weights name (ResNet18_Weights.IMAGENET1K_V1, "
        "downloaded); the trunk and every branch start from it, the classifiers fresh. None: from scratch"))
    pretrained_branch_noise: float | None = Field(None, ge=0, le=1, description=(
        "With pretrained: noise (this share of each conv's std) on every branch's copy of the last stage, so the "
        "branches start apart; None: 0.1 (docs/PRETRAINED.md); 0: identical copies"))

    @model_validator(mode="after")
    def _pretrained_resnet18(self) -> ModelConfig:
        if self.pretrained is not None and self.arch != "resnet18":
            raise ValueError(f"pretrained is a torchvision ResNet-18 state dict: it needs arch resnet18, not "
                             f"{self.arch}")
        return self


class LossConfig(Section):
    temperature: float = Field(3.0, gt=0, description="Distillation temperature T")
    rampup: float = Field(0.27, ge=0, le=1, description="KL weight ramp-up length, as a fraction of the epochs")
    branch_ce_weight: float = Field(1.0, ge=0, description="Weight of the branches' cross-entropy")
    teacher_ce_weight: float = Field(1.0, ge=0, description="Weight of the gated teacher's cross-entropy")
    kd_weight: float = Field(1.0, ge=0, description="Weight of T^2 * KL(teacher || branch), after the ramp-up")


class TrainConfig(Section):
    epochs: int = Field(2, ge=1, description="Passes over the training split")
    batch_size: int = Field(128, ge=1, description="Per process; under torchrun the global batch is this x world size")
    accumulate: int = Field(1, ge=1, description="Split each batch into this many micro-batches (less memory)")
    eval_batch_size: int = Field(512, ge=1, description="Batch for validation and test passes")
    lr: float = Field(0.1, gt=0, description="SGD learning rate for the batch above (scale it with the global batch)")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum")
    nesterov: bool = Field(False, description="Nesterov momentum (the paper uses none)")
    weight_decay: float = Field(1e-4, ge=0, description="L2 weight decay")
    schedule: Literal["multistep", "cosine"] = Field(
        "multistep", description="multistep: x gamma at each milestone; cosine: to 0 over the run, per step")
    milestones: list[int] = Field(default_factory=lambda: [150, 225], description="multistep: epochs where lr x gamma")
    gamma: float = Field(0.1, gt=0, le=1, description="multistep: lr factor at each milestone")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: CUDA when present, else CPU")
    amp: Literal["off", "bf16", "fp16"] = Field("off", description="Mixed precision, CUDA only")
    channels_last: bool = Field(True, description="NHWC memory format while training: faster convolutions on CPUs "
                                                  "and CUDA tensor cores (benchmarks/train_throughput.py)")
    sync_batchnorm: bool = Field(False, description="Under torchrun: SyncBatchNorm across ranks")
    deterministic: bool = Field(False, description="Deterministic algorithms; resume then equals an uninterrupted run")
    threads: int | None = Field(None, ge=1, description="CPU threads; None: PyTorch's default")
    eval_every: int | None = Field(None, ge=1, description="Validate every N epochs and always after the last "
                                                           "(selection uses the last); None: every epoch")
    tensorboard: bool | None = Field(None, description="TensorBoard event files of train and compress under "
                                     "<run>/<stage>/tb (pip install -e '.[tensorboard]'); not in any fingerprint")

    @model_validator(mode="after")
    def _batch_splits(self) -> TrainConfig:
        if self.batch_size % self.accumulate:
            raise ValueError(f"batch_size {self.batch_size} is not divisible by accumulate {self.accumulate}")
        if self.batch_size < 2 * self.accumulate:
            raise ValueError(f"batch_size {self.batch_size} / accumulate {self.accumulate} leaves micro-batches of "
                             f"one image, which BatchNorm cannot train on; use batch_size >= {2 * self.accumulate} "
                             "or a smaller accumulate")
        return self

    @field_validator("milestones")
    @classmethod
    def _milestones_increase(cls, value: list[int]) -> list[int]:
        if any(b <= a for a, b in zip(value, value[1:])):
            raise ValueError("milestones must increase")
        return value


class SelectConfig(Section):
    branch: Union[Literal["best"], int] = Field("best", description="'best' on validation accuracy, or an index")

    @field_validator("branch")
    @classmethod
    def _non_negative(cls, value: str | int) -> str | int:
        if isinstance(value, int) and value < 0:
            raise ValueError("branch must be 'best' or an index >= 0")
        return value


class Config(Section):
    name: str = Field("edge", pattern=r"^[A-Za-z0-9_.-]+$", description="Run name: outputs go to <output_root>/<name>")
    output_root: Path = Field(Path("artifacts"), description="Folder that holds one folder per run")
    seed: int = Field(0, ge=0, le=2**31 - 1, description="Seeds weights, shuffling and augmentation")
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    loss: LossConfig = LossConfig()
    train: TrainConfig = TrainConfig()
    select: SelectConfig = SelectConfig()
    compress: CompressConfig = CompressConfig()
    export: ExportConfig = ExportConfig()
    engine: EngineConfig = EngineConfig()
    triton: TritonConfig = TritonConfig()
    bench: BenchConfig = BenchConfig()

    @field_validator("output_root")
    @classmethod
    def _expand_home(cls, value: Path) -> Path:
        return value.expanduser()  # `~/runs` means the home folder, as in data.root

    @model_validator(mode="after")
    def _cross_checks(self) -> Config:
        if self.engine.enabled and self.engine.precision not in ("auto", *self.export.precisions):
            raise ValueError(
                f"engine.precision {self.engine.precision} is not among export.precisions {self.export.precisions}"
            )
        if self.compress.enabled and self.compress.teacher == "one_e" and self.model.method != "one":
            raise ValueError("compress.teacher one_e is the ONE model's ensemble, which a vanilla run does not "
                             "have; use compress.teacher branch (the unpruned network) or none")
        if self.name in (".", ".."):
            raise ValueError("name must be a plain folder name")
        self._target_is_benched()
        return self

    def _target_is_benched(self) -> None:
        """A latency target the bench cannot measure (its batch, file or runtime missing) is a config error:
        the bench's headline sets the target against what the deployed form achieves."""
        c = self.compress
        if not (c.enabled and self.bench.enabled and (c.target_speedup is not None or c.target_ms is not None)):
            return
        batch, runtime, precision = c.target_batch or 1, c.target_runtime or "onnxruntime", c.target_precision or "fp32"
        if batch not in self.bench.batch_sizes:
            raise ValueError(f"compress.target_batch {batch} is not among bench.batch_sizes {self.bench.batch_sizes}; "
                             "add it, so that the bench measures the latency target")
        source = "int8_cpu" if precision == "int8_cpu" else "fp32"  # OpenVINO's bf16 is compiled from fp32
        if runtime in ("onnxruntime", "openvino") and source not in self.export.precisions:
            raise ValueError(f"compress.target_precision {precision} needs {source} in export.precisions "
                             f"{self.export.precisions}; add it, so that the bench measures the latency target")
        if runtime == "openvino" and not self.bench.openvino:
            raise ValueError("compress.target_runtime openvino is measured by the bench's OpenVINO rows, and "
                             "bench.openvino is false; set it true")

    @property
    def run_dir(self) -> Path:
        return self.output_root / self.name

    def section_hash(self, *sections: str) -> str:
        """A stable digest of some top-level fields: a stage is stale when its digest changes."""
        dumped = self.model_dump(mode="json")
        dumped["train"]["tensorboard"] = None  # curves or not, the weights are the same
        data = {s: _set_fields(dumped[s]) for s in sections}
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def _set_fields(value: Any) -> Any:
    """A section without its None fields: a new optional field (None: off) leaves earlier runs up to date."""
    if isinstance(value, dict):
        return {k: _set_fields(v) for k, v in value.items() if v is not None}
    return value


def load_config(path: Path | str, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read, override and validate a config; every problem is a one-line ConfigError."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found; pass the path of a YAML config such as configs/edge.yaml")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read the config ({exc}); check the path and its permissions")
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise ConfigError(f"{path}: YAML syntax error{where}: {problem}; fix the file's syntax")
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the config must be a mapping of sections (data:, model:, train:, ...)")
    if isinstance(raw.get("stages"), dict):  # JSON is YAML: a manifest.json parses, then fails as a config
        raise ConfigError(f"{path} is a run's manifest, not a config; pass the run directory instead "
                          f"(one-pipeline status {path.parent}), or the config it ran with "
                          f"({path.parent / 'config.yaml'})")
    for item in overrides:
        _apply_override(raw, item, path)
    return validate_config(raw, source=str(path))


def validate_config(raw: dict[str, Any], source: str = "<config>") -> Config:
    try:
        return Config.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, source)) from None


def _apply_override(raw: dict[str, Any], item: str, source: Path) -> None:
    """`train.epochs=2` -> raw["train"]["epochs"] = 2 (the value is parsed as YAML)."""
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"{source}: --set {item!r}: expected FIELD=VALUE, for example --set train.epochs=2")
    try:
        parsed = yaml.safe_load(value)
    except yaml.YAMLError:
        raise ConfigError(f"{source}: --set {item!r}: the value is not valid YAML")
    node = raw
    parts = key.strip().split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{source}: --set {item!r}: {part} is not a section")
        node = child
    node[parts[-1]] = parsed


def _field_paths() -> list[str]:
    """Every field's dotted path (`model.branches`; top-level fields alone: `seed`)."""
    return [field for section in Config.model_fields
            for field in ([f"{section}.{f}" for f in _fields_at([section])] or [section])]


def field_path(name: str) -> str:
    """A field's dotted path from the path itself or, when one section alone has it, the field's own name
    (`branches` -> `model.branches`); anything else is a ConfigError naming the choices."""
    paths = _field_paths()
    if name in paths:
        return name
    matches = [p for p in paths if p.rsplit(".", 1)[-1] == name]
    if len(matches) == 1:
        return matches[0]
    if matches:
        raise ConfigError(f"'{name}' is a field of several sections ({', '.join(matches)}); give its full path")
    close = difflib.get_close_matches(name, paths + [p.rsplit(".", 1)[-1] for p in paths], n=1)
    hint = f"; did you mean '{close[0]}'?" if close else "; `one-pipeline show-config` lists every field"
    raise ConfigError(f"'{name}' is not a config field{hint}")


def _describe(exc: ValidationError, source: str) -> str:
    """The first error, as one line: file, field path, what is wrong, what is allowed."""
    err = exc.errors()[0]
    parts = [str(p) for p in err["loc"]]
    unknown = parts.pop() if err["type"] == "extra_forbidden" else None  # the user's key, whatever it looks like
    loc = [p for p in parts if not _UNION_TAG.match(p)] + ([unknown] if unknown is not None else [])
    field = ".".join(loc) or "(top level)"
    more = f" (and {len(exc.errors()) - 1} more)" if len(exc.errors()) > 1 else ""
    if err["type"] == "extra_forbidden":
        allowed = _fields_at(loc[:-1])
        close = difflib.get_close_matches(loc[-1], allowed, n=1)
        # the same name in another section: a field that moved (or was put in the wrong section)
        elsewhere = [p for p in _field_paths() if p.rsplit(".", 1)[-1] == loc[-1] and p != field]
        if close:
            hint = f"did you mean '{close[0]}'{''.join(f' or {p!r}' for p in elsewhere)}? "
        elif len(elsewhere) == 1:
            hint = f"it lives at '{elsewhere[0]}' now: move it there; "
        else:
            hint = f"fields of that name: {', '.join(repr(p) for p in elsewhere)}; " if elsewhere else ""
        return f"{source}: unknown key '{field}'; {hint}allowed here: {', '.join(allowed)}{more}"
    message = err["msg"].removeprefix("Value error, ")
    given = err.get("input")
    shown = "" if isinstance(given, dict) or given is None else f" (got {given!r})"
    return f"{source}: {field}: {message}{shown}{more}"


# The names pydantic gives union members in an error's location ("int", "literal['best']",
# "function-after[...]"): not fields. Matched whole, so a field such as int8_min_agreement stays.
_UNION_TAG = re.compile(r"^(int|float|str|bool|none|[a-z-]+\[.*\])$")


def _fields_at(loc: list[str]) -> list[str]:
    model: type[BaseModel] = Config
    for part in loc:
        annotation = model.model_fields[part].annotation
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return list(model.model_fields)
