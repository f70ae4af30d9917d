"""Swap the linear layers of an existing model for ``LowRankLinear``, merge them back, save/load.

PEFT-style matching (``target_modules``, ``exclude_modules``, ``rank_pattern``) and a
torchao-style verb: ``swap_linear_layers(model, LowRankConfig(...))`` works in place and returns a
:class:`SwapReport`.

* :mod:`~lrkd_fast.swap.config`: :class:`LowRankConfig`, layer matching, the report.
* :mod:`~lrkd_fast.swap.init`: svd and whitened factors, input statistics;
  :mod:`~lrkd_fast.swap.sequential`: the sequential whitened init.
* :mod:`~lrkd_fast.swap.core`: :func:`swap_linear_layers`, :func:`merge_linear_layers`.
* :mod:`~lrkd_fast.swap.io`: :func:`save_lowrank`, :func:`load_lowrank`.
"""
from ..model_utils import find_blocks
from ..rank import rank_for_fraction
from .config import ALLOCATIONS, INITS, LayerReport, LowRankConfig, SwapReport, find_target_layers
from .core import merge_linear_layers, swap_linear_layers
from .init import collect_input_grams, whitened_factors
from .io import LAYOUT_FILE, load_lowrank, lowrank_layout, save_lowrank

__all__ = ["LAYOUT_FILE", "LayerReport", "LowRankConfig", "SwapReport", "find_target_layers", "load_lowrank",
           "merge_linear_layers", "save_lowrank", "swap_linear_layers", "whitened_factors"]
