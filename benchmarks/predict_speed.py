"""`one-pipeline predict` over many images in one call against one call per image, per image: the whole
command (process start, model load, decode, batches of --batch-size) timed from outside, and the same
inside one process (Predictor.predict on every image at once against one image per call), so the gain of
batching alone shows beside the start-up it saves. The images are PNGs of the model's own input size
and mode, written to a temporary folder (or pass --folder).

    python benchmarks/predict_speed.py artifacts/edge                      # 1,000 images, 20 single calls
    python benchmarks/predict_speed.py artifacts/edge --images 1000 --single-calls 50 --model fp32
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.deploy.predict import Predictor, image_paths
from pipeline.rundir import cpu_model

ROOT = Path(__file__).resolve().parent.parent


def write_images(folder: Path, count: int, predictor: Predictor) -> list[Path]:
    p = predictor.preprocessing
    rng = np.random.default_rng(0)
    shape = (p.height, p.width) if p.channels == 1 else (p.height, p.width, 3)
    paths = [folder / f"image_{i:05d}.png" for i in range(count)]
    for path in paths:
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(path)
    return paths


def command_seconds(args: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "pipeline.cli", "predict", *args], check=True, cwd=ROOT,
                   stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--images", type=int, default=1000, help="images of the one call")
    parser.add_argument("--single-calls", type=int, default=20, help="one-image commands timed (their mean is the "
                                                                     "per-image figure)")
    parser.add_argument("--model", default="fp32", help="the exported form, as predict's --model")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--folder", type=Path, help="images to use instead of generated ones")
    args = parser.parse_args()
    predictor = Predictor.load(args.run_dir, args.model)
    with tempfile.TemporaryDirectory(prefix="predict-speed-") as tmp:
        paths = image_paths([args.folder])[:args.images] if args.folder else \
            write_images(Path(tmp), args.images, predictor)
        folder = str(args.folder or tmp)
        many = command_seconds([str(args.run_dir), folder, "--model", args.model, "--batch-size",
                                str(args.batch_size), "--output", str(Path(tmp) / "preds.csv")])
        singles = [command_seconds([str(args.run_dir), str(path), "--model", args.model])
                   for path in paths[:args.single_calls]]
        started = time.perf_counter()
        predictor.predict(paths, batch_size=args.batch_size)
        batched = time.perf_counter() - started
        started = time.perf_counter()
        for path in paths:
            predictor.predict([path])
        one_by_one = time.perf_counter() - started
    n = len(paths)
    single = statistics.mean(singles)
    print(f"{cpu_model()}; {n} PNG images, {predictor.preprocessing.describe()}; {predictor.path}")
    print(f"{'':<44} {'ms per image':>12} {'vs one call':>12}")
    print(f"{'predict, one call over every image':<44} {1000 * many / n:>12.2f} {single / (many / n):>11.0f}x")
    print(f"{f'predict, one call per image (mean of {len(singles)})':<44} {1000 * single:>12.2f} {'1x':>12}")
    print(f"{'in one process: every image at once':<44} {1000 * batched / n:>12.2f} "
          f"{one_by_one / batched:>8.1f}x (vs one by one)")
    print(f"{'in one process: one image per call':<44} {1000 * one_by_one / n:>12.2f}")


if __name__ == "__main__":
    main()
