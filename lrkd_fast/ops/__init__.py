"""Fused ops: each module holds the eager reference, the autograd/custom-op wrapper around the
Triton kernels, and the functional API."""
from .clone_loss import CloneLoss, clone_loss, clone_loss_reference, clone_mse
from .kd_loss import KDLoss, kd_loss, kd_loss_reference
from .lowrank_linear import lowrank_linear, lowrank_linear_reference

__all__ = ["CloneLoss", "KDLoss", "clone_loss", "clone_loss_reference", "clone_mse", "kd_loss", "kd_loss_reference",
           "lowrank_linear", "lowrank_linear_reference"]
