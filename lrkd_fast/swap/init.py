"""How a swapped layer starts: truncated SVD, the activation-aware (whitened) factors and the
input statistics they need. The sequential variant is in :mod:`lrkd_fast.swap.sequential`."""
from __future__ import annotations

from typing import Iterable, Optional

import torch
from torch import nn

from ..layers import LowRankLinear, svd_factors
from ..model_utils import as_model_inputs, run_model, token_rows
from .config import LayerReport, LowRankConfig, dense_weight

__all__ = ["collect_input_grams", "factors_at", "make_lowrank", "whitened_factors", "whitened_svd"]


def whitened_svd(weight: torch.Tensor, gram: torch.Tensor, damping: float, cross: Optional[torch.Tensor] = None,
                 name: Optional[str] = None):
    """(L, A, S, Bh): the Cholesky factor of the damped Gram matrix and the SVD of ``L^{-1} gram W^T``.

    With ``cross`` = E[x' x^T] (``gram`` then being E[x' x'^T] of other inputs x'), the SVD is of
    ``L^{-1} cross W^T`` instead: the rank-r factors then minimize E||W x - (U V)^T x'||^2.
    ``name``: the layer's module name, for the error a non-finite or singular Gram matrix raises."""
    w = weight.detach().to(torch.float64)
    g = gram.to(device=w.device, dtype=torch.float64)
    d = g.shape[0]
    if g.shape != (d, d) or d != w.shape[1]:
        raise ValueError(f"gram must be (d_in, d_in) = ({w.shape[1]}, {w.shape[1]}) for a weight of shape "
                         f"{tuple(w.shape)}, got {tuple(g.shape)}")
    if not damping >= 0:
        raise ValueError(f"damping must be >= 0, got {damping}")
    where = f"layer {name!r}" if name else "whitened init"
    c = g if cross is None else cross.to(device=w.device, dtype=torch.float64)
    if not torch.isfinite(w).all():
        raise ValueError(f"{where}: its dense weight holds NaN or inf")
    if not (torch.isfinite(g).all() and torch.isfinite(c).all()):
        raise ValueError(f"{where}: the input statistics (Gram matrix of the calibration inputs) hold NaN or inf; "
                         "check the calibration data, and the model's activations on it, for NaN/inf")
    eps = damping * g.diagonal().mean().clamp_min(1e-12)
    L, info = torch.linalg.cholesky_ex(g + eps * torch.eye(d, dtype=g.dtype, device=g.device))
    singular = (f"{where}: the Gram matrix of its calibration inputs (+ damping={damping} x its mean diagonal) is "
                "not positive definite{}: the inputs are rank-deficient (dead features, padding, fewer unmasked "
                "tokens than d_in). Use damping > 0 (LowRankConfig(damping=1e-2)), or more / more varied "
                "calibration data")
    if info.item() != 0:
        raise ValueError(singular.format(f" (Cholesky failed at column {info.item()} of {d})"))
    B = torch.linalg.solve_triangular(L, c @ w.t(), upper=False)
    if not torch.isfinite(B).all():  # a pivot that rounding left barely above 0
        raise ValueError(singular.format(" (numerically: its whitened weight overflows)"))
    A, S, Bh = torch.linalg.svd(B, full_matrices=False)
    return L, A, S, Bh


