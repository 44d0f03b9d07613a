"""`one-pipeline predict`: a run's exported model in ONNX Runtime on image files, folders and globs, top-k labels.

The preprocessing is read from the model's own metadata (input shape, mean, std, dataset: written by the
export stage) and applied by `pipeline.training.preprocess` after `pipeline.training.images` decoded the
file, the code training and the bench use, so a file gives here exactly the answer the bench gives for the
same pixels. Any image is taken: its mode converted, and resized and centre-cropped to the model's input,
each image's line saying what was done. Images go through the model in batches of a bounded size.

    predictor = Predictor.load(Path("artifacts/edge"), form=None)  # the shipped form, else fp32
    for p in predictor.predict(image_paths(["photos/"]), top=3): print(p.image, p.note, p.top)
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import glob
import io
import json
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import onnx
import torch
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from pipeline.deploy.benchfile import of_this_version
from pipeline.deploy.forms import EXPORTED, ONNX_PRECISIONS, form_name, onnx_key, parse_form
from pipeline.deploy.onnx_io import run_exported_onnx
from pipeline.deploy.runtime import ort_session, run_logits
from pipeline.errors import ArtifactError, UsageError
from pipeline.rundir import RunDir, write_text
from pipeline.training.images import IMAGE_SUFFIXES, mode_name, open_image
from pipeline.training.preprocess import Preprocessing

DEFAULT_BATCH = 32
PROGRESS_FROM = 256  # more images than this: a progress bar, and with --output a summary instead of a line each


@dataclasses.dataclass(frozen=True)
class Prediction:
    image: Path
    top: list[tuple[str, float]]  # (class name, probability), most probable first
    source: str = ""  # the decoded file: "640x480 RGB"
    steps: tuple[str, ...] = ()  # what was done to fit the model: converted, resized, ...
    fitted: str = ""  # what the model took: "28x28 grayscale"

    @property
    def note(self) -> str:
        """E.g. "640x480 RGB -> 28x28 grayscale (converted, resized)"."""
        return f"{self.source} -> {self.fitted} ({', '.join(self.steps) or 'as is'})"


def image_paths(inputs: Sequence[str | Path]) -> list[Path]:
    """Files as given; folders: the image files under them (recursively, sorted); glob patterns
    (`photos/*.jpg`, `photos/**/*.png`, quoted so the shell leaves them): the files they match. Each
    path once, in the order given. A folder without images or a pattern without a match is a UsageError."""
    found: list[Path] = []
    for item in map(str, inputs):
        path = Path(item)
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not files:
                raise UsageError(f"{path} holds no image files ({', '.join(IMAGE_SUFFIXES)}); pass a folder of "
                                 "images, or the image files themselves")
        elif not path.exists() and any(c in item for c in "*?["):
            files = sorted(Path(p) for p in glob.glob(item, recursive=True) if Path(p).is_file())
            if not files:
                raise UsageError(f"{item}: no file matches this pattern; check it (quote it so the shell "
                                 "passes it on)")
        elif not path.exists():
            raise UsageError(f"{path}: no such file or folder; pass image files, folders of images or glob "
                             "patterns")
        else:
            files = [path]
        found.extend(files)
    return list(dict.fromkeys(found))


def forms(run: RunDir) -> list[str]:
    """The forms the export stage wrote: fp32, int8_cpu, ... (the branch), ensemble_fp32, ... (ONE-E),
    pruned_fp32, ... (compress)."""
    export = run.stage("export")
    outputs = export.outputs if export else {}
    return [form_name(s, p) for s in EXPORTED for p in ONNX_PRECISIONS if onnx_key(s, p) in outputs]


def shipped_form(run: RunDir) -> tuple[str, str]:
    """(form, why): the precision of the bench's pick (a TensorRT pick: its ONNX, in ONNX Runtime), else fp32."""
    record = run.stage("bench")
    if record is None or not record.done:
        return "fp32", "fp32: the bench has not run, so no form was picked to ship"
    path = run.output("bench", "bench")
    bench = of_this_version(json.loads(path.read_text()), path)  # an older file may name no pruned form
    ship = (bench.get("headline") or {}).get("ship") or {}
    row = next((r for r in bench.get("rows", []) if r.get("name") == ship.get("row")), None)
    if row is None:
        return "fp32", "fp32: the bench picked no form to ship"
    form = form_name(row["model"], row["precision"])  # e.g. fp32, pruned_fp32
    return form, f"{form}: the form the bench picked to ship ({row['name']})"


