"""What the server adds: accuracy, latency and throughput of one model measured through Triton's HTTP API.

The client is tritonclient (KServe v2 over HTTP, binary tensors), one connection per client thread, on
the same machine as the server: the figures include serialization, the HTTP round trip, Triton's
scheduler (dynamic batching) and the backend, which the in-process rows do not.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from pipeline.deploy.timing import latency


class ServedModel:
    """One model on a running server; `predict` returns the first output's arrays."""

    def __init__(self, http_url: str, model: str):
        import tritonclient.http as httpclient

        self._http, self.url, self.model = httpclient, http_url, model
        self._local = threading.local()  # a tritonclient HTTP client is not thread-safe: one per thread
        meta = self.client().get_model_metadata(model)
        self.input, self.input_type = meta["inputs"][0]["name"], meta["inputs"][0]["datatype"]
        self.output = meta["outputs"][0]["name"]

    def client(self) -> Any:
        if not hasattr(self._local, "client"):
            self._local.client = self._http.InferenceServerClient(self.url, network_timeout=120)
        return self._local.client

    def close(self) -> None:
        """Close this thread's client. Each thread must close its own: tritonclient's HTTP client runs on
        gevent, and one closed by the garbage collector from another thread fails in gevent."""
        client = self._local.__dict__.pop("client", None)
        if client is not None:
            client.close()

    def predict(self, images: np.ndarray) -> np.ndarray:
        tensor = self._http.InferInput(self.input, list(images.shape), self.input_type)
        tensor.set_data_from_numpy(images, binary_data=True)
        output = self._http.InferRequestedOutput(self.output, binary_data=True)
        return self.client().infer(self.model, [tensor], outputs=[output]).as_numpy(self.output)


def served_predictions(served: ServedModel, images: np.ndarray, batch: int) -> np.ndarray:
    """Top-1 class of every image, sent in requests of at most `batch` images."""
    return np.concatenate([served.predict(images[i:i + batch]).argmax(1) for i in range(0, len(images), batch)])


def concurrent_throughput(served: ServedModel, images: np.ndarray, *, concurrency: int, warmup: int,
                          iterations: int) -> float:
    """Images per second with `concurrency` clients each sending `iterations` requests of `images`, timed
    from the moment every client has warmed up (`warmup` requests) to the last one's end."""
    ready = threading.Barrier(concurrency + 1)

    def client_loop() -> float:
        try:
            for _ in range(warmup):
                served.predict(images)
            ready.wait()  # every thread's connection open and warm
            ready.wait()  # the clock has started
            for _ in range(iterations):
                served.predict(images)
            return time.perf_counter()
        except BaseException:
            ready.abort()  # the other threads and the clock stop waiting
            raise
        finally:
            served.close()

    with ThreadPoolExecutor(concurrency) as pool:
        futures = [pool.submit(client_loop) for _ in range(concurrency)]
        try:
            ready.wait()
            start = time.perf_counter()
            ready.wait()
        except threading.BrokenBarrierError:
            pass  # a client failed: its error is raised below
        errors = [e for e in (f.exception() for f in futures) if e]
    if errors:  # the client that failed first, not the ones its abort() woke
        raise next((e for e in errors if not isinstance(e, threading.BrokenBarrierError)), errors[0])
    return len(images) * iterations * concurrency / (max(f.result() for f in futures) - start)


def measure_served(http_url: str, model: str, images: np.ndarray, labels: np.ndarray, *, max_batch: int,
                   throughput_batch: int, concurrency: int = 8, warmup: int = 10, iterations: int = 100,
                   throughput_iterations: int = 20) -> dict:
    """Bench-row figures for `model` on the server at `http_url`: top-1 over `images` (sent in requests of
    max_batch), batch-1 latency at concurrency 1, and images/s at `concurrency` clients sending batches of
    throughput_batch. `predictions` holds each image's top-1 (for agreement with the other rows)."""
    served = ServedModel(http_url, model)
    try:
        predictions = served_predictions(served, images, max_batch)
        one = images[:1]  # sliced once, outside the timed call
        lat = latency(lambda: served.predict(one), warmup=warmup, iterations=iterations, device=torch.device("cpu"))
        batch = images[:throughput_batch]
        ips = concurrent_throughput(served, batch, concurrency=concurrency, warmup=min(warmup, 3),
                                    iterations=throughput_iterations)
    finally:
        served.close()
    correct = int(np.sum(predictions == labels))  # top-1 % as pipeline.training.evaluate computes it
    return {"predictions": predictions, "accuracy": float(100.0 * correct / max(len(labels), 1)),
            "images": len(images),
            "latency_ms": lat.figures(warmup),
            "throughput": [{"images_per_s": round(ips, 1), "batch": len(batch), "warmup": min(warmup, 3),
                            "iterations": throughput_iterations * concurrency}]}
