"""Activation-cloning loss of one Low-Rank Clone layer.

    loss = alpha * sum_i w_i * E_i
    E_i  = mean((s_i - t_i)^2)        direct term     s_i, t_i (..., d_i)
    E_i  = mean((s_i - t_i @ P_i)^2)  projected term  s_i (..., d_S), t_i (..., d_T), P_i (d_T, d_S)

With a token mask the mean of each term runs over the elements of the kept rows only
(``reduction="sum"``: their plain sum). Gradients reach every student tensor and every P; teacher
tensors are constants (one that requires grad still gets none). The loss is returned in fp32.

* ``clone_loss_reference``: F.mse_loss per term in fp32; the eager fallback and the test oracle.
* Triton path (one ``torch.library`` custom op, ``lrkd_fast::clone_loss``): every direct pair of
  a dtype in ONE grouped launch, each projected pair in one GEMM with a loss/gradient epilogue,
  then dP = -t^T G as one GEMM pass. The loss is terminal, so all gradients are formed in the
  forward; backward scales them in place by the incoming gradient, reading nothing when it is 1
  (one backward per forward; second derivatives raise). This costs the students' gradient
  memory from forward to backward (as in any fused loss). Per-term constants are cached on the
  device: a step makes no host-to-device copy and no synchronization.
* Per-term values for logging: ``return_terms=True`` also returns a detached fp32 tensor
  ``terms`` (n_pairs,) of the unweighted E_i, so that ``loss == alpha * sum(weights * terms)``.
"""
from __future__ import annotations

import math
from numbers import Real
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..backend import use_triton
from ._scale import scale_saved_grads
from ._validate import autocast_dtype, check_same, check_tensor

__all__ = ["CloneLoss", "clone_loss", "clone_loss_reference", "clone_mse"]

REDUCTIONS = ("mean", "sum")


# ---------------------------------------------------------------------------- eager reference

def _mask_rows(mask: Optional[Tensor], rows: int) -> Optional[Tensor]:
    """The mask as a flat bool vector over rows (nonzero = kept)."""
    if mask is None:
        return None
    m = mask.reshape(rows)
    return m if m.dtype == torch.bool else m != 0


def _loss_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def clone_loss_reference(pairs, alpha: float = 1.0, mask: Optional[Tensor] = None, reduction: str = "mean",
                         weights: Optional[Sequence[float]] = None, return_terms: bool = False):
    """Eager reference of :func:`clone_loss` (same arguments, same results), autograd by PyTorch.

    Each term is computed in fp32 (fp64 for fp64 inputs): F.mse_loss without a mask, a masked
    sum of squares divided by the kept count with one.
    """
    if isinstance(pairs, (list, tuple)):
        pairs = _autocast_pairs(pairs)
    pairs, weights = _normalize(pairs, weights, alpha, reduction, mask)
    terms = []
    for p in pairs:
        s, t = p[0], p[1].detach()
        proj = p[2] if len(p) == 3 else None
        cdt = _loss_dtype(s.dtype)
        pred = t if proj is None else t @ proj
        s32, pred32 = s.to(cdt), pred.to(cdt)
        if mask is None:
            if s.numel() == 0:  # a mean over no elements is 0, as when every row is masked
                terms.append((s32 - pred32).square().sum())
            else:
                terms.append(F.mse_loss(s32, pred32, reduction=reduction))
            continue
        rows = s.shape[:-1].numel()
        keep = _mask_rows(mask, rows).to(s.device)
        d = s32.reshape(rows, s.shape[-1]) - pred32.reshape(rows, s.shape[-1])  # not -1: ambiguous for 0 rows
        sq = torch.where(keep[:, None], d, 0.0).square().sum()
        if reduction == "mean":
            count = keep.sum() * s.shape[-1]
            sq = sq / count.clamp_min(1).to(cdt)
        terms.append(sq)
    terms = torch.stack(terms)
    w = torch.tensor(weights, dtype=terms.dtype, device=terms.device)
    loss = alpha * (w * terms).sum()
    return (loss, terms.detach()) if return_terms else loss


# ---------------------------------------------------------------------------- custom op (Triton)

