"""ONNX / TensorRT export and the sampling backends (imported as lad_fast.export)."""
