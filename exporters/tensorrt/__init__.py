"""TensorRT engines from a bundle's `standard` graph (imported as `edgecpm.exporters.tensorrt`).

Nothing here imports tensorrt at module import time: `build.build_engine` does, on the target. `pin` holds what
pins an engine to a machine, `onnx_support` which graphs TensorRT's ONNX parser takes.
"""
