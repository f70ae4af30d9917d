"""Low-rank product kernels: out = (A @ B) @ C (+ bias) for a thin middle dimension R.

Two kernels, one per regime (the op layer picks one from a cost model, see
``lrkd_fast.ops.cost_model.plan_lowrank``):

* ``chain_matmul`` (``_chain_kernel``), many rows: one program per row block owns EVERY column.
  It forms t = A[rows] @ B on chip (fp32, rounded to the input dtype as two matmuls would), then
  sweeps the columns of C. Nothing is recomputed: each product is done exactly once, A is read
  once, B and C come from L2. The intermediate goes to HBM only when the caller stores it
  (training saves x U for the V gradient).
* ``lowrank_decode`` (``_decode_kernel``), few rows (decode, small batches): memory-bound on
  reading B and C, so ONE launch spreads both over the GPU. The first programs each own a slice
  (rank chunk x reduction slice) of B and write a partial of t; the remaining programs each own
  a column block of C, wait until every partial is written, sum them in a fixed order
  (deterministic), and write their columns. B and C are each read exactly once.

Operands are described by strides (transposed and broadcast views cost nothing, including a
strided bias). Launchers take tensors and return tensors; they know nothing of autograd or models.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .utils import autotune, block_at_least_16, bucket, device_sms, dot_in_fp32, interpreted

# Largest padded middle dimension the chain kernel keeps on chip (BLOCK_M x 256 fp32 accumulator).
CHAIN_MAX_R = 256
# Most rows the decode kernel handles in one launch (its phase-2 tile holds every row).
DECODE_MAX_M = 64


def _chain_configs():
    # The interpreter's small config first, then the GPU list (see utils.autotune_configs).
    cfgs = [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32}, num_warps=4, num_stages=2)]
    for bm in (64, 128):
        for bn in (64, 128):
            for bk in (32, 64):
                for w in (4, 8):
                    for s in (2, 3):
                        cfgs.append(triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk},
                                                  num_warps=w, num_stages=s))
    return cfgs


def _chain_resources(cfg, args):
    """(shared bytes, fp32 accumulator registers per thread) of a chain-kernel config."""
    e = 4 if args["DOT_FP32"] else args["a_ptr"].element_size()
    bm, bn, bk = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"], cfg.kwargs["BLOCK_K"]
    br = args["BLOCK_R"]
    threads = 32 * cfg.num_warps
    # phase 1 pipelines A and B tiles; phase 2 pipelines C tiles, with t staged for the MMA and
    # the output tile staged for the store (this sum matches the compiled kernels' shared memory)
    shared = max(cfg.num_stages * (bm * bk + bk * br) * e,
                 cfg.num_stages * br * bn * e + bm * br * e + bm * bn * e)
    # phase 2 holds its accumulator and t as an operand at once, plus the column sweep's addresses
    # and masks (+16 per thread: with less headroom the sm_90 compile check saw spills)
    regs = max(bm * br // threads, (bm * bn + bm * br * e // 4) // threads + 16)
    return shared, regs


@autotune(_chain_configs(), key=["M_BUCKET", "K", "R", "N", "STORE_T"], resources=_chain_resources)
@triton.jit
def _chain_kernel(a_ptr, b_ptr, c_ptr, bias_ptr, out_ptr, t_ptr,
                  M, K, R, N, M_BUCKET,
                  s_am, s_ak, s_bk, s_br, s_cr, s_cn, s_bias, s_om, s_on, s_tm, s_tr,
                  BLOCK_R: tl.constexpr, HAS_BIAS: tl.constexpr, STORE_T: tl.constexpr,
                  DOT_FP32: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    rows = offs_m.to(tl.int64)
    offs_r = tl.arange(0, BLOCK_R)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask = offs_m < M
    r_mask = offs_r < R

    acc_t = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs_k
        a = tl.load(a_ptr + rows[:, None] * s_am + kk[None, :] * s_ak,
                    mask=m_mask[:, None] & (kk[None, :] < K), other=0.0)
        b = tl.load(b_ptr + kk[:, None] * s_bk + offs_r[None, :] * s_br,
                    mask=(kk[:, None] < K) & r_mask[None, :], other=0.0)
        if DOT_FP32:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc_t = tl.dot(a, b, acc_t)
    t = acc_t.to(out_ptr.dtype.element_ty)
    if STORE_T:
        tl.store(t_ptr + rows[:, None] * s_tm + offs_r[None, :] * s_tr, t,
                 mask=m_mask[:, None] & r_mask[None, :])
    if DOT_FP32:
        t = t.to(tl.float32)

    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        c = tl.load(c_ptr + offs_r[:, None] * s_cr + offs_n[None, :] * s_cn,
                    mask=r_mask[:, None] & n_mask[None, :], other=0.0)
        if DOT_FP32:
            c = c.to(tl.float32)
        acc = tl.dot(t, c)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n * s_bias, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + rows[:, None] * s_om + offs_n[None, :] * s_on,
                 acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def _decode_produce(a_ptr, b_ptr, ws_ptr, sync_ptr, pid, M, K, R, K_PER_SPLIT, s_am, s_ak, s_bk, s_br,
                    N_CHUNKS: tl.constexpr, DOT_FP32: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """Partial t = A @ B for rank chunk ``pid % N_CHUNKS`` over reduction slice ``pid // N_CHUNKS``."""
    offs_m = tl.arange(0, BLOCK_M)
    m_mask = offs_m < M
    chunk = pid % N_CHUNKS
    ks = pid // N_CHUNKS
    offs_r = chunk * BLOCK_R + tl.arange(0, BLOCK_R)
    r_mask = offs_r < R
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    k_lo = ks * K_PER_SPLIT
    k_hi = tl.minimum(k_lo + K_PER_SPLIT, K)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        k_mask = kk < k_hi
        a = tl.load(a_ptr + offs_m[:, None] * s_am + kk[None, :] * s_ak,
                    mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        b = tl.load(b_ptr + kk[:, None] * s_bk + offs_r[None, :] * s_br,
                    mask=k_mask[:, None] & r_mask[None, :], other=0.0)
        if DOT_FP32:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc)
    ws_row: tl.constexpr = N_CHUNKS * BLOCK_R
    tl.store(ws_ptr + ks * BLOCK_M * ws_row + offs_m[:, None] * ws_row + offs_r[None, :], acc)
    # release: the partial is visible to whoever sees the incremented count
    tl.atomic_add(sync_ptr, 1, sem="release")


