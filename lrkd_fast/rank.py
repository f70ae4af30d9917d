"""Choosing the rank of a low-rank layer: three rules and a dispatcher.

* :func:`rank_by_energy` (spectral energy): the smallest r whose top-r squared singular values hold
  at least ``energy`` of the total, ``sum_{k<=r} s_k^2 >= energy * sum_k s_k^2``. Computed in
  float64 from a (d_out, d_in) weight, or from given singular values. At this rank the truncated
  SVD (``LowRankConfig(init="svd")``) has a relative squared Frobenius error of at most
  ``1 - energy`` (Eckart-Young).
* :func:`rank_by_budget` (parameter budget): the largest r whose factors hold at most ``keep`` of
  the dense layer's parameters, ``r * (d_in + d_out) <= keep * d_in * d_out`` (at least 1). The
  same rule as ``LowRankConfig(rank=<float>)`` (:func:`rank_for_fraction`).
* :func:`rank_by_samples` (sample size): ``r = clamp(round(c * sqrt(n_samples)), min_rank, cap)``
  with ``cap = min(d_in, d_out)`` (and ``max_rank`` if given). The sqrt(n) growth is the claim of
  "Demystifying Low-Rank Knowledge Distillation in LLMs" (arXiv 2603.22355, abstract only:
  r* = O(sqrt(n)) for n distillation samples). The paper gives no constant. The default
  ``c = DEFAULT_SAMPLE_CONSTANT`` comes from this project's own rank sweep
  (``python -m benchmarks.rank_sweep``, results in ``benchmarks/results/rank_sweep/``). That sweep
  is a synthetic linear teacher-student task, so the constant depends on the task (the
  teacher's spectrum, the noise, the layer width). Treat it as a starting point and calibrate ``c``
  with a small sweep on your own data.

:func:`suggest_rank` combines them: pass any of ``energy=``, ``keep=``, ``n_samples=``; each
rule given yields a rank, the smallest is taken (so ``energy=0.9, keep=0.25`` reads "keep 90% of
the energy but never more than a quarter of the parameters"), then clamped to
``[min_rank, min(max_rank, d_in, d_out)]``.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch
from torch import Tensor, nn

from .layers import LowRankLinear

__all__ = ["DEFAULT_SAMPLE_CONSTANT", "break_even_rank", "rank_by_budget", "rank_by_energy", "rank_by_samples",
           "rank_for_fraction", "suggest_rank"]

# r* ~ c * sqrt(n): fitted with the slope fixed at 1/2 to the best held-out ranks of
# benchmarks/rank_sweep.py at its default settings (teacher spectrum s_k = 1/k, label-noise std 0.5,
# 256 x 256 layer, n = 2048 .. 131072, 10 seeds): c = 0.0684, bootstrap 95% CI [0.0676, 0.0693];
# the free fit there gave r* ~ n^(0.529 +- 0.009). Task-dependent: the same sweep gives c = 0.030 for
# a 1/k^1.5 spectrum and 0.128 for 1/k^0.75 (benchmarks/results/rank_sweep/README.md).
DEFAULT_SAMPLE_CONSTANT = 0.068

# Relative slack in the energy comparison, so an energy that is exactly reached (e.g. 20/21 for
# singular values 4, 2, 1) is not missed by a rounding error in the cumulative sum.
_ENERGY_RTOL = 1e-12

WeightLike = Union[Tensor, nn.Linear, LowRankLinear, Sequence[float]]


# ------------------------------------------------------------------------------------ validation

def _check_fraction(name: str, v) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not 0.0 < v <= 1.0:
        raise ValueError(f"{name} must be a number in (0, 1], got {v!r}")
    return float(v)


def _check_pos_int(name: str, v) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{name} must be an int >= 1, got {v!r}")
    return v


def _check_dims(d_in, d_out) -> tuple[int, int]:
    return _check_pos_int("d_in", d_in), _check_pos_int("d_out", d_out)


def _as_float64(name: str, x) -> Tensor:
    if isinstance(x, (nn.Linear, LowRankLinear)):
        x = x.weight  # (out_features, in_features)
    try:
        t = torch.as_tensor(x.detach() if isinstance(x, Tensor) else x)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ValueError(f"{name} must be a tensor, array or sequence of numbers, got {type(x).__name__}") from exc
    if not (t.is_floating_point() or t.dtype in (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)):
        raise ValueError(f"{name} must hold real numbers, got dtype {t.dtype}")
    t = t.to(torch.float64)
    if t.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(t.shape)})")
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} has non-finite entries (nan or inf)")
    return t


# ------------------------------------------------------------------------------------ rules

def rank_for_fraction(keep: float, d_in: int, d_out: int) -> int:
    """Largest rank whose factors hold at most ``keep`` of the dense layer's parameters (>= 1):
    :func:`rank_by_budget` with the fraction first, the rule of ``LowRankConfig(rank=<float>)``."""
    d_in, d_out = _check_dims(d_in, d_out)
    keep = _check_fraction("keep", keep)
    return max(1, min(min(d_in, d_out), math.floor(keep * d_in * d_out / (d_in + d_out))))


def break_even_rank(d_in: int, d_out: int) -> int:
    """Largest rank whose factors ``r * (d_in + d_out)`` hold no more parameters than the dense
    ``d_in * d_out`` weight: above it a low-rank layer is larger than the layer it replaces."""
    d_in, d_out = _check_dims(d_in, d_out)
    return max(1, d_in * d_out // (d_in + d_out))


def rank_by_energy(weight_or_singular_values: WeightLike, energy: float = 0.9) -> int:
    """Smallest r with ``sum_{k<=r} s_k^2 >= energy * sum_k s_k^2``.

    weight_or_singular_values: a 2-D (d_out, d_in) weight (tensor, array, ``nn.Linear`` or
        ``LowRankLinear``; its singular values are computed in float64), or a 1-D sequence of
        singular values (>= 0, any order).
    energy: the fraction of the squared Frobenius norm to keep, in (0, 1]. The comparison allows a
        relative 1e-12, so ``energy=1`` gives the number of singular values that are not negligible.

    A zero matrix holds no energy; every rank keeps "all" of it, so the answer is 1.
    """
    energy = _check_fraction("energy", energy)
    t = _as_float64("weight_or_singular_values", weight_or_singular_values)
    if t.dim() == 2:
        s = torch.linalg.svdvals(t)
    elif t.dim() == 1:
        if (t < 0).any():
            raise ValueError("singular values must be >= 0, got a negative entry")
        s = t.sort(descending=True).values
    else:
        raise ValueError(f"weight_or_singular_values must be a 2-D weight (d_out, d_in) or 1-D singular values, "
                         f"got {t.dim()}-D shape {tuple(t.shape)}")
    e = s.square()
    total = e.sum()
    if total == 0:
        return 1
    cum = torch.cumsum(e, 0)
    hit = (cum >= energy * total * (1.0 - _ENERGY_RTOL)).nonzero()
    return int(hit[0, 0].item()) + 1 if len(hit) else len(s)


def rank_by_budget(d_in: int, d_out: int, keep: float) -> int:
    """Largest r with ``r * (d_in + d_out) <= keep * d_in * d_out``, between 1 and min(d_in, d_out).

    keep: fraction of the dense layer's ``d_in * d_out`` weights the two factors may hold, in (0, 1].
    A budget below one rank-1 layer still gives 1. Identical to ``LowRankConfig(rank=keep)``.
    """
    return rank_for_fraction(keep, d_in, d_out)


def rank_by_samples(n_samples: int, d_in: int, d_out: int, c: float = DEFAULT_SAMPLE_CONSTANT, *,
                    min_rank: int = 1, max_rank: Optional[int] = None) -> int:
    """``clamp(round(c * sqrt(n_samples)), min_rank, min(d_in, d_out, max_rank))``.

    n_samples: number of distillation samples (for a token-level loss, the number of tokens whose
        activations the layer is fitted on). ``round`` rounds halves up.
    c: the constant in front of sqrt(n); positive. The default is this project's measurement on a
        synthetic task (see the module docstring): task-dependent.
    min_rank, max_rank: extra bounds; the layer's own limit min(d_in, d_out) always wins.
    """
    n_samples = _check_pos_int("n_samples", n_samples)
    d_in, d_out = _check_dims(d_in, d_out)
    if isinstance(c, bool) or not isinstance(c, (int, float)) or not math.isfinite(c) or c <= 0:
        raise ValueError(f"c must be a finite number > 0, got {c!r}")
    r = math.floor(c * math.sqrt(n_samples) + 0.5)
    return _clamp(r, d_in, d_out, min_rank, max_rank)


def _clamp(r: int, d_in: int, d_out: int, min_rank: int, max_rank: Optional[int]) -> int:
    min_rank = _check_pos_int("min_rank", min_rank)
    cap = min(d_in, d_out)
    if max_rank is not None:
        cap = min(cap, _check_pos_int("max_rank", max_rank))
    return max(1, min(max(r, min_rank), cap))


# ------------------------------------------------------------------------------------ dispatcher

def suggest_rank(weight: Optional[WeightLike] = None, *, energy: Optional[float] = None,
                 keep: Optional[float] = None, n_samples: Optional[int] = None,
                 shape: Optional[Sequence[int]] = None, c: float = DEFAULT_SAMPLE_CONSTANT,
                 min_rank: int = 1, max_rank: Optional[int] = None) -> int:
    """A rank for a (d_out, d_in) layer from any of the three rules; the smallest rank wins.

    weight: the dense (d_out, d_in) weight (tensor, ``nn.Linear`` or ``LowRankLinear``); needed for
        ``energy``. For
        ``keep`` / ``n_samples`` alone, ``shape=(d_out, d_in)`` is enough.
    energy: spectral-energy rule (:func:`rank_by_energy`).
    keep: parameter-budget rule (:func:`rank_by_budget`).
    n_samples: sample-size rule (:func:`rank_by_samples`, with constant ``c``).
    min_rank, max_rank: final bounds, applied after the rules; min(d_in, d_out) always caps.

    Example: ``suggest_rank(layer, energy=0.95, keep=0.5)`` keeps 95% of the spectral energy unless
    that would cost more than half of the layer's parameters.
    """
    if energy is None and keep is None and n_samples is None:
        raise ValueError("suggest_rank needs at least one rule: energy=, keep= or n_samples=")
    w = None
    if weight is not None:
        w = _as_float64("weight", weight)
        if w.dim() != 2:
            raise ValueError(f"weight must be 2-D (d_out, d_in), got {w.dim()}-D shape {tuple(w.shape)}")
    if shape is not None:
        if (not isinstance(shape, (tuple, list, torch.Size)) or len(shape) != 2
                or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in shape)):
            raise ValueError(f"shape must be (d_out, d_in), two ints >= 1, got {shape!r}")
        if w is not None and tuple(w.shape) != tuple(shape):
            raise ValueError(f"shape {tuple(shape)} does not match weight shape {tuple(w.shape)}")
        d_out, d_in = shape
    elif w is not None:
        d_out, d_in = w.shape
    else:
        raise ValueError("suggest_rank needs weight= or shape=(d_out, d_in) to know the layer's size")
    candidates = []
    if energy is not None:
        if w is None:
            raise ValueError("energy= needs the weight (its singular values), not just shape=")
        candidates.append(rank_by_energy(w, energy))
    if keep is not None:
        candidates.append(rank_by_budget(d_in, d_out, keep))
    if n_samples is not None:
        candidates.append(rank_by_samples(n_samples, d_in, d_out, c))
    return _clamp(min(candidates), d_in, d_out, min_rank, max_rank)
