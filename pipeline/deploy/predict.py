"""`one-pipeline predict`: a run's exported model in ONNX Runtime on image files, top-k labels.

The preprocessing is read from the model's own metadata (input shape, mean, std, dataset: written by the
export stage) and applied by `pipeline.training.preprocess`, the code training and the bench use, so a
file gives here exactly the answer the bench gives for the same pixels.

    predictor = Predictor.load(Path("artifacts/edge"), form=None)  # the shipped form, else fp32
    for p in predictor.predict([Path("shoe.png")], top=3): print(p.image, p.top)
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import onnx
import torch

from pipeline.deploy.onnx_io import PRECISIONS, SUBJECTS, exported_onnx, onnx_key
from pipeline.deploy.runtime import ort_session, run_logits
from pipeline.errors import ArtifactError, UsageError
from pipeline.rundir import RunDir
from pipeline.training.preprocess import Preprocessing


@dataclasses.dataclass(frozen=True)
class Prediction:
    image: Path
    top: list[tuple[str, float]]  # (class name, probability), most probable first


def forms(run: RunDir) -> list[str]:
    """The forms the export stage wrote: fp32, int8_cpu, ... (the branch), ensemble_fp32, ... (ONE-E),
    pruned_fp32, ... (compress)."""
    outputs = (run.stage("export") or {}).get("outputs", {})
    return [(p if s == "branch" else f"{s}_{p}") for s in SUBJECTS for p in PRECISIONS if onnx_key(s, p) in outputs]


def shipped_form(run: RunDir) -> tuple[str, str]:
    """(form, why): the precision of the bench's pick (a TensorRT pick: its ONNX, in ONNX Runtime), else fp32."""
    if (run.stage("bench") or {}).get("status") != "done":
        return "fp32", "fp32: the bench has not run, so no form was picked to ship"
    bench = json.loads(run.output("bench", "bench").read_text())
    ship = (bench.get("headline") or {}).get("ship") or {}
    row = next((r for r in bench.get("rows", []) if r.get("name") == ship.get("row")), None)
    if row is None:
        return "fp32", "fp32: the bench picked no form to ship"
    form = row["precision"] if row["model"] == "branch" else f"{row['model']}_{row['precision']}"  # e.g. pruned_fp32
    return form, f"{form}: the form the bench picked to ship ({row['name']})"


@dataclasses.dataclass
class Predictor:
    path: Path
    form: str
    why: str  # which form, and why this one
    preprocessing: Preprocessing
    class_names: list[str]
    session: object

    @classmethod
    def load(cls, run_dir: Path, form: str | None = None) -> Predictor:
        if not (run_dir / "manifest.json").is_file():
            example = run_dir.parent if run_dir.name == "manifest.json" else "artifacts/edge"
            raise UsageError(f"{run_dir} is not a run directory (one holds a manifest.json); pass the folder a run "
                             f"wrote, e.g. {example}")
        run = RunDir(run_dir)
        available = forms(run)
        if not available:
            raise ArtifactError(f"{run_dir} has no exported model; export it first: one-pipeline export "
                                f"{run_dir / 'config.yaml'}")
        form, why = (form, f"{form}: as asked") if form else shipped_form(run)
        if form not in available:
            raise UsageError(f"--model {form}: {run_dir} has no such exported model; choose one of "
                             f"{', '.join(available)} (or add it to export.precisions and run export again)")
        subject, _, precision = form.partition("_") if form.startswith(("ensemble_", "pruned_")) else \
            ("branch", "", form)
        path = exported_onnx(run, onnx_key(subject, precision))
        meta = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
        try:
            preprocessing = Preprocessing.from_metadata(meta)
            names = json.loads(meta["class_names"])
        except (KeyError, ValueError, TypeError):
            raise ArtifactError(f"{path} lacks the preprocessing metadata (input_shape, mean, std, dataset, "
                                "class_names) predict needs; rerun with --force export") from None
        return cls(path, form, why, preprocessing, list(names), ort_session(path, ["CPUExecutionProvider"]))

    def pixels(self, image: Path) -> torch.Tensor:
        """uint8 (C, H, W) of an image file, or a UsageError naming the fix."""
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(image) as opened:
                opened.load()
                return self.preprocessing.pixels(opened)
        except FileNotFoundError:
            raise UsageError(f"{image}: no such file; pass the path of a PNG or JPEG image") from None
        except (UnidentifiedImageError, OSError, SyntaxError):  # SyntaxError: PIL's word for a damaged PNG
            raise UsageError(f"{image} is not an image PIL can read (truncated or another kind of file); pass a "
                             "PNG or JPEG image") from None
        except ValueError as exc:  # the wrong size or channel count
            raise UsageError(f"{image} {exc}") from None

    def predict(self, images: list[Path], top: int = 5) -> list[Prediction]:
        """Every image checked first (one bad file: nothing runs), then one batch through the model."""
        batch = torch.stack([self.preprocessing.tensor(self.pixels(image)) for image in images])
        probabilities = softmax(run_logits(self.session, batch.numpy()))
        k = min(top, len(self.class_names))
        return [Prediction(image, [(self.class_names[i], float(row[i])) for i in np.argsort(-row, kind="stable")[:k]])
                for image, row in zip(images, probabilities)]


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)
