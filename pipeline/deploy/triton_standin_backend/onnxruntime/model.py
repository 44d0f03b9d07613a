"""TEST STAND-IN for Triton's onnxruntime backend: NOT the production backend.

Triton's real onnxruntime backend is a C++ library (libtriton_onnxruntime.so) shipped in NVIDIA's
tritonserver images; it is on neither PyPI nor Debian. When that library is missing, Triton core loads
`<backend-directory>/onnxruntime/model.py` with its python backend instead (a "Python-based backend").
This file is that model.py: it runs `<model>/<version>/model.onnx` with ONNX Runtime on the CPU, so the
run's unchanged `config.pbtxt` files load in the tritonserver binary that `nvidia-pytriton` bundles. It
exists for this project's tests and CPU serving benchmarks only; it ignores the config's `optimization`
block (no TensorRT accelerator) and its instances always run on the CPU.

It runs inside the server environment's Python (numpy < 2 for the python backend stub), never in the
project's own environment.
"""

import json
import os
from pathlib import Path

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        path = Path(args["model_repository"]) / args["model_version"] / config.get("default_model_filename",
                                                                                   "model.onnx")
        options = ort.SessionOptions()
        threads = int(os.environ.get("ONE_PIPELINE_STANDIN_THREADS", "0"))  # 0: ONNX Runtime's default
        options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.inputs = [t["name"] for t in config["input"]]
        self.outputs = [t["name"] for t in config["output"]]

    def execute(self, requests):
        """Run the requests the dynamic batcher gathered as one ONNX Runtime call, then split the results."""
        feeds = [{name: pb_utils.get_input_tensor_by_name(r, name).as_numpy() for name in self.inputs}
                 for r in requests]
        sizes = [feed[self.inputs[0]].shape[0] for feed in feeds]
        batch = {name: np.concatenate([feed[name] for feed in feeds]) for name in self.inputs}
        results = self.session.run(self.outputs, batch)
        responses, start = [], 0
        for size in sizes:
            tensors = [pb_utils.Tensor(name, np.ascontiguousarray(value[start:start + size]))
                       for name, value in zip(self.outputs, results)]
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
            start += size
        return responses