@dataclasses.dataclass
class Predictor:
    path: Path
    form: str
    why: str  # which form, and why this one
    preprocessing: Preprocessing
    class_names: list[str]
    session: object
    max_pixels: int | None = None  # the largest image decoded (None: PIL's bound)

    @classmethod
    def load(cls, run_dir: Path, form: str | None = None, max_pixels: int | None = None) -> Predictor:
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
        subject, precision = parse_form(form)
        path = run_exported_onnx(run, onnx_key(subject, precision))
        meta = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
        try:
            preprocessing = Preprocessing.from_metadata(meta)
            names = json.loads(meta["class_names"])
        except (KeyError, ValueError, TypeError):
            raise ArtifactError(f"{path} lacks the preprocessing metadata (input_shape, mean, std, dataset, "
                                "class_names) predict needs; rerun with --from export") from None
        return cls(path, form, why, preprocessing, list(names), ort_session(path, ["CPUExecutionProvider"]),
                   max_pixels)

    def prepare(self, image: Path) -> tuple[torch.Tensor, str, list[str]]:
        """uint8 (C, H, W) of an image file as the model takes it, the file as decoded ("640x480 RGB") and
        what was done to it; a UsageError naming the file when it cannot be used."""
        opened = open_image(image, self.max_pixels, bound_name="--max-pixels")
        pixels, steps = self.preprocessing.fit(opened)
        return pixels, f"{opened.size[0]}x{opened.size[1]} {mode_name(opened.mode)}", steps

    def pixels(self, image: Path) -> torch.Tensor:
        return self.prepare(image)[0]

    def predict(self, images: Sequence[Path], top: int = 5, batch_size: int = DEFAULT_BATCH,
                advance: Callable[[int], None] | None = None) -> list[Prediction]:
        """Batches of at most `batch_size` images, decoded and run in turn (memory bounded whatever the count);
        `advance(n)` after each. A file that cannot be used stops it with a UsageError naming the file."""
        fitted, k = self.preprocessing.describe(), min(top, len(self.class_names))
        predictions: list[Prediction] = []
        for start in range(0, len(images), batch_size):
            chunk = images[start:start + batch_size]
            prepared = [self.prepare(image) for image in chunk]
            batch = self.preprocessing.tensor(torch.stack([pixels for pixels, _, _ in prepared]))  # one op a batch
            probabilities = softmax(run_logits(self.session, batch.numpy()))
            for image, (_, source, steps), row in zip(chunk, prepared, probabilities):
                best = [(self.class_names[i], float(row[i])) for i in np.argsort(-row, kind="stable")[:k]]
                predictions.append(Prediction(Path(image), best, source, tuple(steps), fitted))
            if advance is not None:
                advance(len(chunk))
        return predictions


def write_csv(path: Path, predictions: Sequence[Prediction]) -> None:
    """One row per image: path, then label_1, probability_1, ... label_k, probability_k (written atomically)."""
    k = max((len(p.top) for p in predictions), default=0)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["path", *[f"{what}_{i}" for i in range(1, k + 1) for what in ("label", "probability")]])
    for p in predictions:
        writer.writerow([str(p.image), *[v for name, prob in p.top for v in (name, repr(prob))]])
    write_text(path, buffer.getvalue())


def show(run_dir: Path, inputs: Sequence[str], console: Console, progress_console: Console, *, form: str | None,
         top: int, output: Path | None, batch_size: int, max_pixels: int | None) -> list[Prediction]:
    """The `predict` command: the images' predictions on `console` (each image's line says what was done to
    it), or into the CSV `output` with a summary; a progress bar on `progress_console` past PROGRESS_FROM."""
    predictor = Predictor.load(run_dir, form, max_pixels)
    images = image_paths(inputs)
    with Progress(TextColumn("predict"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=progress_console, transient=True, disable=len(images) <= PROGRESS_FROM) as progress:
        task = progress.add_task("predict", total=len(images))
        predictions = predictor.predict(images, top, batch_size, lambda n: progress.advance(task, n))
    console.print(escape(f"{predictor.path} ({predictor.why})"), highlight=False, soft_wrap=True)
    if output is not None:
        write_csv(output, predictions)
    if output is None or len(predictions) <= PROGRESS_FROM:
        for prediction in predictions:
            console.print(f"[bold]{escape(str(prediction.image))}[/bold]: {escape(prediction.note)}", highlight=False,
                          soft_wrap=True)
            if output is None:
                width = max(len(name) for name, _ in prediction.top)
                for name, probability in prediction.top:
                    console.print(escape(f"  {name:<{width}}  {probability:7.2%}"), highlight=False)
    if output is not None:
        done = collections.Counter(step for p in predictions for step in p.steps)
        what = ", ".join(f"{n:,} {step}" for step, n in done.most_common()) or "none needed fitting"
        console.print(escape(f"{len(predictions):,} image(s) ({what}): {output}"), highlight=False, soft_wrap=True)
    return predictions


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)
