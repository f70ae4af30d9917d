"""lrkd_fast: fast low-rank knowledge distillation.

Fused Triton kernels for low-rank layers and distillation losses, with eager PyTorch references
beside each op, and the layer that swaps them into Hugging Face models.
"""
from .backend import BackendUnavailableError, get_backend, set_backend
from .layers import LowRankLinear
from .ops import lowrank_linear, lowrank_linear_reference

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError",
    "LowRankLinear",
    "get_backend",
    "lowrank_linear",
    "lowrank_linear_reference",
    "set_backend",
]
