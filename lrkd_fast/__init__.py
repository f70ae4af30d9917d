"""lrkd_fast: fast low-rank knowledge distillation.

Fused Triton kernels for low-rank layers and distillation losses, with eager PyTorch references
beside each op (:mod:`lrkd_fast.ops`), and the layer that swaps them into Hugging Face models.
"""
from .backend import BackendUnavailableError, get_backend, set_backend
from .clone import LowRankClone
from .data import TextBatches
from .distillation import DistillConfig, Distiller, distill
from .layers import LowRankLinear
from .ops import CloneLoss, KDLoss, clone_loss, clone_mse, kd_loss, lowrank_linear
from .rank import rank_by_budget, rank_by_energy, rank_by_samples, suggest_rank
from .swap import LowRankConfig, SwapReport, load_lowrank, merge_linear_layers, save_lowrank, swap_linear_layers
from .training import TrainConfig, TrainingLoop

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
    "SwapReport",
    "TextBatches",
    "TrainConfig",
    "TrainingLoop",
    "clone_loss",
    "clone_mse",
    "distill",
    "get_backend",
    "kd_loss",
    "load_lowrank",
    "lowrank_linear",
    "merge_linear_layers",
    "rank_by_budget",
    "rank_by_energy",
    "rank_by_samples",
    "save_lowrank",
    "set_backend",
    "suggest_rank",
    "swap_linear_layers",
]

_MOVED = {"clone_loss_reference": "ops", "kd_loss_reference": "ops", "lowrank_linear_reference": "ops",
          "DEFAULT_SAMPLE_CONSTANT": "rank"}


def __getattr__(name):
    # the eager references and tuning constants live in their modules; the old top-level names still resolve
    if name in _MOVED:
        import importlib
        import warnings

        warnings.warn(f"lrkd_fast.{name} moved: import it from lrkd_fast.{_MOVED[name]}", DeprecationWarning,
                      stacklevel=2)
        return getattr(importlib.import_module(f"lrkd_fast.{_MOVED[name]}"), name)
    raise AttributeError(f"module 'lrkd_fast' has no attribute {name!r}")
