"""One table of deployable forms: every model the bench measures (the ONE-E ensemble, the kept branch, its
pruned form, ...) and every runtime it runs them in (PyTorch, ONNX Runtime, OpenVINO, TensorRT, Triton, ...),
with what the stages derive from them: the ONNX file name and the export stage's output key, the Triton
model name, the bench row's name and label, the report's plot colour and marker, which stage makes the file.

Export, triton, bench, report and predict read these tables instead of keeping their own. A runtime is
one `Runtime` row (and, for a file runtime, the `session` that opens a file in it); a model one `Model` row.

    row_name("branch", "onnxruntime", "int8")        # "branch_onnx_int8"
    triton_model_name("edge", "pruned", "openvino", "int8_cpu")  # "edge_pruned_openvino_int8_cpu"
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from pipeline.deploy import openvino_runtime
from pipeline.deploy.runtime import onnxruntime_session


@dataclasses.dataclass(frozen=True)
class Model:
    key: str  # what bench.json's rows say in `model`
    stem: str  # the row names' first part: one_e_eager, branch_onnx_fp32, ...
    label: str  # the row's label in PyTorch eager
    who: str  # the report's short name
    tiny: str  # the terminal table's
    colour: str  # the report plot's colour
    triton_suffix: str | None = None  # the triton stage serves it as <base><suffix>...; None: not served
    shippable: bool = False  # the bench may pick one of its deployed forms to ship


@dataclasses.dataclass(frozen=True)
class Runtime:
    key: str  # what bench.json's rows say in `format`
    name: str  # "ONNX Runtime"
    tiny: str  # the terminal table's
    marker: str  # the report plot's marker
    how: str  # the row names' last part; {precision} is replaced
    precisions: tuple[str, ...] = ("fp32",)  # the bench's rows of each model, in this order
    models: tuple[str, ...] = ("ensemble", "branch", "pruned")  # the models it runs (pruned: with compress)
    made_by: str | None = None  # the stage that writes the file it runs; None: the bench runs the model itself
    deployable: bool = False  # a server runs it from a file: a candidate to ship
    label_precision: bool = False  # the row's label names the precision
    source: Callable[[str], str] | None = None  # the ONNX precision a precision is compiled from (file runtimes)
    triton: Callable[[str], str | None] | None = None  # the Triton model-name tail of a precision; None: no model
    triton_models: tuple[str, ...] = ("branch", "pruned")  # the models the triton stage serves in it
    # a file runtime that the bench runs like ONNX Runtime: session(path, threads, device) -> runtime.FileSession
    session: Callable[..., Any] | None = None


MODELS: dict[str, Model] = {m.key: m for m in (
    Model("ensemble", "one_e", "ONE-E gated ensemble (full model)", "ONE-E", "ONE-E", "tab:red"),
    Model("full_branch", "full_branch", "full model, kept branch's output", "full model -> branch", "full->branch",
          "tab:orange"),
    Model("branch", "branch", "stripped branch", "branch", "branch", "tab:blue", triton_suffix="", shippable=True),
    Model("pruned", "pruned", "pruned branch (compress)", "pruned branch", "pruned", "tab:purple",
          triton_suffix="_pruned", shippable=True),
    Model("baseline", "baseline", "baseline: the same network trained alone", "baseline", "baseline", "tab:green"),
)}

EXPORTED = ("branch", "ensemble", "pruned")  # the models the export stage writes ONNX files of, in its order
ONNX_PRECISIONS = ("fp32", "fp16", "int8", "int8_cpu")  # int8: TensorRT's Q/DQ form; int8_cpu: ONNX Runtime's on x86

RUNTIMES: dict[str, Runtime] = {r.key: r for r in (
    Runtime("pytorch", "PyTorch eager", "eager", "o", "eager", models=("ensemble", "full_branch", "branch", "pruned")),
    Runtime("torch.compile", "torch.compile", "compile", "D", "compile", models=("ensemble", "branch")),
    Runtime("onnxruntime", "ONNX Runtime", "ORT", "s", "onnx_{precision}", ONNX_PRECISIONS, made_by="export",
            deployable=True, label_precision=True, source=lambda p: p,
            triton=lambda p: "_onnx" if p == "fp32" else f"_onnx_{p}", session=onnxruntime_session),
    Runtime("openvino", "OpenVINO", "OV", "P", "openvino_{precision}", tuple(openvino_runtime.FORMS),
            made_by="export", deployable=True, label_precision=True, source=lambda p: openvino_runtime.FORMS[p][0],
            triton=lambda p: "_openvino_int8_cpu" if p == "int8_cpu" else None),
    # one precision per engine (the engine stage's choice); its Triton models: the branch's plan, and the pruned
    # branch's where the engine stage built one
    Runtime("tensorrt", "TensorRT", "TRT", "^", "tensorrt", made_by="engine", deployable=True, label_precision=True,
            triton=lambda p: "_trt"),
    Runtime("triton", "Triton server", "Triton", "v", "triton_{precision}", models=("branch",), made_by="triton",
            label_precision=True),
)}


def row_name(model_key: str, runtime_key: str, precision: str = "fp32") -> str:
    """one_e_eager, branch_onnx_int8, branch_tensorrt, baseline_onnx_fp32, ..."""
    return f"{MODELS[model_key].stem}_{RUNTIMES[runtime_key].how.format(precision=precision)}"


def row_label(model_key: str, runtime_key: str, precision: str = "fp32") -> str:
    """"stripped branch" (PyTorch eager), "stripped branch, ONNX Runtime int8", ..."""
    label, rt = MODELS[model_key].label, RUNTIMES[runtime_key]
    if runtime_key == "pytorch":
        return label
    return f"{label.split(' (')[0]}, {rt.name}" + (f" {precision}" if rt.label_precision else "")


def shippable() -> tuple[str, ...]:
    """The models whose deployed forms the bench may pick to ship (the kept branch and its pruned form)."""
    return tuple(k for k, m in MODELS.items() if m.shippable)


def deployable() -> tuple[str, ...]:
    """The runtimes a server runs from a file, in the table's order."""
    return tuple(k for k, r in RUNTIMES.items() if r.deployable)


