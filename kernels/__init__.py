"""Triton kernels and their thin launchers (tensors in, tensors out).

Installed as ``lrkd_fast.kernels``. Nothing here knows about autograd, modules or models; the
autograd wrappers and the eager references live in ``lrkd_fast.ops``.
"""
from .clone_loss import grouped_mse, projected_mse
from .kd_loss import kd_loss_rows
from .matmul import chain_matmul, lowrank_decode

__all__ = ["chain_matmul", "grouped_mse", "kd_loss_rows", "lowrank_decode", "projected_mse"]
