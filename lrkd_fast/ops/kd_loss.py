"""Fused linear knowledge-distillation loss: both LM heads + KL at temperature T + CE, without
materializing the full (tokens x vocabulary) logits.

    loss = kl_weight * KL_term + ce_weight * CE_term
    s = h_S W_S^T (+ b_S)        student logits, (N, V)
    t = h_T W_T^T (+ b_T)        teacher logits, (N, V_T), or given precomputed as ``teacher_logits``
    KL row  = KL(softmax(t/T) || softmax(s/T))        (``reverse=True``: KL(softmax(s/T) || softmax(t/T)))
    CE row  = cross-entropy of softmax(s) (temperature 1) against the label

Shapes: student_hidden (..., d_S), student_weight (V, d_S), student_bias (V,), teacher_hidden
(..., d_T), teacher_weight (V_T, d_T), teacher_bias (V_T,), teacher_logits (..., V_T), labels (...),
where ``...`` is (N,) or (B, L).

Rows. A row whose label equals ``ignore_index`` counts in neither term (``kl_on_ignored=True``
keeps its KL). ``labels=None``: no CE, every row counts.

Reductions (``reduction`` applies to the KL term, ``ce_reduction`` to the CE term):
  "mean"       sum over counted rows / number of counted rows (0 when no row counts)
  "sum"        sum over counted rows
  "batchmean"  sum over counted rows (and the vocabulary) / ``batch_size``; ``batch_size`` defaults
               to B when the inputs are (B, L, ...), and is required for flattened (N, ...) inputs.
               This is F.kl_div(..., reduction="batchmean") of the LRC reference code.
``ce_reduction=None`` means "the same as ``reduction``", except that with "batchmean" the CE is a
"mean" over counted tokens: L_KL (batchmean) + L_LM (token mean) is exactly the LRC total loss.
``t2_scale=True`` multiplies the KL term by T^2 (Hinton); off by default, as in LRC.

Teacher vocabulary larger than the student's (padded vocabularies, e.g. Qwen): with
``teacher_vocab="truncate"`` (default) token ids 0..V-1 are taken to mean the same tokens in both
models, and the teacher distribution is the softmax over its FIRST V logits only (the extra columns
are dropped and the rest renormalized; the fused path never even computes them).
``teacher_vocab="strict"`` raises instead. A teacher vocabulary smaller than V is always an error.

The teacher is a constant: no gradient reaches teacher_hidden, teacher_weight, teacher_bias or
teacher_logits.

* ``kd_loss_reference``: full logits in fp32 and PyTorch autograd; the eager fallback and the
  test oracle. It materializes (N, V) fp32 logits for student and teacher.
* Triton path (``lrkd_fast::kd_loss_fused`` custom op): rows go in chunks as large as a 1 GiB
  budget for the logits buffers and gradients allows (each chunk re-reads both heads). Per chunk: the head GEMMs (cuBLAS), one Triton
  kernel (:func:`lrkd_fast.kernels.kd_loss_rows`) that computes both log-softmaxes online in fp32,
  the row losses, and dL/ds in place over the student logits; then grad_input = dL/ds W_S and
  grad_weight += dL/ds^T h_S (the first chunk writes it). Loss and gradients are computed in the
  forward; the backward scales them in place by grad_output, reading nothing when it is 1, so
  one forward supports one backward and no second derivatives (both raise).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..backend import use_triton
from ._scale import scale_saved_grads
from ._validate import autocast_dtype, check_same, check_tensor

__all__ = ["KDLoss", "kd_loss", "kd_loss_reference"]

REDUCTIONS = ("mean", "sum", "batchmean")
TEACHER_VOCAB = ("truncate", "strict")


# ---------------------------------------------------------------------------- shared semantics

def _reduction_scales(labels: Optional[Tensor], n_rows: int, device, *, ignore_index: int,
                      kl_on_ignored: bool, reduction: str, ce_reduction: str,
                      batch_size: Optional[int]) -> Tensor:
    """(2,) fp32 tensor: what the KL sum and the CE sum are multiplied by. No host sync."""
    if labels is None:
        n_ce = torch.zeros((), dtype=torch.float32, device=device)
        n_kl = torch.full((), float(n_rows), dtype=torch.float32, device=device)
    else:
        n_ce = (labels != ignore_index).sum().to(torch.float32)
        n_kl = torch.full((), float(n_rows), dtype=torch.float32, device=device) if kl_on_ignored else n_ce

    def scale(red, count):
        if red == "mean":
            return 1.0 / count.clamp_min(1.0)
        if red == "sum":
            return torch.ones((), dtype=torch.float32, device=device)
        return torch.full((), 1.0 / batch_size, dtype=torch.float32, device=device)

    return torch.stack([scale(reduction, n_kl), scale(ce_reduction, n_ce)])


def kd_loss_reference(student_hidden: Tensor, student_weight: Tensor, labels: Optional[Tensor] = None, *,
                      teacher_hidden: Optional[Tensor] = None, teacher_weight: Optional[Tensor] = None,
                      teacher_logits: Optional[Tensor] = None, student_bias: Optional[Tensor] = None,
                      teacher_bias: Optional[Tensor] = None, temperature: float = 1.0, kl_weight: float = 1.0,
                      ce_weight: float = 1.0, ignore_index: int = -100, reduction: str = "mean",
                      batch_size: Optional[int] = None, ce_reduction: Optional[str] = None,
                      kl_on_ignored: bool = False, t2_scale: bool = False, reverse: bool = False) -> Tensor:
    """Eager reference of :func:`kd_loss` (same arguments; inputs are assumed valid).

    Full fp32 logits and ``F.kl_div`` / ``F.cross_entropy``; differentiable by PyTorch autograd
    with respect to the student tensors. Returns an fp32 (fp64 for fp64 inputs) scalar.
    """
    ce_reduction, batch_size = _resolve_reductions(student_hidden, reduction, ce_reduction, batch_size)
    work = torch.float64 if student_hidden.dtype == torch.float64 else torch.float32
    # explicit row counts: reshape(-1, 0) is ambiguous for a 0-width hidden state
    hs = student_hidden.reshape(student_hidden.shape[:-1].numel(), student_hidden.shape[-1])
    V = student_weight.shape[0]
    s = F.linear(hs, student_weight, student_bias).to(work)
    with torch.no_grad():
        if teacher_logits is not None:
            t = teacher_logits.reshape(hs.shape[0], teacher_logits.shape[-1])
        else:
            t = F.linear(teacher_hidden.reshape(hs.shape[0], teacher_hidden.shape[-1]), teacher_weight, teacher_bias)
        t = t[:, :V].to(work)  # teacher_vocab="truncate": softmax over the first V teacher logits
    log_q = F.log_softmax(s / temperature, dim=-1)
    log_p = F.log_softmax(t / temperature, dim=-1)
    # sum_j a_j (log a_j - log b_j) with 0 log 0 = 0: a vocabulary masked to -inf contributes nothing
    log_a, log_b = (log_q, log_p) if reverse else (log_p, log_q)
    a = log_a.exp()
    kl_rows = torch.where(a > 0, a * (log_a - log_b), torch.zeros_like(a)).sum(-1)
    lab = labels.reshape(-1).long() if labels is not None else None
    scales = _reduction_scales(lab, s.shape[0], s.device, ignore_index=ignore_index, kl_on_ignored=kl_on_ignored,
                               reduction=reduction, ce_reduction=ce_reduction, batch_size=batch_size).to(work)
    if lab is not None and not kl_on_ignored:
        kl_rows = torch.where(lab != ignore_index, kl_rows, torch.zeros_like(kl_rows))
    kl_w = kl_weight * (temperature ** 2 if t2_scale else 1.0)
    loss = kl_w * scales[0] * kl_rows.sum()
    if lab is not None and ce_weight != 0.0:
        ce_rows = F.cross_entropy(s, lab, ignore_index=ignore_index, reduction="none")
        loss = loss + ce_weight * scales[1] * ce_rows.sum()
    return loss


# ---------------------------------------------------------------------------- custom op (Triton)

# Extra memory the fused path may use at most, logits buffers and gradients together.
KD_MEMORY_BUDGET = 1 << 30


def _auto_chunk_rows(n: int, V: int, d_s: int, d_t: int, elem: int, grad_bytes: int,
                     budget: int = KD_MEMORY_BUDGET) -> int:
    """Rows per chunk: as many as the memory budget allows (every chunk re-reads both heads, so
    fewer, larger chunks move less), in whole 128-row tiles, at least 128.

    ``grad_bytes``: what the gradients (dh, dW, db) take whatever the chunk; the logits buffers
    (student and teacher, rows x V each) and the per-row losses get the rest of the budget.
    """
    per_row = V * elem * (2 if d_t else 1) + 4
    rows = max(budget - grad_bytes, 0) // per_row
    rows = rows // 128 * 128
    return max(1, min(n, max(rows, 128)))


def _accumulate_grad_weight(acc: Tensor, g: Tensor, h: Tensor, first: bool) -> None:
    """acc = g^T h (``first``) or acc += g^T h. An fp32 ``acc`` with half-precision g, h: fp32
    output straight from the GEMM where PyTorch offers it (CUDA), else the product rounded once
    per chunk before the fp32 add."""
    if acc.dtype == g.dtype:
        if first:
            torch.mm(g.t(), h, out=acc)
        else:
            acc.addmm_(g.t(), h)
        return
    prod = None
    if g.is_cuda:
        try:
            prod = torch.mm(g.t(), h, out_dtype=torch.float32)
        except (TypeError, RuntimeError, NotImplementedError):
            prod = None
    if prod is None:
        prod = torch.mm(g.t(), h)
    if first:
        acc.copy_(prod)
    else:
        acc.add_(prod)


@torch.library.custom_op("lrkd_fast::kd_loss_fused", mutates_args=())
def _kd_fused_op(h_s: Tensor, w_s: Tensor, b_s: Optional[Tensor], labels: Optional[Tensor],
                 h_t: Optional[Tensor], w_t: Optional[Tensor], b_t: Optional[Tensor],
                 t_logits: Optional[Tensor], scales: Tensor, temperature: float, kl_weight: float,
                 ce_weight: float, ignore_index: int, kl_on_ignored: bool, reverse: bool, chunk_rows: int,
                 need_dh: bool, need_dw: bool, need_db: bool,
                 grad_weight_fp32: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    from lrkd_fast.kernels.kd_loss import kd_loss_rows

    N, d_s = h_s.shape
    V = w_s.shape[0]
    dev, dt = h_s.device, h_s.dtype
    fused_teacher = t_logits is None
    acc_dtype = torch.float32 if grad_weight_fp32 else w_s.dtype
    if chunk_rows <= 0:
        grad_bytes = (h_s.numel() * h_s.element_size() * need_dh
                      + V * d_s * (torch.finfo(acc_dtype).bits // 8) * need_dw + 4 * V * need_db)
        chunk_rows = _auto_chunk_rows(N, V, d_s, h_t.shape[1] if fused_teacher else 0, h_s.element_size(),
                                      grad_bytes)
    write_grad = need_dh or need_dw or need_db
    with torch.no_grad():
        s_buf = torch.empty(min(chunk_rows, N), V, dtype=dt, device=dev)
        if fused_teacher:
            w_t = w_t[:V]  # truncated teacher vocabulary: the extra rows are never multiplied
            b_t = b_t[:V] if b_t is not None else None
            t_buf = torch.empty(min(chunk_rows, N), V, dtype=h_t.dtype, device=dev)
        loss_rows = torch.empty(N, dtype=torch.float32, device=dev)
        dh = torch.empty_like(h_s) if need_dh else h_s.new_empty(0)
        # the first chunk writes dW and db (beta = 0); later chunks add to them
        alloc = torch.empty if N > 0 else torch.zeros
        dw = alloc(V, d_s, dtype=acc_dtype, device=dev) if need_dw else h_s.new_empty(0)
        db = alloc(V, dtype=torch.float32, device=dev) if need_db else h_s.new_empty(0)
        for start in range(0, N, chunk_rows):
            end = min(start + chunk_rows, N)
            hs = h_s[start:end]
            s = s_buf[: end - start]
            if b_s is None:
                torch.mm(hs, w_s.t(), out=s)
            else:
                torch.addmm(b_s, hs, w_s.t(), out=s)
            if fused_teacher:
                t = t_buf[: end - start]
                if b_t is None:
                    torch.mm(h_t[start:end], w_t.t(), out=t)
                else:
                    torch.addmm(b_t, h_t[start:end], w_t.t(), out=t)
            else:
                t = t_logits[start:end]
            kd_loss_rows(s, t, labels[start:end] if labels is not None else None, scales, loss_rows[start:end],
                         temperature=temperature, kl_weight=kl_weight, ce_weight=ce_weight,
                         ignore_index=ignore_index, kl_on_ignored=kl_on_ignored, reverse=reverse,
                         write_grad=write_grad)
            # s now holds dL/ds for these rows
            if need_dh:
                torch.mm(s, w_s, out=dh[start:end])
            if need_dw:
                _accumulate_grad_weight(dw, s, hs, first=start == 0)
            if need_db:
                if start == 0:
                    torch.sum(s, 0, dtype=torch.float32, out=db)
                else:
                    db.add_(s.sum(0, dtype=torch.float32))
        loss = loss_rows.sum()
        if need_dw and dw.dtype != w_s.dtype:
            dw = dw.to(w_s.dtype)
        if need_db:
            db = db.to(b_s.dtype)
    return loss, dh, dw, db


@_kd_fused_op.register_fake
def _(h_s, w_s, b_s, labels, h_t, w_t, b_t, t_logits, scales, temperature, kl_weight, ce_weight, ignore_index,
      kl_on_ignored, reverse, chunk_rows, need_dh, need_dw, need_db, grad_weight_fp32):
    return (h_s.new_empty((), dtype=torch.float32),
            torch.empty_like(h_s) if need_dh else h_s.new_empty(0),
            torch.empty_like(w_s) if need_dw else h_s.new_empty(0),
            torch.empty_like(b_s) if need_db else h_s.new_empty(0))


def _setup_context(ctx, inputs, output):
    _, dh, dw, db = output
    ctx.save_for_backward(dh, dw, db)
    ctx.need = inputs[-4:-1]


def _backward(ctx, d_loss, _ddh, _ddw, _ddb):
    dh, dw, db = ctx.saved_tensors
    need_dh, need_dw, need_db = ctx.need
    out = [None] * 20

    wanted = [g if need and ctx.needs_input_grad[i] else None
              for i, (g, need) in enumerate(((dh, need_dh), (dw, need_dw), (db, need_db)))]
    out[:3] = scale_saved_grads(ctx, wanted, d_loss, "kd_loss")
    return tuple(out)


torch.library.register_autograd("lrkd_fast::kd_loss_fused", _backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------- validation

def _check_temperature(temperature) -> None:
    if (isinstance(temperature, bool) or not isinstance(temperature, (int, float))
            or not math.isfinite(temperature) or not temperature > 0):
        raise ValueError(f"temperature must be a positive finite number, got {temperature!r}")


def _check_weights(**weights) -> None:
    """kl_weight, ce_weight: finite and >= 0 (a negative weight would train away from the target)."""
    for name, v in weights.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")


def _resolve_reductions(student_hidden, reduction, ce_reduction, batch_size):
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if ce_reduction is None:
        ce_reduction = "mean" if reduction == "batchmean" else reduction
    elif ce_reduction not in REDUCTIONS:
        raise ValueError(f"ce_reduction must be one of {REDUCTIONS} or None, got {ce_reduction!r}")
    if "batchmean" in (reduction, ce_reduction):
        if batch_size is None:
            if student_hidden.dim() == 3:
                batch_size = student_hidden.shape[0]
            else:
                raise ValueError("batch_size is required for reduction='batchmean' when student_hidden is "
                                 f"flattened to (N, d_S) (got shape {tuple(student_hidden.shape)}); pass the "
                                 "number of sequences")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    return ce_reduction, batch_size


def _validate(student_hidden, student_weight, labels, teacher_hidden, teacher_weight, teacher_logits,
              student_bias, teacher_bias, temperature, ignore_index, teacher_vocab):
    check_tensor("student_hidden", student_hidden, min_dim=1)
    check_tensor("student_weight", student_weight, dim=2)
    lead = tuple(student_hidden.shape[:-1])
    V, d_s = student_weight.shape
    if student_hidden.shape[-1] != d_s:
        raise ValueError(f"student_hidden has {student_hidden.shape[-1]} features in its last dimension but "
                         f"student_weight has d_S={d_s} columns (student_hidden {tuple(student_hidden.shape)}, "
                         f"student_weight {tuple(student_weight.shape)})")
    if V == 0:
        raise ValueError("student_weight has 0 rows: the vocabulary must not be empty")
    if student_bias is not None:
        check_tensor("student_bias", student_bias, dim=1)
        if student_bias.shape[0] != V:
            raise ValueError(f"student_bias must have V={V} elements, got shape {tuple(student_bias.shape)}")
    check_same(("student_hidden", "student_weight", "student_bias"), (student_hidden, student_weight, student_bias))

    _check_temperature(temperature)
    if teacher_vocab not in TEACHER_VOCAB:
        raise ValueError(f"teacher_vocab must be one of {TEACHER_VOCAB}, got {teacher_vocab!r}")

    have_hidden = teacher_hidden is not None or teacher_weight is not None
    if teacher_logits is not None and have_hidden:
        raise ValueError("give the teacher either as teacher_logits or as teacher_hidden + teacher_weight, not both")
    if teacher_logits is None and not have_hidden:
        raise ValueError("a teacher is required: pass teacher_hidden and teacher_weight, or teacher_logits")
    if teacher_logits is not None:
        if teacher_bias is not None:
            raise ValueError("teacher_bias goes with teacher_hidden + teacher_weight, not with teacher_logits")
        check_tensor("teacher_logits", teacher_logits, min_dim=1)
        if tuple(teacher_logits.shape[:-1]) != lead:
            raise ValueError(f"teacher_logits rows {tuple(teacher_logits.shape[:-1])} do not match student_hidden "
                             f"rows {lead} (teacher_logits {tuple(teacher_logits.shape)}, student_hidden "
                             f"{tuple(student_hidden.shape)})")
        v_t, what = teacher_logits.shape[-1], "teacher_logits"
        check_same(("student_hidden", "teacher_logits"), (student_hidden, teacher_logits), dtype=False)
    else:
        if teacher_hidden is None:
            raise ValueError("teacher_weight was given without teacher_hidden")
        if teacher_weight is None:
            raise ValueError("teacher_hidden was given without teacher_weight")
        check_tensor("teacher_hidden", teacher_hidden, min_dim=1)
        check_tensor("teacher_weight", teacher_weight, dim=2)
        if tuple(teacher_hidden.shape[:-1]) != lead:
            raise ValueError(f"teacher_hidden rows {tuple(teacher_hidden.shape[:-1])} do not match student_hidden "
                             f"rows {lead} (teacher_hidden {tuple(teacher_hidden.shape)}, student_hidden "
                             f"{tuple(student_hidden.shape)})")
        if teacher_hidden.shape[-1] != teacher_weight.shape[1]:
            raise ValueError(f"teacher_hidden has {teacher_hidden.shape[-1]} features in its last dimension but "
                             f"teacher_weight has d_T={teacher_weight.shape[1]} columns (teacher_weight "
                             f"{tuple(teacher_weight.shape)})")
        v_t, what = teacher_weight.shape[0], "teacher_weight"
        if teacher_bias is not None:
            check_tensor("teacher_bias", teacher_bias, dim=1)
            if teacher_bias.shape[0] != v_t:
                raise ValueError(f"teacher_bias must have V_T={v_t} elements, got shape {tuple(teacher_bias.shape)}")
        check_same(("teacher_hidden", "teacher_weight", "teacher_bias"), (teacher_hidden, teacher_weight, teacher_bias))
        check_same(("student_hidden", "teacher_hidden"), (student_hidden, teacher_hidden), dtype=False)
    if v_t < V:
        raise ValueError(f"the teacher vocabulary ({what}: V_T={v_t}) is smaller than the student's "
                         f"(student_weight: V={V}); token ids would not align")
    if v_t > V and teacher_vocab == "strict":
        raise ValueError(f"the teacher vocabulary ({what}: V_T={v_t}) is larger than the student's (V={V}) and "
                         "teacher_vocab='strict'; use teacher_vocab='truncate' to take the teacher's first V logits")

    if labels is not None:
        if not isinstance(labels, Tensor):
            raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
        if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
            raise TypeError(f"labels must be an integer tensor (e.g. torch.long), got {labels.dtype}")
        if tuple(labels.shape) != lead:
            raise ValueError(f"labels shape {tuple(labels.shape)} does not match student_hidden rows {lead}")
        check_same(("student_hidden", "labels"), (student_hidden, labels), dtype=False)
        # A data-dependent check (one host sync); skipped while torch.compile traces.
        if labels.numel() and not torch.compiler.is_compiling():
            bad = (labels != ignore_index) & ((labels < 0) | (labels >= V))
            if bool(bad.any()):
                first = labels[bad].reshape(-1)[0].item()
                raise ValueError(f"labels must lie in [0, {V}) or equal ignore_index={ignore_index}; found {first}")


# ---------------------------------------------------------------------------- public API

def kd_loss(student_hidden: Tensor, student_weight: Tensor, labels: Optional[Tensor] = None, *,
            teacher_hidden: Optional[Tensor] = None, teacher_weight: Optional[Tensor] = None,
            teacher_logits: Optional[Tensor] = None, student_bias: Optional[Tensor] = None,
            teacher_bias: Optional[Tensor] = None, temperature: float = 1.0, kl_weight: float = 1.0,
            ce_weight: float = 1.0, ignore_index: int = -100, reduction: str = "mean",
            batch_size: Optional[int] = None, ce_reduction: Optional[str] = None, kl_on_ignored: bool = False,
            t2_scale: bool = False, reverse: bool = False, teacher_vocab: str = "truncate",
            chunk_size: Optional[int] = None, grad_weight_fp32: bool = False) -> Tensor:
    """kl_weight * KL(softmax(t/T) || softmax(s/T)) + ce_weight * CE(s, labels), fused with the heads.

    Args:
        student_hidden: (N, d_S) or (B, L, d_S) student hidden states (input of the LM head).
        student_weight: (V, d_S) student LM head weight. student_bias: optional (V,).
        labels: (N,) or (B, L) integer labels, ``ignore_index`` for rows to skip; None: no CE.
        teacher_hidden, teacher_weight, teacher_bias: (.., d_T), (V_T, d_T), (V_T,): the teacher head,
            fused (its logits are never materialized in full). Or instead:
        teacher_logits: (.., V_T) precomputed teacher logits. V_T >= V (see ``teacher_vocab``).
        temperature: T > 0 for the KL term; CE is always at temperature 1.
        kl_weight, ce_weight: weights of the two terms (``ce_weight`` is ignored when labels is None).
        reduction, ce_reduction, batch_size: see the module docstring ("mean", "sum", "batchmean").
        kl_on_ignored: keep the KL term on rows whose label is ``ignore_index``.
        t2_scale: multiply the KL term by T^2. reverse: KL(student || teacher) instead.
        teacher_vocab: "truncate" (teacher softmax over its first V logits) or "strict" (V_T must be V).
        chunk_size: rows per chunk on the fused path (default: chosen from N, V and hidden sizes).
        grad_weight_fp32: accumulate the student weight gradient over chunks in fp32 (costs a
            (V, d_S) fp32 buffer); default accumulates in the weight's dtype.
    Returns:
        fp32 scalar loss (fp64 for fp64 inputs on the eager path). Gradients flow to the student
        hidden states, weight and bias only.
    """
    ac = autocast_dtype(student_hidden.device.type) if isinstance(student_hidden, Tensor) else None
    if ac is not None:
        student_hidden, student_weight = student_hidden.to(ac), student_weight.to(ac)
        student_bias = student_bias.to(ac) if student_bias is not None else None
        if teacher_hidden is not None and teacher_weight is not None:
            teacher_hidden, teacher_weight = teacher_hidden.to(ac), teacher_weight.to(ac)
            teacher_bias = teacher_bias.to(ac) if teacher_bias is not None else None
    _validate(student_hidden, student_weight, labels, teacher_hidden, teacher_weight, teacher_logits,
              student_bias, teacher_bias, temperature, ignore_index, teacher_vocab)
    _check_weights(kl_weight=kl_weight, ce_weight=ce_weight)
    ce_reduction, batch_size = _resolve_reductions(student_hidden, reduction, ce_reduction, batch_size)
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    opts = dict(temperature=float(temperature), kl_weight=float(kl_weight), ce_weight=float(ce_weight),
                ignore_index=int(ignore_index), reduction=reduction, batch_size=batch_size,
                ce_reduction=ce_reduction, kl_on_ignored=bool(kl_on_ignored), t2_scale=bool(t2_scale),
                reverse=bool(reverse))
    tensors = (student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias,
               teacher_logits)
    if not use_triton(*tensors, op="kd_loss"):
        with torch.autocast(student_hidden.device.type, enabled=False):
            return kd_loss_reference(student_hidden, student_weight, labels, teacher_hidden=teacher_hidden,
                                     teacher_weight=teacher_weight, teacher_logits=teacher_logits,
                                     student_bias=student_bias, teacher_bias=teacher_bias, **opts)

    d_s = student_hidden.shape[-1]
    rows = student_hidden.shape[:-1].numel()  # explicit: reshape(-1, 0) is ambiguous for a 0-width hidden state
    h_s = student_hidden.reshape(rows, d_s).contiguous()
    lab = labels.reshape(-1).contiguous() if labels is not None else None
    h_t = None
    if teacher_hidden is not None:
        h_t = teacher_hidden.detach().reshape(rows, teacher_hidden.shape[-1]).contiguous()
    t_logits = None
    if teacher_logits is not None:
        t_logits = teacher_logits.reshape(rows, teacher_logits.shape[-1])
        if t_logits.stride(-1) != 1:
            t_logits = t_logits.contiguous()
    w_s = student_weight.contiguous()
    scales = _reduction_scales(lab, h_s.shape[0], h_s.device, ignore_index=ignore_index,
                               kl_on_ignored=kl_on_ignored, reduction=reduction, ce_reduction=ce_reduction,
                               batch_size=batch_size)
    kl_w = float(kl_weight) * (float(temperature) ** 2 if t2_scale else 1.0)
    ce_w = float(ce_weight) if lab is not None else 0.0
    grad_on = torch.is_grad_enabled()
    need_dh = grad_on and student_hidden.requires_grad
    need_dw = grad_on and student_weight.requires_grad
    need_db = grad_on and student_bias is not None and student_bias.requires_grad
    with torch.autocast(h_s.device.type, enabled=False):
        loss, _, _, _ = _kd_fused_op(
            h_s, w_s, student_bias, lab, h_t, teacher_weight.detach() if teacher_weight is not None else None,
            teacher_bias.detach() if teacher_bias is not None else None,
            t_logits.detach() if t_logits is not None else None, scales, float(temperature), kl_w, ce_w,
            int(ignore_index), bool(kl_on_ignored), bool(reverse), int(chunk_size or 0),
            bool(need_dh), bool(need_dw), bool(need_db), bool(grad_weight_fp32))
    return loss


class KDLoss(nn.Module):
    """Module form of :func:`kd_loss`: the options are fixed at construction, the tensors are
    passed to ``forward`` (``student_weight`` is typically ``student.lm_head.weight``)."""

    def __init__(self, *, temperature: float = 1.0, kl_weight: float = 1.0, ce_weight: float = 1.0,
                 ignore_index: int = -100, reduction: str = "mean", batch_size: Optional[int] = None,
                 ce_reduction: Optional[str] = None, kl_on_ignored: bool = False, t2_scale: bool = False,
                 reverse: bool = False, teacher_vocab: str = "truncate", chunk_size: Optional[int] = None,
                 grad_weight_fp32: bool = False):
        super().__init__()
        self.options = dict(temperature=temperature, kl_weight=kl_weight, ce_weight=ce_weight,
                            ignore_index=ignore_index, reduction=reduction, batch_size=batch_size,
                            ce_reduction=ce_reduction, kl_on_ignored=kl_on_ignored, t2_scale=t2_scale,
                            reverse=reverse, teacher_vocab=teacher_vocab, chunk_size=chunk_size,
                            grad_weight_fp32=grad_weight_fp32)
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        _check_temperature(temperature)
        _check_weights(kl_weight=kl_weight, ce_weight=ce_weight)

    def forward(self, student_hidden: Tensor, student_weight: Tensor, labels: Optional[Tensor] = None, *,
                teacher_hidden: Optional[Tensor] = None, teacher_weight: Optional[Tensor] = None,
                teacher_logits: Optional[Tensor] = None, student_bias: Optional[Tensor] = None,
                teacher_bias: Optional[Tensor] = None, batch_size: Optional[int] = None) -> Tensor:
        opts = dict(self.options)
        if batch_size is not None:
            opts["batch_size"] = batch_size
        return kd_loss(student_hidden, student_weight, labels, teacher_hidden=teacher_hidden,
                       teacher_weight=teacher_weight, teacher_logits=teacher_logits, student_bias=student_bias,
                       teacher_bias=teacher_bias, **opts)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items() if v is not None)