@triton.jit
def _decode_consume(c_ptr, bias_ptr, out_ptr, t_ptr, ws_ptr, sync_ptr, col_block, M, R, N,
                    s_cr, s_cn, s_bias, s_om, s_on, s_tm, s_tr,
                    N_CHUNKS: tl.constexpr, K_SPLIT: tl.constexpr, N_COL_BLOCKS: tl.constexpr,
                    HAS_BIAS: tl.constexpr, STORE_T: tl.constexpr, DOT_FP32: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr):
    """Columns [col_block * BLOCK_N, +BLOCK_N) of out = t @ C (+ bias), once every partial is in."""
    n_producers: tl.constexpr = N_CHUNKS * K_SPLIT
    ws_row: tl.constexpr = N_CHUNKS * BLOCK_R
    # Producers have lower program ids, so they are scheduled first and never wait on us.
    while tl.atomic_add(sync_ptr, 0, sem="acquire") < n_producers:
        pass
    offs_m = tl.arange(0, BLOCK_M)
    m_mask = offs_m < M
    offs_n = col_block * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for chunk in range(0, N_CHUNKS):
        offs_r = chunk * BLOCK_R + tl.arange(0, BLOCK_R)
        r_mask = offs_r < R
        part = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for ks in range(0, K_SPLIT):  # fixed order: deterministic
            part += tl.load(ws_ptr + ks * BLOCK_M * ws_row + offs_m[:, None] * ws_row + offs_r[None, :],
                            cache_modifier=".cg")
        t = part.to(out_ptr.dtype.element_ty)  # rounded as two matmuls would round x U
        if STORE_T:
            if col_block == 0:
                tl.store(t_ptr + offs_m[:, None] * s_tm + offs_r[None, :] * s_tr, t,
                         mask=m_mask[:, None] & r_mask[None, :])
        c = tl.load(c_ptr + offs_r[:, None] * s_cr + offs_n[None, :] * s_cn,
                    mask=r_mask[:, None] & n_mask[None, :], other=0.0)
        if DOT_FP32:
            t = t.to(tl.float32)
            c = c.to(tl.float32)
        acc = tl.dot(t, c, acc)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n * s_bias, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + offs_m[:, None] * s_om + offs_n[None, :] * s_on,
             acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])
    # the last consumer resets both counters, so the next launch starts from zero
    if tl.atomic_add(sync_ptr + 1, 1, sem="acq_rel") == N_COL_BLOCKS - 1:
        tl.atomic_xchg(sync_ptr + 1, 0)
        tl.atomic_xchg(sync_ptr, 0)