@torch.library.custom_op("lrkd_fast::clone_loss", mutates_args=())
def _clone_op(students: list[Tensor], teachers: list[Tensor], projs: list[Tensor], proj_of: list[int],
              mask: Optional[Tensor], coefs: list[float], mean: bool, need_grad: list[bool],
              need_proj_grad: list[bool]) -> tuple[Tensor, Tensor, list[Tensor], list[Tensor]]:
    """Loss, per-term values, student gradients and proj gradients (for a unit loss gradient).

    proj_of[i] is the index into ``projs`` of pair i's projection, or -1 for a direct pair.
    students/teachers are 2-D (rows, width); mask is None or (rows,) uint8 for every pair.
    Gradients not asked for come back as empty tensors.
    """
    from lrkd_fast.kernels.clone_loss import grouped_mse, projected_mse

    n = len(students)
    dev = students[0].device
    # Per-term constants live on the device, cached by value: a training step copies nothing
    # host-to-device, never synchronizes (the mask count stays on the device) and can be captured
    # in a CUDA graph.
    coef = _device_constants(tuple(coefs), dev)
    if mask is not None:
        counts = mask.sum(dtype=torch.float64) * _device_constants(tuple(s.shape[1] for s in students), dev)
    else:
        counts = _device_constants(tuple(float(s.numel()) for s in students), dev)
    grad_scale = (2.0 * coef / counts.clamp_min(1.0) if mean else 2.0 * coef).to(torch.float32)

    sums: list[Optional[Tensor]] = [None] * n
    grads: list[Tensor] = [s.new_empty(0) for s in students]  # outputs must not alias each other
    proj_grads: list[Tensor] = [p.new_empty(0) for p in projs]

    direct_by_dtype: dict[torch.dtype, list[int]] = {}
    for i in range(n):
        if proj_of[i] < 0:
            direct_by_dtype.setdefault(students[i].dtype, []).append(i)
    for idx in direct_by_dtype.values():  # one launch per dtype: one launch for a usual layer
        g_sums, g_grads = grouped_mse([students[i] for i in idx], [teachers[i] for i in idx],
                                      grad_scale, mask, [need_grad[i] for i in idx], scale_index=idx)
        for j, i in enumerate(idx):
            sums[i] = g_sums[j]
            if g_grads[j] is not None:
                grads[i] = g_grads[j]

    for i in range(n):
        k = proj_of[i]
        if k < 0:
            continue
        want_dP = need_proj_grad[k]
        sums[i], G = projected_mse(students[i], teachers[i], projs[k], grad_scale[i:i + 1], mask,
                                   store_grad=need_grad[i] or want_dP)
        if need_grad[i]:
            grads[i] = G
        if want_dP:
            # L = E(s - t P): dL/dP = -t^T G, one GEMM pass (alpha = -1); a P shared by several
            # pairs accumulates in place
            if proj_grads[k].numel() == 0:
                proj_grads[k] = torch.addmm(projs[k].new_empty(projs[k].shape), teachers[i].t(), G,
                                            beta=0, alpha=-1)
            else:
                proj_grads[k].addmm_(teachers[i].t(), G, alpha=-1)

    raw = torch.stack(sums)
    terms = torch.where(counts > 0, raw.double() / counts.clamp_min(1.0), 0.0).float() if mean else raw
    loss = (coef.float() * terms).sum()
    return loss, terms, grads, proj_grads


_CONSTANTS: dict = {}


def _device_constants(values: tuple, device: torch.device) -> Tensor:
    """A float64 tensor of ``values`` on ``device``, made once per distinct value tuple."""
    key = (values, str(device))
    t = _CONSTANTS.get(key)
    if t is None:
        if len(_CONSTANTS) > 256:  # e.g. a weight schedule: keep the cache bounded
            _CONSTANTS.clear()
        t = _CONSTANTS[key] = torch.tensor(values, dtype=torch.float64, device=device)
    return t


@_clone_op.register_fake
def _(students, teachers, projs, proj_of, mask, coefs, mean, need_grad, need_proj_grad):
    s0 = students[0]
    loss = s0.new_empty((), dtype=torch.float32)
    terms = s0.new_empty(len(students), dtype=torch.float32)
    grads = [s.new_empty(s.shape) if ng else s.new_empty(0) for s, ng in zip(students, need_grad)]
    proj_grads = [p.new_empty(p.shape) if ng else p.new_empty(0) for p, ng in zip(projs, need_proj_grad)]
    return loss, terms, grads, proj_grads


def _setup_context(ctx, inputs, output):
    students, need_grad, need_proj_grad = inputs[0], inputs[7], inputs[8]
    _, _, grads, proj_grads = output
    ctx.n_students = len(students)
    ctx.need_grad, ctx.need_proj_grad = list(need_grad), list(need_proj_grad)
    ctx.save_for_backward(*grads, *proj_grads)


