"""The deployment side: ONNX I/O, quantization, TensorRT runtime, timing and the bench file."""
