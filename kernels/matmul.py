"""Matrix-product kernels for low-rank layers.

* ``chain_matmul``:  out = (A @ B) @ C (+ bias) for a thin middle dimension R, with A @ B kept on
  chip per row block (written to HBM only when the caller asks for it, e.g. to save it for
  backward). This is the low-rank forward (x U) V and the backward's dx = (dy V^T) U^T.
* ``matmul``: out = A @ B with the reduction dimension split across programs (split-K), used for
  the weight gradients whose reduction runs over all tokens. Each split writes its own fp32
  partial and the partials are summed in a fixed order, so results are deterministic.

Operands are described by strides, so transposed views cost nothing. Launchers take tensors and
return tensors; they know nothing of autograd or models.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .utils import autotune_configs, block_at_least_16, device_sms, dot_in_fp32, grouped_tile

# Largest padded middle dimension handled by the single-kernel chain. Beyond it the (rows x R)
# intermediate no longer fits on chip and chain_matmul runs two tiled products instead.
CHAIN_MAX_R = 256


def _chain_configs():
    cfgs = []
    for bm in (64, 128):
        for bn in (64, 128):
            for bk in (32, 64):
                for w in (4, 8):
                    cfgs.append(triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=3))
    # small, interpreter-friendly config first
    return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32}, num_warps=4, num_stages=2)] + cfgs


@triton.autotune(configs=autotune_configs(_chain_configs()), key=["M_BUCKET", "K", "R", "N", "N_SPLIT"],
                 reset_to_zero=None)
@triton.jit
def _chain_kernel(a_ptr, b_ptr, c_ptr, bias_ptr, out_ptr, t_ptr,
                  M, K, R, N, M_BUCKET,
                  s_am, s_ak, s_bk, s_br, s_cr, s_cn, s_om, s_on, s_tm, s_tr,
                  N_SPLIT: tl.constexpr, BLOCK_R: tl.constexpr,
                  HAS_BIAS: tl.constexpr, STORE_T: tl.constexpr, DOT_FP32: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, BLOCK_R)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask = offs_m < M
    r_mask = offs_r < R

    # t = A[rows] @ B, accumulated in fp32, never leaves the chip unless STORE_T.
    acc_t = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs_k
        a = tl.load(a_ptr + offs_m[:, None] * s_am + kk[None, :] * s_ak,
                    mask=m_mask[:, None] & (kk[None, :] < K), other=0.0)
        b = tl.load(b_ptr + kk[:, None] * s_bk + offs_r[None, :] * s_br,
                    mask=(kk[:, None] < K) & r_mask[None, :], other=0.0)
        if DOT_FP32:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc_t = tl.dot(a, b, acc_t)
    # Round the intermediate to the input dtype, as the eager two-matmul path does.
    t = acc_t.to(out_ptr.dtype.element_ty)
    if STORE_T:
        if pid_n == 0:
            tl.store(t_ptr + offs_m[:, None] * s_tm + offs_r[None, :] * s_tr, t,
                     mask=m_mask[:, None] & r_mask[None, :])
    if DOT_FP32:
        t = t.to(tl.float32)

    # out[rows, cols] = t @ C[:, cols]; this program covers every N_SPLIT-th column block.
    n_blocks = tl.cdiv(N, BLOCK_N)
    for nb in range(pid_n, n_blocks, N_SPLIT):
        offs_n = nb * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        c = tl.load(c_ptr + offs_r[:, None] * s_cr + offs_n[None, :] * s_cn,
                    mask=r_mask[:, None] & n_mask[None, :], other=0.0)
        if DOT_FP32:
            c = c.to(tl.float32)
        acc = tl.dot(t, c)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + offs_m[:, None] * s_om + offs_n[None, :] * s_on,
                 acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


def _matmul_configs():
    cfgs = []
    for bm, bn, bk, w, s in ((128, 128, 64, 8, 3), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4),
                             (64, 64, 64, 4, 4), (128, 256, 64, 8, 3), (256, 128, 64, 8, 3)):
        cfgs.append(triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8},
                                  num_warps=w, num_stages=s))
    return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4}, num_warps=4, num_stages=2)] + cfgs


@triton.autotune(configs=autotune_configs(_matmul_configs()), key=["M", "N", "K_BUCKET", "SPLIT_K"])
@triton.jit
def _matmul_kernel(a_ptr, b_ptr, out_ptr, M, N, K, K_BUCKET,
                   s_am, s_ak, s_bk, s_bn, s_os, s_om, s_on,
                   SPLIT_K: tl.constexpr, DOT_FP32: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    pid_k = tl.program_id(1)
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask = offs_m < M
    n_mask = offs_n < N

    k_iters = tl.cdiv(K, BLOCK_K)
    per_split = tl.cdiv(k_iters, SPLIT_K)
    k_start = pid_k * per_split * BLOCK_K
    k_end = tl.minimum(k_start + per_split * BLOCK_K, K)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        kk = k0 + offs_k
        k_mask = kk < k_end
        a = tl.load(a_ptr + offs_m[:, None] * s_am + kk[None, :] * s_ak,
                    mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        b = tl.load(b_ptr + kk[:, None] * s_bk + offs_n[None, :] * s_bn,
                    mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        if DOT_FP32:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc)
    tl.store(out_ptr + pid_k * s_os + offs_m[:, None] * s_om + offs_n[None, :] * s_on,
             acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


def _bucket(n: int) -> int:
    """Autotune key for a dimension that varies with the batch: its power-of-two bucket."""
    return triton.next_power_of_2(max(int(n), 1))


def _check_2d(name: str, t: torch.Tensor) -> None:
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D, got shape {tuple(t.shape)}")


def matmul(a: torch.Tensor, b: torch.Tensor, out_dtype: torch.dtype | None = None,
           split_k: int | None = None) -> torch.Tensor:
    """a (M, K) @ b (K, N) -> (M, N) in ``out_dtype`` (default: a's dtype), fp32 accumulation.

    ``split_k`` splits the reduction across programs (default: chosen so the grid covers the
    GPU when the output has few tiles, as for weight gradients reduced over all tokens).
    """
    _check_2d("a", a)
    _check_2d("b", b)
    M, K = a.shape
    K2, N = b.shape
    if K != K2:
        raise ValueError(f"inner dimensions differ: a {tuple(a.shape)}, b {tuple(b.shape)}")
    out_dtype = out_dtype or a.dtype
    if M == 0 or N == 0 or K == 0:
        return torch.zeros(M, N, dtype=out_dtype, device=a.device)
    if split_k is None:
        tiles = triton.cdiv(M, 128) * triton.cdiv(N, 128)
        sms = device_sms(a)
        split_k = 1
        while tiles * split_k < sms and K // (split_k * 2) >= 512:
            split_k *= 2
    split_k = max(1, min(int(split_k), triton.cdiv(K, 32)))
    if split_k == 1:
        out = torch.empty(1, M, N, dtype=out_dtype, device=a.device)
    else:
        out = torch.empty(split_k, M, N, dtype=torch.float32, device=a.device)

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]), split_k)

    _matmul_kernel[grid](a, b, out, M, N, K, _bucket(K),
                         a.stride(0), a.stride(1), b.stride(0), b.stride(1),
                         out.stride(0), out.stride(1), out.stride(2),
                         SPLIT_K=split_k, DOT_FP32=dot_in_fp32(a.dtype))
    if split_k == 1:
        return out[0]
    # fixed-order reduction of the fp32 partials: deterministic
    return out.sum(0).to(out_dtype)


def chain_matmul(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, bias: torch.Tensor | None = None,
                 store_t: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Return ``((a @ b) @ c + bias, a @ b if store_t else None)``.

    a (M, K), b (K, R), c (R, N), bias (N,). All of a, b, c share one dtype; the intermediate
    a @ b is rounded to that dtype before the second product (as two separate matmuls would).
    """
    for name, t in (("a", a), ("b", b), ("c", c)):
        _check_2d(name, t)
    M, K = a.shape
    R, N = c.shape
    if b.shape != (K, R):
        raise ValueError(f"b must have shape {(K, R)}, got {tuple(b.shape)}")
    dtype = a.dtype
    if M == 0 or K == 0 or R == 0:
        out = torch.zeros(M, N, dtype=dtype, device=a.device)
        if bias is not None:
            out += bias
        return out, (torch.zeros(M, R, dtype=dtype, device=a.device) if store_t else None)

    block_r = block_at_least_16(R)
    if block_r > CHAIN_MAX_R:
        t = matmul(a, b, split_k=1)
        out = matmul(t, c, split_k=1)
        if bias is not None:
            out += bias
        return out, (t if store_t else None)

    out = torch.empty(M, N, dtype=dtype, device=a.device)
    t = torch.empty(M, R, dtype=dtype, device=a.device) if store_t else out  # dummy pointer
    # Split the columns over a second grid axis when there are too few row blocks to fill the
    # GPU; each split recomputes a @ b for its rows (cheap next to the second product when R << N).
    m_blocks_guess = triton.cdiv(M, 64)
    n_split = max(1, min(triton.cdiv(N, 64), triton.cdiv(device_sms(a) * 2, m_blocks_guess), 8))

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]), n_split)

    _chain_kernel[grid](a, b, c, bias if bias is not None else out, out, t,
                        M, K, R, N, _bucket(M),
                        a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0), c.stride(1),
                        out.stride(0), out.stride(1), t.stride(0), t.stride(1),
                        N_SPLIT=n_split, BLOCK_R=block_r, HAS_BIAS=bias is not None,
                        STORE_T=store_t, DOT_FP32=dot_in_fp32(dtype))
    return out, (t if store_t else None)
