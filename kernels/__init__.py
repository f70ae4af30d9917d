"""Triton kernels and their thin launchers (tensors in, tensors out).

Installed as ``lrkd_fast.kernels``. Nothing here knows about autograd, modules or models; the
autograd wrappers and the eager references live in ``lrkd_fast.ops``.
"""
from .matmul import chain_matmul, matmul

__all__ = ["chain_matmul", "matmul"]