def factors_at(decomposition, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """U, V at ``rank`` from :func:`whitened_svd`'s (L, A, S, Bh)."""
    L, A, S, Bh = decomposition
    if not 1 <= rank <= len(S):
        raise ValueError(f"rank must be in 1..{len(S)}, got {rank}")
    root = S[:rank].sqrt()
    U = torch.linalg.solve_triangular(L.t(), A[:, :rank], upper=True) * root
    V = root[:, None] * Bh[:rank]
    return U, V


def whitened_factors(weight: torch.Tensor, gram: torch.Tensor, rank: int, damping: float = 1e-2,
                     name: Optional[str] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Activation-aware factors of a (d_out, d_in) weight.

    With ``gram`` = E[x x^T] of the layer's inputs, minimizes E||x W^T - x U V||^2 over rank-``rank``
    U V: with ``gram + damping*mean(diag) I = L L^T`` (Cholesky), take the rank-r SVD of
    ``B = L^{-1} gram W^T`` (= (W L)^T up to the damping) ``= A S Bh``; then
    ``U = L^{-T} A_r S_r^{1/2}``, ``V = S_r^{1/2} Bh_r``. The expected output error at rank r is
    ``sum_{i>r} S_i^2`` (up to the damping).

    Computed in float64. ``name``: the layer's module name, for errors (NaN inputs, a singular Gram
    matrix with ``damping=0``).
    """
    return factors_at(whitened_svd(weight, gram, damping, name=name), rank)


def as_batches(batches):
    """Calibration batches as a sized sequence; an empty one is an error."""
    if batches is None:
        raise ValueError("calibration is None: pass a list of batch dicts (or tensors of input ids)")
    batches = list(batches) if not hasattr(batches, "__len__") else batches
    if len(batches) == 0:
        raise ValueError("calibration data is empty: whitened init needs at least one batch")
    return batches


class _GramSum:
    """Running sums of x^T x in float64 (each batch's product taken in float32: fast and plenty exact)."""

    def __init__(self):
        self.sums, self.counts = {}, {}

    def add(self, key, x):
        xf = x.float()
        g = (xf.t() @ xf).double()
        self.sums[key] = g if key not in self.sums else self.sums[key] + g
        self.counts[key] = self.counts.get(key, 0) + x.shape[0]

    def mean(self, key):
        if not self.counts.get(key):
            raise ValueError(f"calibration data never reached layer {key!r} (no unmasked inputs)")
        return self.sums[key] / self.counts[key]


@torch.no_grad()
def collect_input_grams(model: nn.Module, layers: dict[str, nn.Module], batches: Iterable,
                        forward=None, progress: bool = True) -> dict[str, torch.Tensor]:
    """Run ``model`` over ``batches`` and return, per layer name, the mean of x^T x over its inputs
    (float64, d_in x d_in). Only these statistics are held, never the activations.

    ``batches`` yields dicts of model keyword arguments (or tensors of input ids); ``forward`` can
    override how a batch is fed (``forward(model, batch)``). Rows where an ``attention_mask`` in the
    batch is 0 (padding) are left out.
    """
    from tqdm.auto import tqdm

    batches = as_batches(batches)
    grams = _GramSum()
    mask = [None]

    def hook(name):
        def fn(module, args):
            grams.add(name, token_rows(args[0], mask[0]))
        return fn

    handles = [model.get_submodule(n).register_forward_pre_hook(hook(n)) for n in layers]
    was_training = model.training
    model.eval()
    try:
        for batch in tqdm(batches, desc="calibrating", disable=not progress):
            mask[0] = None if forward is not None else as_model_inputs(batch).get("attention_mask")
            run_model(model, batch, forward)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return {n: grams.mean(n) for n in layers}


def make_lowrank(name: str, m: nn.Module, r: int, config: LowRankConfig, stats: Optional[torch.Tensor],
                 factors=None) -> tuple[LowRankLinear, LayerReport]:
    """The low-rank layer for dense ``m`` at rank ``r`` with ``config.init`` (``stats``: the input Gram
    matrix for "whitened"); ``factors`` (U, V) skip the init's own computation."""
    w, b, kind = dense_weight(m)
    d_out, d_in = w.shape
    new = LowRankLinear(d_in, d_out, r, bias=b is not None, dtype=w.dtype, device=w.device)
    new.dense_kind = kind
    with torch.no_grad():
        if factors is not None:
            U, V = factors
        elif config.init == "svd":
            U, V = svd_factors(w, r)
        elif config.init == "whitened":
            U, V = whitened_factors(w, stats, r, config.damping, name=name)
        if factors is not None or config.init != "random":
            new.U.copy_(U)
            new.V.copy_(V)
        if b is not None:
            new.bias.copy_(b)
        w64 = w.detach().double()
        err = (torch.linalg.matrix_norm(w64 - (new.U.double() @ new.V.double()).t())
               / torch.linalg.matrix_norm(w64).clamp_min(1e-30)).item()
    new.train(m.training)
    return new, LayerReport(name, d_in, d_out, r, d_in * d_out, r * (d_in + d_out), err)
