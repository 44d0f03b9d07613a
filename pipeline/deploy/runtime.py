"""ONNX Runtime sessions and output comparison, done one way for export, engine and bench.

    session = ort_session(path, providers, threads=2)     # errors only in the log; PipelineError if unloadable
    logits = run_split(session, images_set, batch=512)     # every image of a split, in order
    figures, problems = parity(got, reference, atol=1e-4, rtol=1e-4)  # per image: atol + rtol x max |logit|
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnxruntime as ort

from pipeline.errors import PipelineError
from pipeline.training.splits import Split


def ort_session(path: Path, providers: list, threads: int | None = None) -> ort.InferenceSession:
    """A session on `providers`; `threads` pins intra-op threads (inter-op 1, sequential) for timing."""
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only
    if threads is not None:
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    try:
        return ort.InferenceSession(str(path), options, providers=providers)
    except Exception as exc:  # ORT raises its own Fail/InvalidGraph/NotImplemented types
        raise PipelineError(f"ONNX Runtime cannot load {Path(path).name} ({type(exc).__name__}: "
                            f"{str(exc).strip()[:300]})") from exc


def input_dtype(session: ort.InferenceSession) -> type:
    return np.float16 if session.get_inputs()[0].type == "tensor(float16)" else np.float32


def run_logits(session: ort.InferenceSession, images: np.ndarray) -> np.ndarray:
    inp = session.get_inputs()[0]
    return session.run([session.get_outputs()[0].name], {inp.name: images.astype(input_dtype(session))})[0]


def run_split(session: ort.InferenceSession, split: Split, batch: int) -> np.ndarray:
    """Logits for every image of `split`, in order."""
    return np.concatenate([run_logits(session, images.numpy()) for images, _ in split.batches(batch)])


def top1_accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 in percent, as `pipeline.training.evaluate` computes it."""
    return float(100.0 * (logits.argmax(1) == labels).sum() / max(len(labels), 1))


def parity(got: np.ndarray, reference: np.ndarray, atol: float | None = None,
           rtol: float = 0.0) -> tuple[dict[str, Any], list[str]]:
    """Figures and problems of one output against a reference: shape, non-finite values, max abs
    difference, top-1 agreement and the mismatching indices. With `atol`, an image whose largest logit
    difference is over atol + rtol x its reference's largest |logit| is a problem.

    The bound scales per image with the reference's largest |logit|, not per value as numpy.allclose does:
    a logit is a sum of products whose size is set by the features and the weights, so two correct
    implementations round it by about machine epsilon times the row's scale, also where the logit itself
    is near zero (fp32 ONNX vs PyTorch, every architecture: per value up to 1.8e-4 of the logit, per image
    up to 1.2e-6 of its largest |logit|, 3.4e-5 where an untrained ONE-E's gate amplifies rounding; see
    docs/DEPLOY.md). A graph that computes something else is off by a sizeable fraction of that scale."""
    if got.shape != reference.shape:
        return {}, [f"output shape {list(got.shape)} where the reference gives {list(reference.shape)}"]
    diff = np.nan_to_num(np.abs(got.astype(np.float64) - reference.astype(np.float64)), nan=np.inf)
    max_diff = float(diff.max())
    agree = got.argmax(1) == reference.argmax(1)
    problems = []
    if not np.isfinite(got).all():
        problems.append(f"{int((~np.isfinite(got)).sum())} non-finite logits")
    if atol is not None:
        per_image = diff.reshape(len(diff), -1).max(1)
        scale = np.abs(reference.astype(np.float64)).reshape(len(diff), -1).max(1)
        allowed = atol + rtol * scale
        over = ~(per_image <= allowed)
        if over.any():
            worst = int(np.argmax(per_image / allowed))
            problems.append(f"max abs logit diff {per_image[worst]:.3g} > atol {atol:g} + rtol {rtol:g} x "
                            f"{scale[worst]:.3g} (the image's largest |logit|) = {allowed[worst]:.3g} on "
                            f"{int(over.sum())} of {len(diff)} images")
    return {"max_abs_diff": max_diff, "max_abs_logit": float(np.abs(reference).max()),
            "top1_agreement": float(agree.mean()), "top1_mismatches": [int(i) for i in np.flatnonzero(~agree)]}, \
        problems


@dataclasses.dataclass(frozen=True)
class FileSession:
    """A deployed file opened in one runtime, as the bench runs it (pipeline/deploy/forms.py `Runtime.session`)."""

    provider: str
    logits: Callable[[Split, int], np.ndarray]  # every image of a split, in order, in batches of at most n
    call: Callable[[np.ndarray], Any]  # one timed call on a batch
    dtype: type  # what the timed call takes


def onnxruntime_session(path: Path, threads: int, device: Any) -> FileSession:
    """An ONNX file in ONNX Runtime on `device`'s providers, with `threads` intra-op threads."""
    from pipeline.deploy.bench_rounds import onnx_call
    from pipeline.device import onnx_providers

    session = ort_session(path, onnx_providers(device), threads)
    provider = session.get_providers()[0]
    return FileSession(provider, lambda split, batch: run_split(session, split, batch), onnx_call(session, provider),
                       input_dtype(session))
