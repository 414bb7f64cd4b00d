"""Exporters (imported as `edgecpm.exporters`): the ONNX graph builder, later the TensorRT engine builder."""