@triton.jit
def _decode_kernel(a_ptr, b_ptr, c_ptr, bias_ptr, out_ptr, t_ptr, ws_ptr, sync_ptr,
                   M, K, R, N, K_PER_SPLIT,
                   s_am, s_ak, s_bk, s_br, s_cr, s_cn, s_bias, s_om, s_on, s_tm, s_tr,
                   N_CHUNKS: tl.constexpr, K_SPLIT: tl.constexpr, N_COL_BLOCKS: tl.constexpr,
                   HAS_BIAS: tl.constexpr, STORE_T: tl.constexpr, DOT_FP32: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
                   BLOCK_N: tl.constexpr):
    # ws: (K_SPLIT, BLOCK_M, N_CHUNKS * BLOCK_R) fp32 partials of t = A @ B, contiguous
    pid = tl.program_id(0)
    if pid < N_CHUNKS * K_SPLIT:
        _decode_produce(a_ptr, b_ptr, ws_ptr, sync_ptr, pid, M, K, R, K_PER_SPLIT, s_am, s_ak, s_bk, s_br,
                        N_CHUNKS, DOT_FP32, BLOCK_M, BLOCK_R, BLOCK_K)
    else:
        _decode_consume(c_ptr, bias_ptr, out_ptr, t_ptr, ws_ptr, sync_ptr, pid - N_CHUNKS * K_SPLIT, M, R, N,
                        s_cr, s_cn, s_bias, s_om, s_on, s_tm, s_tr, N_CHUNKS, K_SPLIT, N_COL_BLOCKS,
                        HAS_BIAS, STORE_T, DOT_FP32, BLOCK_M, BLOCK_R, BLOCK_N)


def _check_2d(name: str, t: torch.Tensor) -> None:
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D, got shape {tuple(t.shape)}")


def _check_chain(a, b, c, bias):
    for name, t in (("a", a), ("b", b), ("c", c)):
        _check_2d(name, t)
    M, K = a.shape
    R, N = c.shape
    if b.shape != (K, R):
        raise ValueError(f"b must have shape {(K, R)}, got {tuple(b.shape)}")
    if bias is not None and bias.shape != (N,):
        raise ValueError(f"bias must have shape ({N},), got {tuple(bias.shape)}")
    return M, K, R, N


def _empty_result(a, M, N, R, bias, store_t):
    out = torch.zeros(M, N, dtype=a.dtype, device=a.device)
    if bias is not None:
        out += bias
    return out, (torch.zeros(M, R, dtype=a.dtype, device=a.device) if store_t else None)


