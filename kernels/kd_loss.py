"""Row kernel of the fused knowledge-distillation loss: KL(T) + CE and dL/ds, one row per program.

For a chunk of rows whose student logits ``s`` (rows, V) and teacher logits ``t`` (rows, >= V) are
already in memory, ``kd_loss_rows`` computes, per row and in fp32 whatever the storage dtype:

* pass 1 (online over the vocabulary): the running max of s and of t, and the running sums
  ``sum exp((s - m_s) / T)``, ``sum exp(s - m_s)`` (CE is at temperature 1) and
  ``sum exp((t - m_t) / T)``. max(s / T) = max(s) / T for T > 0, so one max serves both student
  sums. The label's logit is picked up on the way.
* pass 2: KL = sum_j p_j (log p_j - log q_j) with p = softmax(t/T), q = softmax(s/T) (or the reverse
  direction), and, when asked, the gradient, written IN PLACE over ``s``:
      dL/ds = kl_coef * (q - p) / T + ce_coef * (softmax(s) - onehot(label))        (forward KL)
      dL/ds = kl_coef * q * (log q - log p - KL) / T + ce part                    (reverse KL)
  Reverse KL needs the row's KL before any gradient, so it takes a third pass.
* the row's loss ``kl_coef * KL + ce_coef * CE`` goes to ``loss_rows``.

Log-probabilities are formed as (x - max) / T - log(sum), never as x / T - lse: with logits of
magnitude 1e4 the latter loses three digits to cancellation in fp32.

Only the first V teacher columns are read (V = the student's vocabulary); what that means for a
larger teacher vocabulary is decided, and documented, by the caller.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .utils import interpreted


@triton.jit
def _log_probs(s_row, t_row, cols, mask, m_s, m_t, inv_T, log_z_sT, log_z_tT):
    """fp32 student logits of a vocabulary block and both log-softmaxes at temperature T."""
    s = tl.load(s_row + cols, mask=mask, other=0.0).to(tl.float32)
    t = tl.load(t_row + cols, mask=mask, other=0.0).to(tl.float32)
    return s, (s - m_s) * inv_T - log_z_sT, (t - m_t) * inv_T - log_z_tT


@triton.jit
def _kd_loss_rows_kernel(s_ptr, t_ptr, labels_ptr, scales_ptr, loss_ptr,
                         V, s_stride, t_stride, inv_T, kl_weight, ce_weight, ignore_index,
                         HAS_LABELS: tl.constexpr, HAS_CE: tl.constexpr, KL_ON_IGNORED: tl.constexpr,
                         REVERSE: tl.constexpr, WRITE_GRAD: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    s_row = s_ptr + row * s_stride
    t_row = t_ptr + row * t_stride
    offs = tl.arange(0, BLOCK_V)

    # Per-row weights: the reduction scale (loaded, so it may depend on data without a host sync)
    # times the user weight, zero for rows that do not count.
    red_kl = tl.load(scales_ptr)
    red_ce = tl.load(scales_ptr + 1)
    if HAS_LABELS:
        label = tl.load(labels_ptr + row).to(tl.int64)
        counted = label != ignore_index
        if KL_ON_IGNORED:
            kl_coef = kl_weight * red_kl
        else:
            kl_coef = tl.where(counted, kl_weight * red_kl, 0.0)
        if HAS_CE:
            ce_coef = tl.where(counted, ce_weight * red_ce, 0.0)
        else:
            ce_coef = 0.0
    else:
        label = -1
        kl_coef = kl_weight * red_kl
        ce_coef = 0.0

    # ---- pass 1: maxima and normalizers, online over the vocabulary
    m_s = tl.full((), float("-inf"), tl.float32)
    m_t = tl.full((), float("-inf"), tl.float32)
    z_sT = tl.zeros((), tl.float32)
    z_s1 = tl.zeros((), tl.float32)
    z_tT = tl.zeros((), tl.float32)
    s_label = tl.zeros((), tl.float32)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + offs
        mask = cols < V
        s = tl.load(s_row + cols, mask=mask, other=float("-inf")).to(tl.float32)
        t = tl.load(t_row + cols, mask=mask, other=float("-inf")).to(tl.float32)
        # A block of -inf logits (a masked vocabulary) leaves the running max at -inf: shift by 0
        # instead, so exp(-inf - -inf) never makes a NaN.
        m_s_new = tl.maximum(m_s, tl.max(s, 0))
        sh_s = tl.where(m_s_new == float("-inf"), 0.0, m_s_new)
        z_sT = z_sT * tl.exp((m_s - sh_s) * inv_T) + tl.sum(tl.exp((s - sh_s) * inv_T), 0)
        if HAS_CE:
            z_s1 = z_s1 * tl.exp(m_s - sh_s) + tl.sum(tl.exp(s - sh_s), 0)
            s_label += tl.sum(tl.where(cols == label, s, 0.0), 0)
        m_s = m_s_new
        m_t_new = tl.maximum(m_t, tl.max(t, 0))
        sh_t = tl.where(m_t_new == float("-inf"), 0.0, m_t_new)
        z_tT = z_tT * tl.exp((m_t - sh_t) * inv_T) + tl.sum(tl.exp((t - sh_t) * inv_T), 0)
        m_t = m_t_new
    log_z_sT = tl.log(z_sT)
    log_z_tT = tl.log(z_tT)
    if HAS_CE:
        log_z_s1 = tl.log(z_s1)

    # ---- pass 2: the KL sum (and, for forward KL, the gradient in the same sweep)
    kl = tl.zeros((), tl.float32)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + offs
        mask = cols < V
        s, log_q, log_p = _log_probs(s_row, t_row, cols, mask, m_s, m_t, inv_T, log_z_sT, log_z_tT)
        q = tl.exp(log_q)
        p = tl.exp(log_p)
        # 0 log 0 = 0: a teacher (forward) or student (reverse) logit of -inf adds nothing
        if REVERSE:
            kl += tl.sum(tl.where(mask & (q > 0), q * (log_q - log_p), 0.0), 0)
        else:
            kl += tl.sum(tl.where(mask & (p > 0), p * (log_p - log_q), 0.0), 0)
            if WRITE_GRAD:
                g = (kl_coef * inv_T) * (q - p)
                if HAS_CE:
                    p1 = tl.exp((s - m_s) - log_z_s1)
                    g += ce_coef * (p1 - tl.where(cols == label, 1.0, 0.0))
                tl.store(s_row + cols, g.to(s_ptr.dtype.element_ty), mask=mask)

    # ---- pass 3 (reverse KL only): d/da_j sum_k q_k (log q_k - log p_k) = q_j (log q_j - log p_j - KL)
    if REVERSE:
        if WRITE_GRAD:
            for v0 in range(0, V, BLOCK_V):
                cols = v0 + offs
                mask = cols < V
                s, log_q, log_p = _log_probs(s_row, t_row, cols, mask, m_s, m_t, inv_T, log_z_sT, log_z_tT)
                q = tl.exp(log_q)
                # a row that does not count gets 0 even where its KL is infinite (0 * inf)
                g = tl.where(kl_coef != 0, (kl_coef * inv_T) * q * (log_q - log_p - kl), 0.0)
                if HAS_CE:
                    p1 = tl.exp((s - m_s) - log_z_s1)
                    g += ce_coef * (p1 - tl.where(cols == label, 1.0, 0.0))
                tl.store(s_row + cols, g.to(s_ptr.dtype.element_ty), mask=mask)

    loss = tl.where(kl_coef != 0, kl_coef * kl, 0.0)
    if HAS_CE:
        loss += ce_coef * (log_z_s1 - (s_label - m_s))
    tl.store(loss_ptr + row, loss)


def _block_v(V: int) -> int:
    # The interpreter runs blocks as numpy arrays: a small cap there keeps several blocks per row
    # in the tests, so the online max/sum across blocks is exercised on CPU too.
    cap = 256 if interpreted() else 4096
    return min(cap, triton.next_power_of_2(max(int(V), 1)))


def kd_loss_rows(s: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None, scales: torch.Tensor,
                 loss_rows: torch.Tensor, *, temperature: float, kl_weight: float, ce_weight: float,
                 ignore_index: int = -100, kl_on_ignored: bool = False, reverse: bool = False,
                 write_grad: bool = True) -> None:
    """Per-row KL(T) + CE of a chunk of logits; writes dL/ds over ``s`` when ``write_grad``.

    s: (rows, V) student logits, unit stride along V; overwritten by dL/ds when ``write_grad``.
    t: (rows, V_T >= V) teacher logits, unit stride along V_T; only the first V columns are read.
    labels: (rows,) integer labels or None (no CE, every row's KL counts).
    scales: (2,) fp32 on the device: reduction scales of the KL and CE sums (e.g. 1 / counted rows).
    loss_rows: (rows,) fp32 output, ``kl_weight * scales[0] * KL + ce_weight * scales[1] * CE``
        per row (0 for rows that do not count).
    ``kl_weight`` should already include any T^2 factor. CE is computed only when labels are given
    and ``ce_weight != 0``.
    """
    rows, V = s.shape
    if t.shape[0] != rows or t.shape[1] < V:
        raise ValueError(f"t must have {rows} rows and at least {V} columns, got {tuple(t.shape)}")
    # a size-1 vocabulary dim is never stepped along, whatever its stride (.contiguous() keeps such a stride)
    if (V > 1 and s.stride(1) != 1) or (t.shape[1] > 1 and t.stride(1) != 1):
        raise ValueError("s and t must have unit stride along the vocabulary")
    if labels is not None and labels.shape != (rows,):
        raise ValueError(f"labels must have shape ({rows},), got {tuple(labels.shape)}")
    if loss_rows.shape != (rows,) or loss_rows.dtype != torch.float32:
        raise ValueError("loss_rows must be a (rows,) fp32 tensor")
    if rows == 0:
        return
    has_labels = labels is not None
    has_ce = has_labels and ce_weight != 0.0
    block_v = _block_v(V)
    _kd_loss_rows_kernel[(rows,)](
        s, t, labels if has_labels else loss_rows, scales, loss_rows,
        V, s.stride(0), t.stride(0), 1.0 / float(temperature), float(kl_weight), float(ce_weight),
        int(ignore_index),
        HAS_LABELS=has_labels, HAS_CE=has_ce, KL_ON_IGNORED=bool(kl_on_ignored), REVERSE=bool(reverse),
        WRITE_GRAD=bool(write_grad), BLOCK_V=block_v, num_warps=8 if block_v >= 2048 else 4)
