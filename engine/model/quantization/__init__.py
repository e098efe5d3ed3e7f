"""Quantization: the per-layer method seam (base.py) and its methods; see base.py's docstring."""

from engine.model.quantization.base import LinearMethodBase, QuantizationConfig, QuantizeMethodBase
from engine.model.quantization.unquantized import UnquantizedConfig, UnquantizedLinearMethod

__all__ = [
    "LinearMethodBase",
    "QuantizationConfig",
    "QuantizeMethodBase",
    "UnquantizedConfig",
    "UnquantizedLinearMethod",
]
