"""Fused ops: each module holds the eager reference, the autograd/custom-op wrapper around the
Triton kernels, and the functional API."""
from .lowrank_linear import lowrank_linear, lowrank_linear_reference

__all__ = ["lowrank_linear", "lowrank_linear_reference"]
