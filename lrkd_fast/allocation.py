"""Spreading one parameter budget over many low-rank layers (``LowRankConfig(allocation="sensitivity")``).

A uniform rule (every layer keeps the same fraction of its parameters) spends as much on a layer
whose truncation barely moves the model's output as on one that matters a lot. The sensitivity
rule measures, then spends:

1. Each layer's whitened spectrum ``s_1 >= s_2 >= ...`` (see :func:`lrkd_fast.swap.whitened_factors`):
   at rank r the layer's expected output error on the calibration inputs is ``sum_{i>r} s_i^2``.
2. Each layer's *sensitivity*: the model's final-output error (relative squared error of the last
   hidden state over real tokens) when that layer alone is cut to its uniform rank ``r0``, divided
   by the layer error it caused, ``sum_{i>r0} s_i^2``. This converts layer error into model error.
3. A greedy allocation: rank steps of all layers, valued ``sensitivity * s_i^2 / (d_in + d_out)``
   (model error removed per parameter), taken best first until the uniform rule's total is spent.
   Within a layer the values fall with i, so each layer gets a prefix of its spectrum.

The model-error model is additive and linear in each layer's error (first order). It is a ranking
device, not a prediction. Measured on all-MiniLM-L6-v2 at 50% of the encoder's linear parameters
(2-CPU machine, 2026-11-30): held-out sentence-embedding cosine 0.864 at the start vs 0.842
uniform, and 0.956 vs 0.945 after ~9 minutes of distillation (``lrkd-fast distill --minutes 8.6``);
see README.md and benchmarks/results/swap_variants/.
"""
from __future__ import annotations

from typing import Mapping

import torch

__all__ = ["allocate_ranks"]


def allocate_ranks(spectra: Mapping[str, torch.Tensor], costs: Mapping[str, int], budget: int,
                   weights: Mapping[str, float], min_ranks: Mapping[str, int],
                   max_ranks: Mapping[str, int]) -> dict[str, int]:
    """Greedy ranks under a parameter budget.

    spectra: per layer, the squared singular values that rank steps buy (non-increasing).
    costs: parameters per rank step (``d_in + d_out``).
    budget: total parameters the ranks may use, ``sum(rank * cost) <= budget``.
    weights: per layer, how much one unit of its spectrum is worth (the sensitivity).
    min_ranks / max_ranks: bounds per layer; the minimums are paid first.

    Returns ``{name: rank}`` in the order of ``spectra``. Ties go to the earlier layer.
    """
    names = list(spectra)
    if not names:
        raise ValueError("spectra is empty: no layers to allocate ranks to")
    for what, m in (("costs", costs), ("weights", weights), ("min_ranks", min_ranks), ("max_ranks", max_ranks)):
        missing = [n for n in names if n not in m]
        if missing:
            raise ValueError(f"{what} lacks layers {missing[:4]}")
    for n in names:
        if costs[n] < 1:
            raise ValueError(f"costs[{n!r}] must be >= 1, got {costs[n]}")
        if not 1 <= min_ranks[n] <= max_ranks[n] <= len(spectra[n]):
            raise ValueError(f"layer {n!r}: need 1 <= min rank ({min_ranks[n]}) <= max rank ({max_ranks[n]}) "
                             f"<= spectrum length ({len(spectra[n])})")
        if not weights[n] >= 0:
            raise ValueError(f"weights[{n!r}] must be >= 0, got {weights[n]}")
    ranks = {n: min_ranks[n] for n in names}
    left = budget - sum(ranks[n] * costs[n] for n in names)
    if left < 0:
        raise ValueError(f"budget {budget:,} is below the minimum ranks' {budget - left:,} parameters")
    steps = []
    for order, n in enumerate(names):
        s = spectra[n].detach().to(torch.float64).cpu()
        vals = (s[min_ranks[n]:max_ranks[n]] * (weights[n] / costs[n])).tolist()
        steps += [(-v, order, i, n) for i, v in enumerate(vals)]
    steps.sort()
    for _, _, _, n in steps:
        if costs[n] <= left:  # within a layer the cost is fixed, so a step that no longer fits means all
            ranks[n] += 1     # its later (smaller) steps do not either: ranks stay prefixes
            left -= costs[n]
    return ranks
