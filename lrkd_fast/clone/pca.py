"""The data-informed Low-Rank Clone init (``init="pca"``).

Every projection starts as U, the top-d_S principal directions of the teacher's hidden states
(uncentered second moment on calibration batches), so the student's hidden state starts as the
teacher's projected onto that subspace, h_S ~ h_T U, and every student weight is the teacher's
restricted to it. The student's norms are set so that they reproduce the teacher's on that
subspace: a norm divides by the RMS over d_S coordinates of z U, which carries a fraction f of the
energy of z (d_T coordinates), so its output is sqrt(d_S / (f d_T)) times (z / rms(z)) U; the weight
is the teacher's gamma seen through U (the diagonal of U^T diag(gamma) U) times sqrt(f d_T / d_S),
a LayerNorm bias is beta_T U. f is estimated from the same second moment.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..model_utils import token_rows

__all__ = ["norm_through", "principal_subspace"]



@torch.no_grad()
def principal_subspace(model: nn.Module, batches, k: int, device=None, dtype=None) -> tuple[torch.Tensor, float]:
    """(U, f): the top-``k`` eigenvectors (d, k) of the uncentered second moment of ``model``'s hidden
    states (every layer's input and the last output, real tokens only) over ``batches``, and the
    fraction f of the moment's trace they carry."""
    C = None
    for b in batches:
        out = model(**{k_: v for k_, v in b.items() if k_ in ("input_ids", "attention_mask", "token_type_ids")},
                    output_hidden_states=True)
        mask = b.get("attention_mask")
        for h in out.hidden_states:
            x = token_rows(h, mask).double()
            C = x.t() @ x if C is None else C + x.t() @ x
    if C is None:
        raise ValueError("batches is empty: the principal directions need at least one batch")
    if not 1 <= k <= C.shape[0]:
        raise ValueError(f"k must be in 1..{C.shape[0]}, got {k}")
    evals, evecs = torch.linalg.eigh(C.to(device) if device is not None else C)
    frac = (evals[-k:].sum() / evals.sum().clamp_min(1e-300)).clamp(0.0, 1.0).item()
    U = evecs[:, -k:].flip(-1)
    return (U.to(dtype) if dtype is not None else U.float()), frac


def norm_through(teacher_norm: torch.Tensor, U: torch.Tensor, frac: float, is_bias: bool) -> torch.Tensor:
    """A student norm's weight (or LayerNorm bias) that reproduces the teacher's norm on the subspace
    ``U`` (d_T, d_S) carrying the fraction ``frac`` of the hidden states' energy (module docstring)."""
    w = teacher_norm.detach().to(torch.float64)
    Uf = U.to(device=w.device, dtype=torch.float64)
    if w.shape != (Uf.shape[0],):
        raise ValueError(f"teacher_norm must have shape ({Uf.shape[0]},), got {tuple(w.shape)}")
    if is_bias:
        return w @ Uf
    d_T, d_S = Uf.shape
    return ((Uf * Uf) * w[:, None]).sum(0) * math.sqrt(frac * d_T / d_S)
