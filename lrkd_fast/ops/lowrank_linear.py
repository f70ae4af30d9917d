"""Low-rank linear: y = (x U) V + bias.

Shapes: x (..., d_in), U (d_in, r), V (r, d_out), bias (d_out,) -> y (..., d_out).

* ``lowrank_linear_reference``: two plain matmuls; the eager fallback and the test oracle.
* Triton backend: each product (x U) V, and the backward's (dy V^T) U^T, takes one of three
  paths chosen per shape by :func:`lrkd_fast.ops.cost_model.plan_lowrank` (FLOP/byte model):
  ``decode`` (M <= 64: one launch that streams U and V once), ``fused`` (one program per row
  block owns every column, x U stays on chip) or ``two_gemm`` (cuBLAS through ``torch.mm``,
  where the model says the fused kernel cannot fill the GPU). The weight gradients dU = x^T g and
  dV = (x U)^T dy reduce over all tokens and always run on cuBLAS, which splits that reduction
  itself; a Triton split-K GEMM would at best tie with it.
* Both passes are ``torch.library`` custom ops with fake (meta) implementations and a registered
  autograd formula, so ``torch.compile(fullgraph=True)`` traces through them.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
from torch import Tensor

from ..backend import use_triton
from ._validate import autocast_dtype, check_same, check_tensor
from .cost_model import PATHS, plan_lowrank

__all__ = ["lowrank_linear", "lowrank_linear_reference", "lowrank_path"]


def lowrank_linear_reference(x: Tensor, U: Tensor, V: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """Eager reference: ``(x @ U) @ V + bias``, differentiable by PyTorch autograd.

    The association (x U) V is the cheap one whenever r < d_in * d_out / (d_in + d_out).
    """
    y = (x @ U) @ V
    if bias is not None:
        y = y + bias
    return y


_forced_path: Optional[str] = None


@contextlib.contextmanager
def lowrank_path(path: Optional[str]):
    """Force the Triton backend's path ("decode", "fused", "two_gemm"; None = the cost model's
    choice) for every low-rank product inside the block; for benchmarks and tests."""
    global _forced_path
    if path is not None and path not in PATHS:
        raise ValueError(f"path must be one of {PATHS} or None, got {path!r}")
    previous, _forced_path = _forced_path, path
    try:
        yield
    finally:
        _forced_path = previous


def _choose(M: int, K: int, R: int, N: int, dtype: torch.dtype, store_t: bool) -> str:
    if _forced_path is not None:
        path = _forced_path
        if path == "decode" and M > 64:
            return "two_gemm"
        if path == "fused" and R > 256:
            return "two_gemm"
        return path
    return plan_lowrank(M, K, R, N, torch.finfo(dtype).bits // 8, store_t).path


def _product(a: Tensor, b: Tensor, c: Tensor, bias: Optional[Tensor], store_t: bool):
    """((a b) c + bias, a b if store_t) by the chosen path; a (M, K), b (K, R), c (R, N)."""
    from lrkd_fast.kernels import chain_matmul, lowrank_decode

    path = _choose(a.shape[0], a.shape[1], b.shape[1], c.shape[1], a.dtype, store_t)
    if path == "decode":
        return lowrank_decode(a, b, c, bias, store_t=store_t)
    if path == "fused":
        return chain_matmul(a, b, c, bias, store_t=store_t)
    t = a @ b
    y = torch.addmm(bias, t, c) if bias is not None else t @ c
    return y, (t if store_t else None)


# ---------------------------------------------------------------------------- custom ops (Triton)

@torch.library.custom_op("lrkd_fast::lowrank_linear_fwd", mutates_args=())
def _fwd_op(x: Tensor, U: Tensor, V: Tensor, bias: Optional[Tensor], save_xu: bool) -> tuple[Tensor, Tensor]:
    y, xu = _product(x, U, V, bias, save_xu)
    return y, (xu if xu is not None else x.new_empty(0))


@_fwd_op.register_fake
def _(x, U, V, bias, save_xu):
    y = x.new_empty(x.shape[0], V.shape[1])
    xu = x.new_empty(x.shape[0], U.shape[1]) if save_xu else x.new_empty(0)
    return y, xu


@torch.library.custom_op("lrkd_fast::lowrank_linear_bwd", mutates_args=())
def _bwd_op(dy: Tensor, x: Tensor, U: Tensor, V: Tensor, xu: Tensor, need_dx: bool, need_dU: bool,
            need_dV: bool, need_db: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    # dy is used with its own strides (an expanded gradient is not copied by the Triton paths).
    # distinct empty placeholders: custom-op outputs may not alias each other
    dx, dU, dV, db = (dy.new_empty(0) for _ in range(4))
    g = None
    if need_dx:
        dx, g = _product(dy, V.t(), U.t(), None, need_dU)
    elif need_dU:
        g = dy @ V.t()
    if need_dU:
        dU = x.t() @ g
    if need_dV:
        dV = xu.t() @ dy
    if need_db:
        db = dy.sum(0)
    return dx, dU, dV, db


@_bwd_op.register_fake
def _(dy, x, U, V, xu, need_dx, need_dU, need_dV, need_db):
    return (dy.new_empty(x.shape) if need_dx else dy.new_empty(0),
            dy.new_empty(U.shape) if need_dU else dy.new_empty(0),
            dy.new_empty(V.shape) if need_dV else dy.new_empty(0),
            dy.new_empty(V.shape[1]) if need_db else dy.new_empty(0))


def _setup_context(ctx, inputs, output):
    x, U, V, bias, save_xu = inputs
    _, xu = output
    ctx.has_bias = bias is not None
    ctx.save_for_backward(x, U, V, xu)


def _backward(ctx, dy, _dxu):
    x, U, V, xu = ctx.saved_tensors
    need_x, need_U, need_V, need_b = ctx.needs_input_grad[:4]
    need_b = need_b and ctx.has_bias
    if need_V and xu.numel() == 0 and x.shape[0] > 0:
        raise RuntimeError("lowrank_linear: V needs a gradient but x U was not saved in the forward; "
                           "call lowrank_linear with the same requires_grad flags in forward and backward")
    dx, dU, dV, db = _bwd_op(dy, x, U, V, xu, bool(need_x), bool(need_U), bool(need_V), bool(need_b))
    return (dx if need_x else None, dU if need_U else None, dV if need_V else None,
            db if need_b else None, None)


torch.library.register_autograd("lrkd_fast::lowrank_linear_fwd", _backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------- public API

def _validate(x, U, V, bias):
    check_tensor("x", x, min_dim=1)
    check_tensor("U", U, dim=2)
    check_tensor("V", V, dim=2)
    if bias is not None:
        check_tensor("bias", bias, dim=1)
    d_in, r = U.shape
    if x.shape[-1] != d_in:
        raise ValueError(f"x has {x.shape[-1]} features in its last dimension but U has d_in={d_in} rows "
                         f"(x {tuple(x.shape)}, U {tuple(U.shape)})")
    if V.shape[0] != r:
        raise ValueError(f"V must have r={r} rows to match U {tuple(U.shape)}, got V {tuple(V.shape)}")
    if r == 0:
        raise ValueError("rank must be at least 1: U has 0 columns")
    if bias is not None and bias.shape[0] != V.shape[1]:
        raise ValueError(f"bias must have d_out={V.shape[1]} elements, got shape {tuple(bias.shape)}")
    check_same(("x", "U", "V", "bias"), (x, U, V, bias))


def lowrank_linear(x: Tensor, U: Tensor, V: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """y = (x U) V + bias.

    Args:
        x: (..., d_in) input, any number of leading dims, contiguous or not.
        U: (d_in, r) first factor.
        V: (r, d_out) second factor.
        bias: optional (d_out,).
    Returns:
        (..., d_out), in the inputs' dtype (or the autocast dtype when autocast is on).

    Runs the fused Triton kernels or the eager reference as :mod:`lrkd_fast.backend` decides.
    """
    ac = autocast_dtype(x.device.type) if isinstance(x, Tensor) else None
    if ac is not None:
        x, U, V = x.to(ac), U.to(ac), V.to(ac)
        bias = bias.to(ac) if bias is not None else None
    _validate(x, U, V, bias)
    if not use_triton(x, U, V, bias, op="lowrank_linear"):
        return lowrank_linear_reference(x, U, V, bias)
    lead = x.shape[:-1]
    x2 = x if x.dim() == 2 else x.reshape(lead.numel(), x.shape[-1])  # not -1: ambiguous when d_in = 0
    save_xu = torch.is_grad_enabled() and V.requires_grad
    with torch.autocast(x.device.type, enabled=False):
        y, _ = _fwd_op(x2, U, V, bias, save_xu)
    return y.reshape(*lead, V.shape[1])
