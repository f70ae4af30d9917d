"""The two verbs: :func:`swap_linear_layers` (dense -> low-rank, in place) and
:func:`merge_linear_layers` (low-rank -> dense, in place)."""
from __future__ import annotations

from typing import Optional

from torch import nn

from ..allocation import sensitivity_ranks
from ..layers import LowRankLinear
from ..model_utils import set_module
from .config import LowRankConfig, SwapReport, dense_weight, find_target_layers, layer_ranks
from .init import as_batches, collect_input_grams, factors_at, make_lowrank, whitened_svd
from .sequential import outside_blocks, sequential_swap

__all__ = ["merge_linear_layers", "swap_linear_layers"]


def swap_linear_layers(model: nn.Module, config: Optional[LowRankConfig] = None, calibration=None,
                       forward=None, progress: bool = True) -> SwapReport:
    """Replace the selected dense layers of ``model`` by ``LowRankLinear`` in place.

    calibration: batches for ``init="whitened"`` (see :func:`collect_input_grams`).
    forward: ``forward(model, batch)`` to feed a calibration batch instead of ``model(**batch)``.
    Returns a :class:`SwapReport` (print it for a per-layer table).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    config = config or LowRankConfig()
    if not isinstance(config, LowRankConfig):
        raise TypeError(f"config must be a LowRankConfig, got {type(config).__name__}")
    layers = find_target_layers(model, config)
    ranks = layer_ranks(layers, config)
    stats = {n: None for n in layers}
    if config.init == "whitened":
        if calibration is None:
            raise ValueError("init='whitened' needs calibration batches: swap_linear_layers(model, config, "
                             "calibration=[{'input_ids': ..., 'attention_mask': ...}, ...])")
        # the sequential init fits the layers inside the blocks from its own statistics; the sensitivity
        # measurement still needs every layer's
        need = layers if config.allocation == "sensitivity" or not config.sequential else \
            {n: layers[n] for n in outside_blocks(model, layers)}
        if need:
            stats.update(collect_input_grams(model, need, calibration, forward=forward, progress=progress))
    if config.allocation == "sensitivity":
        def truncation(name, rank):
            decomposition = whitened_svd(dense_weight(layers[name])[0], stats[name], config.damping, name=name)
            build = lambda: make_lowrank(name, layers[name], rank, config, None,
                                         factors=factors_at(decomposition, rank))[0]
            return decomposition[2].pow(2), build

        shapes = {n: tuple(dense_weight(m)[0].shape) for n, m in layers.items()}
        batches = list(as_batches(calibration))[:config.sensitivity_batches]
        ranks = sensitivity_ranks(model, ranks, shapes, truncation, batches, forward, progress)
    if config.sequential:
        done = sequential_swap(model, layers, ranks, stats, config, calibration, forward, progress)
        return SwapReport([done[n] for n in layers], config.init, config.allocation)
    reports = []
    for name, m in layers.items():
        new, report = make_lowrank(name, m, ranks[name], config, stats[name])
        set_module(model, name, new)
        reports.append(report)
    return SwapReport(reports, config.init, config.allocation)


def merge_linear_layers(model: nn.Module) -> nn.Module:
    """Replace every ``LowRankLinear`` in ``model`` by the dense layer it computes, in place.

    The merged model is an ordinary model of its family and loads with ``AutoModel*.from_pretrained``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    names = [n for n, m in model.named_modules() if isinstance(m, LowRankLinear)]
    if not names:
        raise ValueError(f"{type(model).__name__} has no LowRankLinear layers to merge")
    for n in names:
        m = model.get_submodule(n)
        dense = m.to_dense()
        dense.train(m.training)
        set_module(model, n, dense)
    return model