def chain_matmul(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, bias: torch.Tensor | None = None,
                 store_t: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Return ``((a @ b) @ c + bias, a @ b if store_t else None)`` in one launch.

    a (M, K), b (K, R) with R <= ``CHAIN_MAX_R``, c (R, N), bias (N,); one dtype, any strides.
    The intermediate a @ b is rounded to that dtype before the second product.
    """
    M, K, R, N = _check_chain(a, b, c, bias)
    if M == 0 or K == 0 or R == 0:
        return _empty_result(a, M, N, R, bias, store_t)
    block_r = block_at_least_16(R)
    if block_r > CHAIN_MAX_R:
        raise ValueError(f"chain_matmul keeps a @ b on chip for R <= {CHAIN_MAX_R}, got R={R}")
    out = torch.empty(M, N, dtype=a.dtype, device=a.device)
    t = torch.empty(M, R, dtype=a.dtype, device=a.device) if store_t else out  # dummy pointer
    bias_arg = bias if bias is not None else out

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]),)

    _chain_kernel[grid](a, b, c, bias_arg, out, t, M, K, R, N, bucket(M),
                        a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0), c.stride(1),
                        bias_arg.stride(0), out.stride(0), out.stride(1), t.stride(0), t.stride(1),
                        BLOCK_R=block_r, HAS_BIAS=bias is not None, STORE_T=store_t,
                        DOT_FP32=dot_in_fp32(a.dtype))
    return out, (t if store_t else None)


# Counters of the decode kernel's hand-off, one pair per (device, stream); the kernel leaves them 0.
_SYNC: dict = {}


def _sync_counters(device: torch.device) -> torch.Tensor:
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (str(device), stream)
    buf = _SYNC.get(key)
    if buf is None:
        buf = _SYNC[key] = torch.zeros(2, dtype=torch.int32, device=device)
    return buf


@functools.lru_cache(maxsize=256)
def decode_plan(M: int, K: int, R: int, N: int, sms: int, k_split: int | None = None) -> dict:
    """Work split of ``lowrank_decode``: rank chunks x reduction slices of producers, column blocks
    of consumers, all resident at once (at most ``sms`` programs), and the partials of t (re-read
    by every consumer) kept below the bytes of B and C themselves."""
    block_m = block_at_least_16(M)
    block_r = 16 if R <= 256 else 32
    n_chunks = triton.cdiv(R, block_r)
    block_n = 64 if not interpreted() else 32
    while triton.cdiv(N, block_n) > max(sms // 2, 1) and block_n < 256:
        block_n *= 2
    n_cols = triton.cdiv(N, block_n)
    while n_chunks + n_cols > sms and block_r < 128:
        block_r *= 2
        n_chunks = triton.cdiv(R, block_r)
    if n_chunks + n_cols > sms:
        raise ValueError(f"lowrank_decode: R={R}, N={N} need more programs than the {sms} SMs can hold at once")
    weight_bytes = 2 * (K * R + R * N)
    forced, k_split = k_split, 1
    while forced is None and (n_chunks * k_split * 2 + n_cols <= sms and K // (k_split * 2) >= 128
           and n_cols * k_split * 2 * block_m * n_chunks * block_r * 4 <= weight_bytes):
        k_split *= 2
    if forced is not None:
        cap = triton.cdiv(K, 16) if interpreted() else max((sms - n_cols) // n_chunks, 1)
        k_split = max(1, min(int(forced), triton.cdiv(K, 16), cap))
    return dict(BLOCK_M=block_m, BLOCK_R=block_r, N_CHUNKS=n_chunks, K_SPLIT=k_split,
                BLOCK_N=block_n, N_COL_BLOCKS=n_cols, BLOCK_K=64 if not interpreted() else 32,
                K_PER_SPLIT=triton.cdiv(triton.cdiv(K, k_split), 16) * 16)


def lowrank_decode(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, bias: torch.Tensor | None = None,
                   store_t: bool = False, k_split: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``((a @ b) @ c + bias, a @ b if store_t else None)`` for few rows (M <= ``DECODE_MAX_M``), one launch.

    Same contract as :func:`chain_matmul`, any R. Every program of the launch must be resident at
    once (the consumers wait for the producers): the grid is capped at the GPU's SM count.
    ``k_split`` overrides the number of reduction slices per rank chunk (default: from the plan).
    """
    M, K, R, N = _check_chain(a, b, c, bias)
    if M > DECODE_MAX_M:
        raise ValueError(f"lowrank_decode handles at most {DECODE_MAX_M} rows, got {M}")
    if M == 0 or K == 0 or R == 0:
        return _empty_result(a, M, N, R, bias, store_t)
    p = decode_plan(M, K, R, N, device_sms(a), k_split)
    out = torch.empty(M, N, dtype=a.dtype, device=a.device)
    t = torch.empty(M, R, dtype=a.dtype, device=a.device) if store_t else out
    ws = torch.empty(p["K_SPLIT"], p["BLOCK_M"], p["N_CHUNKS"] * p["BLOCK_R"], dtype=torch.float32, device=a.device)
    bias_arg = bias if bias is not None else out
    grid = (p["N_CHUNKS"] * p["K_SPLIT"] + p["N_COL_BLOCKS"],)
    _decode_kernel[grid](a, b, c, bias_arg, out, t, ws, _sync_counters(a.device),
                         M, K, R, N, p["K_PER_SPLIT"],
                         a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0), c.stride(1),
                         bias_arg.stride(0), out.stride(0), out.stride(1), t.stride(0), t.stride(1),
                         N_CHUNKS=p["N_CHUNKS"], K_SPLIT=p["K_SPLIT"], N_COL_BLOCKS=p["N_COL_BLOCKS"],
                         HAS_BIAS=bias is not None, STORE_T=store_t, DOT_FP32=dot_in_fp32(a.dtype),
                         BLOCK_M=p["BLOCK_M"], BLOCK_R=p["BLOCK_R"], BLOCK_K=p["BLOCK_K"],
                         BLOCK_N=p["BLOCK_N"], num_warps=4)
    return out, (t if store_t else None)
