"""lrkd_fast: fast low-rank knowledge distillation.

Fused Triton kernels for low-rank layers and distillation losses, with eager PyTorch references
beside each op, and the layer that swaps them into Hugging Face models.
"""
from .backend import BackendUnavailableError, get_backend, set_backend
from .layers import LowRankLinear
from .ops import (CloneLoss, KDLoss, clone_loss, clone_loss_reference, clone_mse, kd_loss, kd_loss_reference,
                  lowrank_linear, lowrank_linear_reference)
from .swap import LowRankConfig, load_lowrank, merge_linear_layers, save_lowrank, swap_linear_layers
from .distillation import DistillConfig, Distiller, distill
from .clone import LowRankClone
from .rank import DEFAULT_SAMPLE_CONSTANT, rank_by_budget, rank_by_energy, rank_by_samples, suggest_rank

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError",
    "CloneLoss",
    "DistillConfig",
    "Distiller",
    "KDLoss",
    "LowRankClone",
    "LowRankConfig",
    "LowRankLinear",
    "clone_loss",
    "clone_loss_reference",
    "clone_mse",
    "distill",
    "kd_loss",
    "kd_loss_reference",
    "load_lowrank",
    "merge_linear_layers",
    "rank_by_budget",
    "rank_by_energy",
    "rank_by_samples",
    "suggest_rank",
    "DEFAULT_SAMPLE_CONSTANT",
    "save_lowrank",
    "swap_linear_layers",
    "get_backend",
    "lowrank_linear",
    "lowrank_linear_reference",
    "set_backend",
]