def _backward(ctx, d_loss, _d_terms, _d_grads, _d_proj_grads):
    saved = ctx.saved_tensors
    grads, proj_grads = saved[:ctx.n_students], saved[ctx.n_students:]
    # the gradients were formed for d_loss = 1: scaled in place, untouched when d_loss is 1
    wanted = [g if nd else None for g, nd in zip(grads, ctx.need_grad)]
    wanted_p = [g if nd else None for g, nd in zip(proj_grads, ctx.need_proj_grad)]
    scale_saved_grads(ctx, wanted + wanted_p, d_loss, "clone_loss")
    # teachers (and every non-tensor argument) get no gradient. An empty list argument is its own
    # pytree node (a non-empty list of bools is a leaf), so it must be answered with an empty list.
    return (wanted, [None] * ctx.n_students, wanted_p,
            None, None, None, None, None, [] if not ctx.need_proj_grad else None)


torch.library.register_autograd("lrkd_fast::clone_loss", _backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------- validation

def _normalize(pairs, weights, alpha, reduction, mask):
    """Check every argument; returns (pairs as tuples, weights as floats). Errors name the argument."""
    if not isinstance(pairs, (list, tuple)):
        raise TypeError(f"pairs must be a list of (student, teacher) or (student, teacher, proj) tuples, "
                        f"got {type(pairs).__name__}")
    if len(pairs) == 0:
        raise ValueError("pairs is empty: give at least one (student, teacher) pair")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if not isinstance(alpha, Real) or isinstance(alpha, bool) or not math.isfinite(alpha):
        raise TypeError(f"alpha must be a finite real number, got {alpha!r}")
    if alpha < 0:
        raise ValueError(f"alpha must be >= 0 (a negative weight would train away from the teacher), got {alpha!r}")
    if weights is None:
        weights = [1.0] * len(pairs)
    else:
        weights = list(weights)
        if len(weights) != len(pairs):
            raise ValueError(f"weights has {len(weights)} entries but there are {len(pairs)} pairs")
        for i, w in enumerate(weights):
            if not isinstance(w, Real) or isinstance(w, bool) or not math.isfinite(w):
                raise TypeError(f"weights[{i}] must be a finite real number, got {w!r}")
            if w < 0:
                raise ValueError(f"weights[{i}] must be >= 0, got {w!r}")
        weights = [float(w) for w in weights]
    if mask is not None:
        check_tensor("mask", mask, floating=False)
        if mask.is_complex():
            raise TypeError(f"mask must be a bool or 0/1 real tensor, got {mask.dtype}")

    out = []
    for i, p in enumerate(pairs):
        if not isinstance(p, (list, tuple)) or len(p) not in (2, 3):
            raise TypeError(f"pairs[{i}] must be a (student, teacher) or (student, teacher, proj) tuple, got "
                            f"{type(p).__name__}{'' if not isinstance(p, (list, tuple)) else f' of length {len(p)}'}")
        s, t = p[0], p[1]
        proj = p[2] if len(p) == 3 else None
        names = (f"pairs[{i}] student", f"pairs[{i}] teacher", f"pairs[{i}] proj")
        check_tensor(names[0], s, min_dim=1)
        check_tensor(names[1], t, min_dim=1)
        if proj is None:
            if t.shape != s.shape:
                raise ValueError(f"{names[0]} shape {tuple(s.shape)} != {names[1]} shape {tuple(t.shape)}; a direct "
                                 f"pair needs equal shapes (pass a proj (d_T, d_S) for different widths)")
        else:
            check_tensor(names[2], proj, dim=2)
            if t.shape[:-1] != s.shape[:-1]:
                raise ValueError(f"{names[0]} shape {tuple(s.shape)} and {names[1]} shape {tuple(t.shape)} "
                                 f"differ in their leading (token) dimensions")
            if proj.shape != (t.shape[-1], s.shape[-1]):
                raise ValueError(f"{names[2]} must have shape (d_T, d_S) = {(t.shape[-1], s.shape[-1])} for "
                                 f"teacher {tuple(t.shape)} and student {tuple(s.shape)}, got {tuple(proj.shape)}")
        check_same(names, (s, t, proj))
        if i > 0:
            check_same(("pairs[0] student", names[0]), (out[0][0], s), dtype=False)
        if mask is not None:
            lead = s.shape[:-1]
            if mask.shape != lead and not (mask.dim() == 1 and mask.numel() == lead.numel()):
                raise ValueError(f"mask shape {tuple(mask.shape)} does not match the leading dimensions "
                                 f"{tuple(lead)} of {names[0]} {tuple(s.shape)}")
            if mask.device != s.device:
                raise ValueError(f"mask is on {mask.device} but {names[0]} is on {s.device}")
        out.append((s, t) if proj is None else (s, t, proj))
    return out, weights


# ---------------------------------------------------------------------------- public API

def clone_loss(pairs, alpha: float = 1.0, mask: Optional[Tensor] = None, reduction: str = "mean",
               weights: Optional[Sequence[float]] = None, return_terms: bool = False):
    """All activation-cloning terms of one layer in one call.

    Args:
        pairs: list of ``(student, teacher)`` (same shape (..., d)) or ``(student, teacher, proj)``
            (student (..., d_S), teacher (..., d_T), proj (d_T, d_S)); widths may differ between
            pairs. Each pair's tensors share one dtype (fp16, bf16, fp32; fp64 runs eagerly) and
            all pairs one device. Teachers are treated as constants.
        alpha: global factor.
        mask: optional bool or 0/1 tensor over the leading dims of every student (e.g. (B, L), or
            (N,) for flattened tokens); rows with 0 are left out of every term and its count.
        reduction: "mean" (each term over its own kept elements) or "sum".
        weights: optional per-pair factors (floats), default 1.
        return_terms: also return the detached fp32 tensor (n_pairs,) of unweighted terms.
    Returns:
        the 0-dim loss ``alpha * sum_i weights[i] * term_i`` (fp32; fp64 for fp64 inputs), and
        ``terms`` when ``return_terms``. Everything masked, or an empty batch: loss 0 and zero
        gradients (on every backend).
    """
    if isinstance(pairs, (list, tuple)):
        pairs = _autocast_pairs(pairs)
    pairs, weights = _normalize(pairs, weights, alpha, reduction, mask)
    tensors = [x for p in pairs for x in p]
    if not use_triton(*tensors, op="clone_loss"):
        return clone_loss_reference(pairs, alpha, mask, reduction, weights, return_terms)

    students, teachers, projs, proj_of = [], [], [], []
    for p in pairs:
        s, t = p[0], p[1]
        rows = s.shape[:-1].numel()
        students.append(s.reshape(rows, s.shape[-1]))
        teachers.append(t.detach().reshape(rows, t.shape[-1]))
        if len(p) == 3:
            # a P shared by several pairs is passed once; its gradients are summed in the op
            k = next((j for j, q in enumerate(projs) if q is p[2]), len(projs))
            if k == len(projs):
                projs.append(p[2])
            proj_of.append(k)
        else:
            proj_of.append(-1)
    grad_on = torch.is_grad_enabled()
    need_grad = [grad_on and p[0].requires_grad for p in pairs]
    need_proj_grad = [grad_on and P.requires_grad for P in projs]
    mask_u8 = None
    if mask is not None:
        mask_u8 = _mask_rows(mask, students[0].shape[0]).to(torch.uint8)
    with torch.autocast(students[0].device.type, enabled=False):
        loss, terms, _, _ = _clone_op(students, teachers, projs, proj_of, mask_u8,
                                      [float(alpha) * w for w in weights], reduction == "mean",
                                      need_grad, need_proj_grad)
    return (loss, terms.detach()) if return_terms else loss


def _autocast_pairs(pairs):
    """Under autocast, run each projected pair's product in the autocast dtype (as t @ P would)."""
    out = []
    for p in pairs:
        if isinstance(p, (list, tuple)) and len(p) == 3 and all(isinstance(x, Tensor) for x in p):
            ac = autocast_dtype(p[0].device.type)
            if ac is not None and p[0].is_floating_point():
                p = tuple(x.to(ac) for x in p)
        out.append(p)
    return out


def clone_mse(student: Tensor, teacher: Tensor, proj: Optional[Tensor] = None, weight: float = 1.0,
              mask: Optional[Tensor] = None, reduction: str = "mean") -> Tensor:
    """One cloning term: ``weight * E(student, teacher)`` or ``weight * E(student, teacher @ proj)``.

    Same rules as :func:`clone_loss` with a single pair.
    """
    pair = (student, teacher) if proj is None else (student, teacher, proj)
    return clone_loss([pair], alpha=1.0, mask=mask, reduction=reduction, weights=[weight])


class CloneLoss(torch.nn.Module):
    """Module form of :func:`clone_loss`: ``CloneLoss(alpha, reduction, weights)(pairs, mask)``."""

    def __init__(self, alpha: float = 1.0, reduction: str = "mean", weights: Optional[Sequence[float]] = None,
                 return_terms: bool = False):
        super().__init__()
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        if isinstance(alpha, bool) or not isinstance(alpha, Real) or not math.isfinite(alpha) or alpha < 0:
            raise ValueError(f"alpha must be a finite number >= 0, got {alpha!r}")
        self.alpha, self.reduction, self.return_terms = alpha, reduction, return_terms
        self.weights = None if weights is None else [float(w) for w in weights]

    def forward(self, pairs, mask: Optional[Tensor] = None):
        return clone_loss(pairs, alpha=self.alpha, mask=mask, reduction=self.reduction, weights=self.weights,
                          return_terms=self.return_terms)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, reduction={self.reduction!r}, weights={self.weights}"
