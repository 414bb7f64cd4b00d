"""Quantization as data: specs, numpy reference formats, BitCPM ternary and GPTQ conversion."""

from edgecpm.quant.spec import QuantSpec, TensorQuant

__all__ = ["QuantSpec", "TensorQuant"]