def output_prefix(model_key: str) -> str:
    """What the export and engine stages put before their output names: nothing for the branch, else the model."""
    return "" if model_key == "branch" else f"{model_key}_"


def onnx_key(model_key: str, precision: str) -> str:
    """The export stage's output name: onnx_int8 (branch), ensemble_onnx_int8 (ONE-E)."""
    return f"{output_prefix(model_key)}onnx_{precision}"


def engine_key(model_key: str) -> str:
    """The engine stage's output name of a model's plan: engine (branch), ensemble_engine, pruned_engine."""
    return f"{output_prefix(model_key)}engine"


def onnx_file_name(model_key: str, precision: str) -> str:
    """model_fp32.onnx (branch), ensemble_int8.onnx, pruned_fp16.onnx."""
    return f"{'model' if model_key == 'branch' else model_key}_{precision}.onnx"


def triton_model_name(base: str, model_key: str, runtime_key: str, precision: str) -> str | None:
    """The Triton model the triton stage writes for this form (<base>_onnx, <base>_pruned_onnx_int8,
    <base>_trt, <base>_pruned_trt, <base>_openvino_int8_cpu); None where it writes none."""
    suffix, rt = MODELS[model_key].triton_suffix, RUNTIMES[runtime_key]
    if suffix is None or rt.triton is None or model_key not in rt.triton_models:
        return None
    end = rt.triton(precision)
    return None if end is None else f"{base}{suffix}{end}"


def form_name(model_key: str, precision: str) -> str:
    """predict's --model: the branch's precision (fp32, int8_cpu) or <model>_<precision> (pruned_fp32)."""
    return precision if model_key == "branch" else f"{model_key}_{precision}"


def parse_form(form: str) -> tuple[str, str]:
    """(model, precision) of a predict --model name."""
    for key in EXPORTED:
        if key != "branch" and form.startswith(f"{key}_"):
            return key, form[len(key) + 1:]
    return "branch", form
